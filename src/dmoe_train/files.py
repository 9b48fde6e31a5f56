"""Writes that never leave a half-written file, and a full disk reported as one."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over `path`: a kill
    or a full disk during the write leaves the previous `path` whole. A full disk is reported
    as such (torch.save says only "file write failed")."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
    except Exception as err:
        full = disk_full(err, path.parent)  # before the partial file frees its space
        tmp.unlink(missing_ok=True)
        if full:
            raise no_space(path, f"the previous {path.name}") from err
        raise
    os.replace(tmp, path)


def no_space(path: Path, previous: str) -> OSError:
    """The error of a write to `path` that ran out of space; `previous`: what it would have
    replaced, intact if it exists."""
    kept = f"{previous} is intact" if path.exists() else "nothing was kept"
    return OSError(errno.ENOSPC, f"no space left on device writing {path} ({kept})")


def disk_full(err: BaseException, directory: Path) -> bool:
    """Whether a failed write ran out of space: an ENOSPC anywhere in its chain, or (torch.save
    and safetensors raise their own errors, with no errno) less than 1 MiB left where it wrote."""
    cause: BaseException | None = err
    while cause is not None:
        if getattr(cause, "errno", None) == errno.ENOSPC:
            return True
        cause = cause.__cause__ or cause.__context__
    try:
        return shutil.disk_usage(directory).free < 2**20
    except OSError:
        return False


def write_json(path: Path, data: Any) -> None:
    """`data` as indented JSON, written atomically."""
    atomic_write(path, lambda p: p.write_text(json.dumps(data, indent=2) + "\n"))
