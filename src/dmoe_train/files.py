"""Writes that never leave a half-written file, a full disk reported as one, files with the
user's permissions, and the differences between two JSON records."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


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
    os.chmod(tmp, file_mode())
    os.replace(tmp, path)


def file_mode() -> int:
    """The mode a plain `open(path, "w")` gives a new file under the user's umask (0644 under
    the usual 022). Some writers (safetensors, tempfile) create theirs 0600, which a serving
    engine running as another user cannot read."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def save_safetensors(
    tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None
) -> None:
    """`safetensors.torch.save_file`, with the permissions of every other file we write."""
    save_file(tensors, path, metadata=metadata)
    os.chmod(path, file_mode())


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


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as `a.b.c` keys (lists stay values)."""
    if not isinstance(tree, dict):
        return {prefix.removesuffix("."): tree}
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out |= flatten(value, f"{prefix}{key}.")
    return out


def differences(old: dict, new: dict) -> dict[str, list]:
    """`key: [old, new]` for every flattened key whose value differs between two records."""
    a, b = flatten(old), flatten(new)
    return {k: [a.get(k), b.get(k)] for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)}
