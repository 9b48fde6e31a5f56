"""FSDP2 for router fine-tuning: shard a frozen base over a device mesh and load it shard by shard.

Units: each module of fp32 master weights on its own (the router, and the experts when they
train, while the frozen base is bf16), each decoder layer, then the rest (embeddings, final norm,
head). The model arrives on the meta device; each rank reads one whole tensor at a time and
keeps its shard, so no process ever holds the whole model.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from dmoe_train.models.families.diffusion_gemma import layer_pairs
from dmoe_train.models.lora import base_name, is_lora_param
from dmoe_train.models.model_dir import iter_tensors, read_state_dict
from dmoe_train.models.routing_control import is_canvas_model
from dmoe_train.models.trainable import is_router_param


def owning_modules(model: nn.Module, own_unit: Callable[[str], bool]) -> list[list[nn.Module]]:
    """The modules holding the weights `own_unit` names, one group per tensor's holders (tied
    layers hold one tensor in several modules: FSDP2 shards it once, in one unit), innermost
    first: a unit must exist before the unit around it."""
    holders: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            holders.setdefault(id(p), []).append(module)
    paths = {id(m): n for n, m in model.named_modules()}
    groups = {
        tuple(map(id, holders[id(p)])): holders[id(p)]
        for n, p in model.named_parameters()
        if own_unit(n)
    }
    return sorted(groups.values(), key=lambda g: (-paths[id(g[0])].count("."), paths[id(g[0])]))


def layer_units(model: nn.Module) -> list[nn.Module | list[nn.Module]]:
    """One unit per decoder layer; DiffusionGemma's encoder and decoder layer i share one unit
    (their weights are one set), gathered from the encoder's forward to the decoder's."""
    if is_canvas_model(model):
        return layer_pairs(model)
    return list(model.model.layers)


def shard_model(
    model: nn.Module, mesh: DeviceMesh, own_unit: Callable[[str], bool] = is_router_param
) -> None:
    """FSDP2 over `mesh`: a 1-D mesh shards across all ranks; a 2-D (nodes x GPUs) mesh shards
    within a node and replicates across nodes (HSDP), keeping all-gathers on the fast links. The
    modules owning the weights `own_unit` names are units of their own."""
    for unit in [*owning_modules(model, own_unit), *layer_units(model), model]:
        fully_shard(unit, mesh=mesh)


@torch.no_grad()
def load_shards(model: nn.Module, path: str | Path, device: torch.device) -> None:
    """Materialise a sharded meta model on `device` and copy in this rank's piece of each tensor
    of the checkpoint at `path`, one whole tensor at a time (names and shapes are checked).
    Buffers built with the model (computed, not read) keep their values."""
    computed = {n: b.clone() for n, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    for name, value in computed.items():
        model.get_buffer(name).copy_(value)
    if is_canvas_model(model):
        _read_by_name(model, Path(path))
        return
    params = {base_name(n): p for n, p in model.named_parameters()}

    def place(name: str, whole: torch.Tensor) -> torch.Tensor:
        assign_shard(params[name], whole)
        return params[name]

    read_state_dict(model, Path(path), None, "cpu", place)


def _read_by_name(model: nn.Module, path: Path) -> None:
    """A checkpoint written by transformers' `save_pretrained`: each tensor under one of the
    names of its (possibly tied) parameter or buffer; every parameter but the adapters read."""
    params = {
        base_name(n): p
        for n, p in model.named_parameters(remove_duplicate=False)
        if not is_lora_param(n)
    }
    buffers = dict(model.named_buffers(remove_duplicate=False))
    read: set[int] = set()
    for name, whole in iter_tensors(path, "cpu"):
        target = params.get(name, buffers.get(name))
        if target is None or target.shape != whole.shape:
            found = "not the model's" if target is None else f"shape {tuple(target.shape)}"
            raise ValueError(f"model path {path}: tensor {name} {tuple(whole.shape)}: {found}")
        if name in params:
            assign_shard(target, whole)
            read.add(id(target))
        else:
            target.copy_(whole)
    missing = sorted({n for n, p in params.items() if id(p) not in read})
    if missing:
        raise ValueError(f"model path {path}: no tensor for {missing[:5]} ({len(missing)} in all)")


def assign_shard(param: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy this rank's piece of `whole` into the sharded `param`."""
    piece = distribute_tensor(  # src_data_rank=None: slice locally, no communication
        whole.to(param.device, param.dtype), param.device_mesh, param.placements, src_data_rank=None
    )
    param.to_local().copy_(piece.to_local())


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from a possibly FSDP-sharded one (a collective for a DTensor)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def gathered(params: list[nn.Parameter]) -> AbstractContextManager:
    """DeepSpeed ZeRO-3 partitions parameters: gather these for reading (else a no-op)."""
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed

        return deepspeed.zero.GatheredParameters(params)
    return nullcontext()
