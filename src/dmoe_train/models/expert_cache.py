"""Routed experts off the device: each MoE layer's experts live in a host store (CPU memory, or
the checkpoint's safetensors read one expert's tensors at a time) and at most `capacity` of them
are resident, least recently used out first. A block policy's coreset is made resident at once,
right after the router; token routing asks for whatever its tokens chose (and thrashes when that
exceeds the capacity: the comparison). Compute only ever reads resident experts, in parts when
one forward needs more than fit, and the parts add up to the all-resident result exactly.
"""

from __future__ import annotations

import json
import os
import struct
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, get_args

import torch
from torch import Tensor, nn

from dmoe_train.models.checkpoint_names import INDEX, SINGLE, rename
from dmoe_train.models.grouped_experts import expert_rows
from dmoe_train.models.lora import has_expert_lora
from dmoe_train.models.moe import SparseMoe

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
ExpertStoreKind = Literal["memory", "disk"]


class ExpertStore(Protocol):
    def read(self, expert: int) -> tuple[Tensor, Tensor, Tensor]:
        """One expert's gate `[I, H]`, up `[I, H]` and down `[H, I]` weights."""
        ...


class MemoryStore:
    """A layer's stacked experts kept in host memory."""

    def __init__(self, stacked: tuple[Tensor, Tensor, Tensor]) -> None:
        self.stacked = tuple(t.detach().to("cpu") for t in stacked)

    def read(self, expert: int) -> tuple[Tensor, Tensor, Tensor]:
        return tuple(t[expert] for t in self.stacked)


# safetensors' dtype names (its header) -> torch dtypes
DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


class SafetensorsFile:
    """Rows of a safetensors file's tensors read with `os.pread` at the offsets its header gives:
    no memory map, so what a read touched is the kernel's page cache, not this process's memory
    (a map would hold every expert page it ever read in the process's resident set)."""

    def __init__(self, path: Path) -> None:
        self.path, self.fd = path, os.open(path, os.O_RDONLY)
        (length,) = struct.unpack("<Q", os.pread(self.fd, 8, 0))
        self.header = json.loads(os.pread(self.fd, length, 8))
        self.header.pop("__metadata__", None)
        self.data_start = 8 + length

    def keys(self) -> list[str]:
        return list(self.header)

    def read(self, name: str, row: int | None = None) -> Tensor:
        """Tensor `name`, or its row `row` along the first dimension."""
        info = self.header[name]
        dtype, shape = DTYPES[info["dtype"]], info["shape"]
        start, end = info["data_offsets"]
        if row is not None:
            if not 0 <= row < shape[0]:
                raise IndexError(f"{self.path}: {name} has {shape[0]} rows, asked for row {row}")
            size = (end - start) // shape[0]
            start, end, shape = start + row * size, start + (row + 1) * size, shape[1:]
        data = bytearray(os.pread(self.fd, end - start, self.data_start + start))
        if len(data) != end - start:  # a truncated file (or a read past 2 GiB, which Linux cuts)
            raise OSError(f"{self.path}: {name}: read {len(data)} of {end - start} bytes")
        return (
            torch.frombuffer(data, dtype=dtype).view(shape)
            if data
            else torch.empty(shape, dtype=dtype)
        )

    def __del__(self) -> None:
        os.close(self.fd)


class DiskStore:
    """A layer's experts read from the model directory's safetensors on demand: one expert's
    tensors (split layout), or its row of the stacked tensor (merged layout), never the whole
    layer."""

    def __init__(self, model_dir: Path, prefix: str, published: tuple[tuple[str, str], ...]):
        self.names = {p: rename(f"{prefix}.{p}", published) for p in PROJECTIONS}
        self.files: dict[Path, SafetensorsFile] = {}  # opened when first read
        if (model_dir / INDEX).is_file():
            weight_map = json.loads((model_dir / INDEX).read_text())["weight_map"]
            self.file_of = {n: model_dir / f for n, f in weight_map.items()}
        else:
            single = self.files[model_dir / SINGLE] = SafetensorsFile(model_dir / SINGLE)
            self.file_of = dict.fromkeys(single.keys(), model_dir / SINGLE)

    def _file(self, name: str) -> SafetensorsFile:
        path = self.file_of[name]
        if path not in self.files:
            self.files[path] = SafetensorsFile(path)
        return self.files[path]

    def read(self, expert: int) -> tuple[Tensor, Tensor, Tensor]:
        out = []
        for stacked in self.names.values():
            prefix, _, proj = stacked.rpartition(".")
            split = f"{prefix}.{expert}.{proj}.weight"
            if split in self.file_of:
                out.append(self._file(split).read(split))
            else:
                out.append(self._file(stacked).read(stacked, row=expert))
        return tuple(out)


@dataclass
class CacheStats:
    """What one layer's cache did. A hit is `within_block` when the expert was last used by an
    earlier forward of the same decoding block, else `across_blocks`."""

    loads: int = 0
    hits_within_block: int = 0
    hits_across_blocks: int = 0
    bytes_loaded: int = 0
    peak_resident: int = 0  # experts
    block: int = 0  # the decoding block now being decoded (`begin_block`)
    last_block: dict[int, int] = field(default_factory=dict)  # expert -> block it was last used


