"""What one MoE layer's router does with its scores under a policy: `route`."""

from __future__ import annotations

import torch
from torch import Tensor

from dmoe_train.routing.coresets import (
    Routing,
    block_coreset,
    from_blocks,
    route_in_coreset,
    token_topk,
)
from dmoe_train.routing.expert_choice import route_expert_choice
from dmoe_train.routing.policy import RoutingPolicy


def route(
    policy: RoutingPolicy,
    scores: Tensor,
    expert_bias: Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    valid: Tensor | None = None,
    ratio: Tensor | None = None,
    renormalise: bool = True,
) -> Routing:
    """Apply `policy` to router scores `[B, L, E]`; `valid` `[B, L]` marks non-padded positions,
    `ratio` `[B, L]` each position's noise level (the mask ratio; expert choice's schedules)."""
    if policy.name == "token":
        ids, weights = token_topk(scores, expert_bias, top_k, n_group, topk_group, renormalise)
        return Routing(ids, weights, scores)
    if policy.name == "topk_cap":
        capped = policy.top_k if policy.top_k is not None else max(1, top_k // 2)
        ids, weights = token_topk(scores, expert_bias, capped, n_group, topk_group, renormalise)
        return Routing(ids, weights, scores)
    if valid is None:
        valid = scores.new_ones(scores.shape[:2], dtype=torch.bool)
    selection = scores if expert_bias is None else scores + expert_bias
    if policy.name == "expert_choice":
        ratio = scores.new_zeros(scores.shape[:2]) if ratio is None else ratio
        return route_expert_choice(
            policy, scores, selection, top_k, n_group, topk_group, valid, ratio, renormalise
        )
    coreset = block_coreset(policy, selection, top_k, n_group, topk_group, valid)
    per_token = from_blocks(coreset, policy.block_size, scores.shape[1])
    ids, weights = route_in_coreset(
        scores, expert_bias, per_token, top_k, n_group, topk_group, renormalise, policy.in_coreset
    )
    return Routing(ids, weights, scores, coreset)
