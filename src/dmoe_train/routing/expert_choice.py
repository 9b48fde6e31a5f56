"""Expert choice: each expert takes its best tokens in a group (optionally inside block
coresets)."""

from __future__ import annotations

import torch
from torch import Tensor

from dmoe_train.routing.coresets import (
    Routing,
    _slot_weights,
    block_coreset,
    from_blocks,
    to_blocks,
)
from dmoe_train.routing.moe_spec import MoeSpec
from dmoe_train.routing.policy import RoutingPolicy


def scheduled_k(policy: RoutingPolicy, top_k: int, ratio: Tensor) -> Tensor:
    """k(r) = k_min + (k_max - k_min) * s(r) for noise levels `ratio` in [0, 1]; s is 1 for
    `static` (k = k_max), r for `linear`, 1 - r for `linear_reverse` (more experts when few
    tokens are masked) and (1 - cos(pi r)) / 2 for `cosine` (linear, eased at both ends)."""
    lo = top_k if policy.k_min is None else policy.k_min
    hi = top_k if policy.k_max is None else policy.k_max
    ratio = ratio.clamp(0.0, 1.0)
    s = {
        "static": torch.ones_like(ratio),
        "linear": ratio,
        "linear_reverse": 1.0 - ratio,
        "cosine": (1.0 - torch.cos(torch.pi * ratio)) / 2,
    }[policy.schedule]
    return lo + (hi - lo) * s


def expert_choice(selection: Tensor, capacity: Tensor, valid: Tensor) -> Tensor:
    """Which (token, expert) pairs are chosen `[G, T, E]`: in each group of T tokens every expert
    takes its `capacity[g]` best valid tokens by `selection` (-inf: not allowed; ties go to the
    earlier token). A token may be chosen by any number of experts, including none."""
    allowed = selection.masked_fill(~valid[..., None], float("-inf"))
    order = allowed.argsort(dim=-2, descending=True, stable=True)
    rank = order.argsort(dim=-2)  # each token's place in each expert's ranking
    return (rank < capacity[:, None, None]) & (allowed > float("-inf"))


def _chosen_to_slots(chosen: Tensor, scores: Tensor, renormalise: bool) -> tuple[Tensor, Tensor]:
    """`[..., E]` chosen pairs -> `ids`/`weights` `[..., slots]`, slots = the most any token has."""
    slots = max(1, int(chosen.sum(-1).max()))
    values, ids = chosen.float().topk(slots, dim=-1)
    ids = ids.masked_fill(values == 0, -1)
    return ids, _slot_weights(scores, ids, renormalise)


def route_expert_choice(
    policy: RoutingPolicy,
    scores: Tensor,
    selection: Tensor,
    valid: Tensor,
    ratio: Tensor,
    *,
    moe: MoeSpec,
) -> Routing:
    """Expert choice over `[B, L, E]`, optionally inside block coresets; `ratio` `[B, L]` is each
    position's noise level r."""
    coreset = None
    if policy.ec_coreset != "none":
        coreset = block_coreset(policy, selection, valid, moe=moe)
        per_token = from_blocks(coreset, policy.block_size, scores.shape[1])
        selection = selection.masked_fill(~per_token, float("-inf"))
    size = policy.block_size if policy.ec_group == "block" else selection.shape[1]
    groups = to_blocks(selection, size, float("-inf")).flatten(0, 1)  # [G, T, E]
    group_valid = to_blocks(valid, size, False).flatten(0, 1)
    group_ratio = to_blocks(ratio.float(), size, 0.0).flatten(0, 1)
    tokens = group_valid.sum(-1).clamp_min(1)
    r = (group_ratio * group_valid).sum(-1) / tokens
    experts = ((groups > float("-inf")) & group_valid[..., None]).any(-2).sum(-1).clamp_min(1)
    c = policy.capacity_factor * scheduled_k(policy, moe.top_k, r) * tokens / experts
    chosen = expert_choice(groups, c.round().clamp_min(1), group_valid)
    chosen = chosen.unflatten(0, (scores.shape[0], -1)).flatten(1, 2)[:, : scores.shape[1]]
    ids, weights = _chosen_to_slots(chosen, scores, moe.renormalise)
    return Routing(ids, weights, scores, coreset)
