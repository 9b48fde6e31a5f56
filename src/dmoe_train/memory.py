"""This process's memory, measured: what training and decoding report as their peak."""

from __future__ import annotations

import re
import resource
from pathlib import Path

import torch


def resident_bytes(key: str = "VmHWM") -> int:
    """This process's resident memory: its peak (`VmHWM`, which an exec resets) or now (`VmRSS`),
    from Linux's /proc; elsewhere the peak, ru_maxrss (in bytes on macOS)."""
    status = Path("/proc/self/status")
    if status.is_file():
        return int(re.search(rf"{key}:\s+(\d+) kB", status.read_text())[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory: the CUDA allocator's peak on a GPU, else the peak resident
    set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resident_bytes("VmHWM")
