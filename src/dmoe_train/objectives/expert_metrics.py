"""Expert-usage metrics computed from routing results."""

from __future__ import annotations

import torch
from torch import Tensor

from dmoe_train.routing import Routing, to_blocks


def unique_experts_per_block(ids: Tensor, block_size: int, valid: Tensor | None = None) -> Tensor:
    """Distinct experts per block of valid positions: `ids` `[B, L, k]` -> `[B, n_blocks]`.

    Ids of -1 (empty slots) and padded positions (`valid` False) are not counted.
    """
    if valid is not None:
        ids = ids.masked_fill(~valid.bool()[..., None], -1)
    blocks = to_blocks(ids, block_size, -1).flatten(-2).sort(dim=-1).values
    changes = (blocks[..., 1:] != blocks[..., :-1]).sum(-1) + 1
    return changes - (blocks[..., 0] == -1).long()


def expert_load(ids: Tensor, num_experts: int, valid: Tensor | None = None) -> Tensor:
    """Tokens each expert processes `[E]`, among valid positions (empty slots not counted)."""
    if valid is not None:
        ids = ids.masked_fill(~valid.bool()[..., None], -1)
    return torch.bincount(ids[ids >= 0].flatten(), minlength=num_experts)


def load_balance_cv(load: Tensor) -> Tensor:
    """Coefficient of variation of tokens per expert (std / mean over experts; 0 = balanced)."""
    load = load.float()
    return load.std(-1, correction=0) / load.mean(-1).clamp_min(torch.finfo(load.dtype).tiny)


def routing_stats(routing: list[Routing], block_size: int) -> dict[str, Tensor]:
    """Unique experts per block and coreset size, means over MoE layers, samples and blocks."""
    unique = torch.stack(
        [unique_experts_per_block(r.ids, block_size).float().mean() for r in routing]
    ).mean()
    coresets = [r.coreset.sum(-1).float().mean() for r in routing if r.coreset is not None]
    return {
        "unique_experts": unique,
        "coreset_size": torch.stack(coresets).mean() if coresets else unique,
    }
