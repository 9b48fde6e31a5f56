"""Routing policies as small pure tensor functions.

Shapes: `scores` are a token's router scores `[..., E]` (sigmoid or softmax of fp32 logits);
block functions take `[..., T, E]` for one block of T tokens. Expert ids of -1 mark an empty slot:
a token whose coreset holds fewer than `top_k` experts takes all of them and leaves the rest
empty; under expert choice a token has as many slots as the most-chosen token of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from dmoe_train.routing.moe_spec import MoeSpec
from dmoe_train.routing.policy import InCoreset, RoutingPolicy


@dataclass
class Routing:
    """What one MoE layer chose: `ids`/`weights` `[B, L, slots]` (id -1 = empty slot), the fp32
    router `scores` `[B, L, E]` (differentiable, for regularizers), for block policies the
    `coreset` `[B, n_blocks, E]`, and the router `logits` (for the z-loss)."""

    ids: Tensor
    weights: Tensor
    scores: Tensor
    coreset: Tensor | None = None
    logits: Tensor | None = None


def group_limited(selection: Tensor, n_group: int, topk_group: int) -> Tensor:
    """Mask with -inf the experts outside a token's `topk_group` best groups.

    A group's score is the sum of its two best selection scores, as in the published router.
    """
    if n_group <= 1 or topk_group >= n_group:
        return selection
    kept = _group_rank(selection, n_group) < topk_group
    return selection.masked_fill(~_expand_groups(kept, selection), float("-inf"))


def _group_scores(selection: Tensor, n_group: int) -> Tensor:
    """Each group's score `[..., G]`: the sum of its two best selection scores (-inf with fewer
    than two finite ones)."""
    grouped = selection.unflatten(-1, (n_group, -1))
    return grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)


def _group_rank(selection: Tensor, n_group: int) -> Tensor:
    """Rank `[..., G]` of each group by its top-2 score sum (0 = best)."""
    order = _group_scores(selection, n_group).argsort(dim=-1, descending=True, stable=True)
    return order.argsort(dim=-1)


def _expand_groups(per_group: Tensor, like: Tensor) -> Tensor:
    n_group = per_group.shape[-1]
    return per_group.unsqueeze(-1).expand(*per_group.shape, like.shape[-1] // n_group).flatten(-2)


def _slot_weights(scores: Tensor, ids: Tensor, renormalise: bool) -> Tensor:
    """The unbiased scores of the chosen experts (id -1: weight 0), summing to 1 if `renormalise`
    (LLaDA2's norm_topk_prob; LLaDA-MoE keeps the raw softmax probabilities)."""
    weights = scores.gather(-1, ids.clamp_min(0)).masked_fill(ids < 0, 0.0)
    if renormalise:
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)
    return weights


def _topk(
    scores: Tensor, selection: Tensor, top_k: int, renormalise: bool
) -> tuple[Tensor, Tensor]:
    """Top-k of `selection` (-inf = not allowed), weighted by `_slot_weights`."""
    values, ids = selection.topk(min(top_k, selection.shape[-1]), dim=-1)
    ids = ids.masked_fill(values == float("-inf"), -1)
    return ids, _slot_weights(scores, ids, renormalise)


def selection_scores(scores: Tensor, expert_bias: Tensor | None) -> Tensor:
    """What experts are selected by: the scores plus the expert bias (weights stay unbiased)."""
    return scores if expert_bias is None else scores + expert_bias


def token_topk(
    scores: Tensor, expert_bias: Tensor | None, *, moe: MoeSpec
) -> tuple[Tensor, Tensor]:
    """The published per-token routing: group-limited top-k on scores + bias; the weights are
    the unbiased scores of the chosen experts (the model scales them)."""
    selection = group_limited(selection_scores(scores, expert_bias), moe.n_group, moe.topk_group)
    return _topk(scores, selection, moe.top_k, moe.renormalise)


