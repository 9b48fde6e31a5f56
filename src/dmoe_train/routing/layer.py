"""What one MoE layer's router does with its scores under a policy: `route`."""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import Tensor

from dmoe_train.routing.coresets import (
    Routing,
    block_coreset,
    from_blocks,
    route_in_coreset,
    selection_scores,
    token_topk,
)
from dmoe_train.routing.expert_choice import route_expert_choice
from dmoe_train.routing.moe_spec import MoeSpec
from dmoe_train.routing.policy import RoutingPolicy


def route(
    policy: RoutingPolicy,
    scores: Tensor,
    *,
    moe: MoeSpec,
    expert_bias: Tensor | None = None,
    valid: Tensor | None = None,
    ratio: Tensor | None = None,
) -> Routing:
    """Apply `policy` to router scores `[B, L, E]` of the layer `moe`; `valid` `[B, L]` marks
    non-padded positions, `ratio` `[B, L]` each position's noise level (the mask ratio; expert
    choice's schedules)."""
    if policy.name in ("token", "topk_cap"):
        if policy.name == "topk_cap":
            moe = replace(moe, top_k=policy.top_k or max(1, moe.top_k // 2))
        return Routing(*token_topk(scores, expert_bias, moe=moe), scores)
    if valid is None:
        valid = scores.new_ones(scores.shape[:2], dtype=torch.bool)
    selection = selection_scores(scores, expert_bias)
    if policy.name == "expert_choice":
        ratio = scores.new_zeros(scores.shape[:2]) if ratio is None else ratio
        return route_expert_choice(policy, scores, selection, valid, ratio, moe=moe)
    coreset = block_coreset(policy, selection, valid, moe=moe)
    per_token = from_blocks(coreset, policy.block_size, scores.shape[1])
    ids, weights = route_in_coreset(
        scores, expert_bias, per_token, moe=moe, in_coreset=policy.in_coreset
    )
    return Routing(ids, weights, scores, coreset)
