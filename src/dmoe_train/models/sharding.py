"""FSDP2 for router fine-tuning: shard a frozen base over a device mesh and load it shard by shard.

Units: each module of fp32 master weights on its own (the router, and the experts when they
train, while the frozen base is bf16), each decoder layer, then the rest (embeddings, final norm,
head). The
model arrives on the meta device; each rank reads one whole tensor at a time and keeps its shard,
so no process ever holds the whole model.
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

from dmoe_train.models.lora import base_name
from dmoe_train.models.model_dir import read_state_dict
from dmoe_train.models.trainable import is_router_param


def owning_modules(model: nn.Module, own_unit: Callable[[str], bool]) -> list[nn.Module]:
    names = {n.rsplit(".", 1)[0] for n, _ in model.named_parameters() if own_unit(n)}
    return [model.get_submodule(n) for n in sorted(names)]


def shard_model(
    model: nn.Module, mesh: DeviceMesh, own_unit: Callable[[str], bool] = is_router_param
) -> None:
    """FSDP2 over `mesh`: a 1-D mesh shards across all ranks; a 2-D (nodes x GPUs) mesh shards
    within a node and replicates across nodes (HSDP), keeping all-gathers on the fast links. The
    modules owning the weights `own_unit` names are units of their own."""
    for module in [*owning_modules(model, own_unit), *model.model.layers, model]:
        fully_shard(module, mesh=mesh)


@torch.no_grad()
def load_shards(model: nn.Module, path: str | Path, device: torch.device) -> None:
    """Materialise a sharded meta model on `device` and copy in this rank's piece of each tensor
    of the checkpoint at `path`, one whole tensor at a time (names and shapes are checked)."""
    model.to_empty(device=device)
    params = {base_name(n): p for n, p in model.named_parameters()}

    def place(name: str, whole: torch.Tensor) -> torch.Tensor:
        assign_shard(params[name], whole)
        return params[name]

    read_state_dict(model, Path(path), None, "cpu", place)


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
