"""Placing a base that does not fit one device, with accelerate's big-model utilities."""

from __future__ import annotations

from pathlib import Path

from accelerate import dispatch_model, infer_auto_device_map
from torch import nn


def parse_max_memory(spec: str) -> dict[int | str, str]:
    """`"0:70GiB;1:70GiB;cpu:200GiB"` -> accelerate's `max_memory` (GPU indices as ints)."""
    out: dict[int | str, str] = {}
    for part in filter(None, spec.split(";")):
        device, sep, size = part.partition(":")
        if not sep or not size:
            raise ValueError(
                f"max_memory={spec!r}: need device:size entries, e.g. 0:70GiB;cpu:1TiB"
            )
        out[int(device) if device.isdigit() else device] = size
    return out


def place_model(
    model: nn.Module, max_memory: dict[int | str, int | str], offload_dir: str | Path | None = None
) -> nn.Module:
    """Spread `model` (loaded on the CPU) over the devices of `max_memory` in order, GPUs first,
    then CPU memory, then disk (`offload_dir`), whole decoder layers on one device each; weights
    on CPU or disk are brought to the execution device for each forward. Returns the model."""
    device_map = infer_auto_device_map(
        model, max_memory=max_memory, no_split_module_classes=["DecoderLayer"]
    )
    if "disk" in device_map.values() and offload_dir is None:
        raise ValueError(f"max_memory={max_memory}: the map offloads to disk but no offload_dir")
    gpus = [d for d in device_map.values() if isinstance(d, int)]
    main = f"cuda:{gpus[0]}" if gpus else "cpu"
    return dispatch_model(model, device_map, main_device=main, offload_dir=offload_dir)