def route_in_coreset(
    scores: Tensor,
    expert_bias: Tensor | None,
    coreset: Tensor,
    *,
    moe: MoeSpec,
    in_coreset: InCoreset = "ranked_groups",
) -> tuple[Tensor, Tensor]:
    """Each token takes its top-k among its block's coreset (`coreset` `[..., E]` per token), by
    the `in_coreset` rule (`RoutingPolicy`); no rule leaves the coreset. A coreset smaller than
    `top_k` gives the token all of it and empty (-1) slots.

    `ranked_groups` (ours): groups are ranked by the token's own unrestricted group scores (what
    the pretrained router prefers); the token keeps its `topk_group` best groups and then further
    groups, in that order, until the kept groups hold `top_k` coreset experts. With the coreset =
    the union of the tokens' own choices (or any superset) every token keeps exactly its own
    experts, so top_p = 1 reproduces token routing.
    """
    top_k, n_group, topk_group, renormalise = (
        moe.top_k,
        moe.n_group,
        moe.topk_group,
        moe.renormalise,
    )
    selection = selection_scores(scores, expert_bias)
    grouped = n_group > 1 and topk_group < n_group
    if in_coreset == "plain" or not grouped:
        return _topk(scores, selection.masked_fill(~coreset, float("-inf")), top_k, renormalise)
    if in_coreset == "masked_groups":
        return _masked_groups(scores, selection, coreset, top_k, n_group, topk_group, renormalise)
    rank = _group_rank(selection, n_group)
    in_group = coreset.unflatten(-1, (n_group, -1)).sum(-1)
    # coreset experts held by strictly better-ranked groups, in the token's group order
    by_rank = torch.zeros_like(in_group).scatter(-1, rank, in_group)
    before = (by_rank.cumsum(-1) - by_rank).gather(-1, rank)
    kept = (rank < topk_group) | (before < top_k)
    allowed = coreset & _expand_groups(kept, selection)
    return _topk(scores, selection.masked_fill(~allowed, float("-inf")), top_k, renormalise)


def _masked_groups(
    scores: Tensor,
    selection: Tensor,
    coreset: Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalise: bool,
) -> tuple[Tensor, Tensor]:
    """dMoE's selection inside the coreset, without its leak (`RoutingPolicy.in_coreset`)."""
    constrained = selection.masked_fill(~coreset, float("-inf"))
    group_score = _group_scores(constrained, n_group)
    # topk (not a stable sort): its order decides among -inf groups, as in dMoE
    kept_groups = group_score.topk(topk_group, dim=-1, sorted=False).indices
    kept = torch.zeros_like(group_score, dtype=torch.bool).scatter(-1, kept_groups, True)
    in_kept = _expand_groups(kept, constrained)
    values, ids = constrained.masked_fill(~in_kept, float("-inf")).topk(top_k, dim=-1)
    # dMoE would return arbitrary experts for -inf slots (the trailing ones): take the best
    # coreset experts of the other groups instead, in order
    leaked = values == float("-inf")
    fill_values, fill_ids = constrained.masked_fill(in_kept, float("-inf")).topk(top_k, dim=-1)
    slot = torch.arange(top_k, device=ids.device) - (~leaked).sum(-1, keepdim=True)
    slot = slot.clamp_min(0)
    fill_ids = fill_ids.gather(-1, slot).masked_fill(fill_values.gather(-1, slot) == -torch.inf, -1)
    ids = torch.where(leaked, fill_ids, ids)
    return ids, _slot_weights(scores, ids, renormalise)


def _votes(
    block_scores: Tensor, top_k: int, valid: Tensor | None, vote_mass: str
) -> tuple[Tensor, Tensor]:
    """Each valid token votes for its own top-k experts: returns the block's summed vote mass
    `[..., E]` (negative scores count 0 under `clamp`, as they are under `raw`) and which
    experts received a vote."""
    values, ids = block_scores.topk(top_k, dim=-1)
    picked = torch.zeros_like(block_scores, dtype=torch.bool).scatter(-1, ids, values > -torch.inf)
    if valid is not None:
        picked &= valid.unsqueeze(-1)
    kept = values.clamp_min(0.0) if vote_mass == "clamp" else values
    mass = torch.zeros_like(block_scores).scatter(-1, ids, kept).masked_fill(~picked, 0.0)
    return mass.sum(-2), picked.any(-2)