class ResidentExperts:
    """At most `capacity` experts of one layer in device buffers `[capacity, ...]`."""

    def __init__(self, store: ExpertStore, num_experts: int, capacity: int, like: Tensor):
        if capacity < 1:
            raise ValueError(f"generation.expert_cache={capacity}: must be >= 1 or 'all'")
        gate, up, down = store.read(0)
        self.store, self.num_experts, self.capacity = store, num_experts, capacity
        self.buffers = tuple(
            torch.empty(capacity, *w.shape, dtype=like.dtype, device=like.device)
            for w in (gate, up, down)
        )
        self.expert_bytes = sum(b[0].numel() * b.element_size() for b in self.buffers)
        self.slot_of: OrderedDict[int, int] = OrderedDict()  # least recently used first
        self.stats = CacheStats()

    def begin_block(self, block: int) -> None:
        """The decoder starts block `block`: later hits count as across blocks."""
        self.stats.block = block

    def make_resident(self, experts: list[int]) -> None:
        """Load the missing ones of `experts` (at most `capacity`), evicting the least recently
        used of the others."""
        wanted, s = set(experts), self.stats
        for e in experts:
            if e in self.slot_of:
                self.slot_of.move_to_end(e)
                if s.last_block.get(e) == s.block:
                    s.hits_within_block += 1
                else:
                    s.hits_across_blocks += 1
            else:
                if len(self.slot_of) < self.capacity:
                    slot = len(self.slot_of)
                else:
                    old = next(o for o in self.slot_of if o not in wanted)
                    slot = self.slot_of.pop(old)
                for buffer, weight in zip(self.buffers, self.store.read(e), strict=True):
                    buffer[slot].copy_(weight)
                self.slot_of[e] = slot
                s.loads += 1
                s.bytes_loaded += self.expert_bytes
            s.last_block[e] = s.block
        s.peak_resident = max(s.peak_resident, len(self.slot_of))

    def run(self, x: Tensor, ids: Tensor, weights: Tensor, coreset: Tensor | None) -> Tensor:
        """`expert_mlp` over the resident experts: `x` `[N, H]`, `ids`/`weights` `[N, k]`;
        `coreset` `[..., E]` (a block policy's): made resident first when it fits."""
        needed = ids.unique()
        needed = needed[needed >= 0].tolist()
        if coreset is not None:
            pool = coreset.reshape(-1, self.num_experts).any(0).nonzero().flatten().tolist()
            if len(pool) <= self.capacity:
                self.make_resident(pool)
        rows = x.new_zeros(ids.numel(), x.shape[1])
        for start in range(0, len(needed), self.capacity):
            part = needed[start : start + self.capacity]
            self.make_resident(part)
            slot = torch.full((self.num_experts,), -1, dtype=torch.long, device=ids.device)
            slot[part] = torch.tensor([self.slot_of[e] for e in part], device=ids.device)
            slot_ids = torch.where(ids >= 0, slot[ids.clamp_min(0)], -1)
            rows += expert_rows(x, slot_ids, weights, *self.buffers)  # 0 + row: exact
        return rows.view(*ids.shape, -1).sum(1)


def resident_caches(model: nn.Module) -> list[ResidentExperts]:
    """The model's expert caches, in layer order (none when every expert is resident)."""
    return [
        m.compute
        for m in model.modules()
        if isinstance(m, SparseMoe) and isinstance(m.compute, ResidentExperts)
    ]


def offload_experts(
    model: nn.Module,
    capacity: int,
    store: ExpertStoreKind = "memory",
    model_dir: Path | None = None,
) -> list[ResidentExperts]:
    """Move every MoE layer's routed experts into a host store (`memory`, or `disk`: read back
    from `model_dir`'s safetensors) and keep at most `capacity` per layer resident on the model's
    device; the experts' own parameters are freed."""
    if store not in get_args(ExpertStoreKind):
        raise ValueError(f"generation.expert_store={store!r}: must be one of memory, disk")
    if store == "disk" and model_dir is None:
        raise ValueError("generation.expert_store=disk: the model has no directory to read from")
    if has_expert_lora(model):
        raise ValueError(
            "generation.expert_cache: the experts carry unmerged adapters; decode the model "
            "dmoe-export wrote (adapters merged) instead"
        )
    caches = []
    for name, moe in model.named_modules():
        if not isinstance(moe, SparseMoe):
            continue
        experts = moe.experts
        stacked = tuple(getattr(experts, p) for p in PROJECTIONS)
        # experts never loaded (`load_model(expert_cache=...)`) are on the meta device: the
        # resident buffers take the embedding's dtype and device
        like = model.get_input_embeddings().weight if stacked[0].is_meta else stacked[0]
        if store == "memory" and stacked[0].is_meta:
            raise ValueError("generation.expert_store=memory: the experts were never loaded")
        if store == "memory":
            host: ExpertStore = MemoryStore(stacked)
        else:
            host = DiskStore(Path(model_dir), f"{name}.experts", model.published_names)
        moe.use_compute(ResidentExperts(host, moe.config.moe.num_experts, capacity, like))
        for p in PROJECTIONS:  # freed: the store (or the disk) holds them now
            setattr(experts, p, nn.Parameter(like.new_empty(0), requires_grad=False))
        caches.append(moe.compute)
    return caches