def topp_coreset(
    block_scores: Tensor,
    top_k: int,
    top_p: float,
    min_experts: int,
    valid: Tensor | None = None,
    vote_mass: str = "clamp",
    guard_ties: str = "max_score",
) -> Tensor:
    """dMoE coreset `[..., E]` of one block `[..., T, E]`: the top-p of the block's distribution.

    The distribution is the sum over valid tokens of their top-k-masked scores, normalised.
    Experts are walked in descending mass and kept unless the cumulative mass both at them and
    before them exceeds top_p (so the first one crossing top_p is kept, and the top expert
    always is). Below `min_experts`, the `min_experts` heaviest are kept instead. `vote_mass` and
    `guard_ties` as in `RoutingPolicy`.
    """
    block_mass, voted = _votes(block_scores, top_k, valid, vote_mass)
    dist = block_mass / (block_mass.sum(-1, keepdim=True) + 1e-20)
    if vote_mass == "clamp" and top_p >= 1.0:
        keep = voted  # the union, whatever the cumulative sum's rounding
    else:
        sorted_p, order = dist.sort(dim=-1, descending=True, stable=True)
        cum = sorted_p.cumsum(-1)
        cum_before = torch.cat([torch.zeros_like(cum[..., :1]), cum[..., :-1]], dim=-1)
        keep_sorted = (cum <= top_p) | (cum_before <= top_p)
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
        if vote_mass == "clamp":
            keep &= voted
    if min_experts > 0:
        if guard_ties == "topk":
            heaviest = dist.topk(min_experts, dim=-1).indices
        else:
            heaviest = _heaviest_by_max_score(dist, block_scores, min_experts, valid)
        guard = torch.zeros_like(keep).scatter(-1, heaviest, True)
        keep = torch.where(keep.sum(-1, keepdim=True) < min_experts, guard, keep)
    return keep


def _heaviest_by_max_score(
    block_agg: Tensor, block_scores: Tensor, n: int, valid: Tensor | None
) -> Tensor:
    """The ids of the `n` experts with the largest `block_agg`, ties broken by the block's max
    score."""
    scores = (
        block_scores if valid is None else block_scores.masked_fill(~valid[..., None], -torch.inf)
    )
    by_score = scores.amax(-2).argsort(dim=-1, descending=True, stable=True)
    by_agg = block_agg.gather(-1, by_score).argsort(dim=-1, descending=True, stable=True)
    return by_score.gather(-1, by_agg)[..., :n]


def capacity_coreset(
    block_scores: Tensor,
    capacity: int,
    aggregate: Literal["max", "sum"],
    top_k: int | None = None,
    valid: Tensor | None = None,
    vote_mass: str = "clamp",
) -> Tensor:
    """Fixed-size coreset `[..., E]`: the `capacity` best experts of one block `[..., T, E]`,
    ties to the lower expert id.

    `max`: an expert's block score is its best token score (LLaDA2.2's pool).
    `sum`: the tokens' summed top-k votes (DES-Vote; `vote_mass` as in `RoutingPolicy`).
    """
    if aggregate == "max":
        agg = (
            block_scores
            if valid is None
            else block_scores.masked_fill(~valid[..., None], -torch.inf)
        )
        agg = agg.amax(-2)
    elif aggregate == "sum":
        if top_k is None:
            raise ValueError("capacity_coreset(aggregate='sum') needs top_k")
        agg = _votes(block_scores, top_k, valid, vote_mass)[0]
    else:
        raise ValueError(f"capacity_coreset aggregate={aggregate!r}: must be 'max' or 'sum'")
    ids = agg.argsort(dim=-1, descending=True, stable=True)[..., :capacity]
    return torch.zeros_like(agg, dtype=torch.bool).scatter(-1, ids, True)


def to_blocks(x: Tensor, block_size: int, fill: float | bool = 0) -> Tensor:
    """`[B, L, ...]` -> `[B, n_blocks, block_size, ...]`; a partial last block is padded."""
    pad = -x.shape[1] % block_size
    if pad:
        x = torch.cat([x, x.new_full((x.shape[0], pad, *x.shape[2:]), fill)], dim=1)
    return x.unflatten(1, (-1, block_size))


def from_blocks(per_block: Tensor, block_size: int, length: int) -> Tensor:
    """`[B, n_blocks, ...]` -> `[B, length, ...]`: each position gets its block's value."""
    return per_block.repeat_interleave(block_size, dim=1)[:, :length]


def block_coreset(
    policy: RoutingPolicy, selection: Tensor, valid: Tensor, *, moe: MoeSpec
) -> Tensor:
    """The coreset `[B, n_blocks, E]` of every block of `selection` `[B, L, E]` (score + bias)
    under `policy`; `routed` votes see each token's group-limited scores."""
    if policy.vote == "routed":
        selection = group_limited(selection, moe.n_group, moe.topk_group)
    top_k = moe.top_k
    blocks = to_blocks(selection, policy.block_size, float("-inf"))
    block_valid = to_blocks(valid, policy.block_size, False)
    if policy.coreset_kind == "topp":
        return topp_coreset(
            blocks,
            top_k,
            policy.top_p,
            policy.min_experts,
            block_valid,
            policy.vote_mass,
            policy.guard_ties,
        )
    return capacity_coreset(
        blocks, policy.capacity, policy.coreset_kind, top_k, block_valid, policy.vote_mass
    )
