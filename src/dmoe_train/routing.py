"""Routing policies as small pure tensor functions.

Shapes: `scores` are a token's router scores `[..., E]` (sigmoid or softmax of fp32 logits);
block functions take `[..., T, E]` for one block of T tokens. Expert ids of -1 mark an empty slot:
a token whose coreset holds fewer than `top_k` experts takes all of them and leaves the rest
empty; under expert choice a token has as many slots as the most-chosen token of the batch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import torch
from torch import Tensor

PolicyName = Literal["token", "topk_cap", "des_vote", "capacity_max", "topp", "expert_choice"]
POLICIES: tuple[str, ...] = (
    "token",
    "topk_cap",
    "des_vote",
    "capacity_max",
    "topp",
    "expert_choice",
)
SCHEDULES = ("static", "linear", "linear_reverse", "cosine")
EC_GROUPS = ("block", "sequence")
EC_CORESETS = ("none", "topp", "capacity")


@dataclass(frozen=True)
class RoutingPolicy:
    """How a MoE layer picks experts. `token` is the published model's own per-token routing.

    - `topk_cap`: per-token routing with `top_k` lowered (default: half the model's k).
    - `des_vote`: block coreset of `capacity` experts by summed top-k-masked scores (DES-Vote).
    - `capacity_max`: block coreset of `capacity` experts by max score over tokens (LLaDA2.2).
    - `topp`: block coreset by top-p of the block's aggregated distribution (dMoE).
    - `expert_choice`: in each group (`ec_group`: the block, or the whole sequence) each expert
      takes its top-c tokens, c = max(1, round(capacity_factor * k(r) * T / E)); k(r) moves from
      `k_min` to `k_max` (default: the model's k) with the noise level r by `schedule`.
      `ec_coreset`: first restrict each block to a coreset (`topp` or `capacity` as above, by
      max aggregation), then E counts the coreset's experts.
    """

    name: PolicyName = "token"
    block_size: int = 32
    top_p: float = 0.6
    min_experts: int = 16
    capacity: int = 48
    top_k: int | None = None
    capacity_factor: float = 1.0
    k_min: int | None = None
    k_max: int | None = None
    schedule: str = "static"
    ec_group: str = "block"
    ec_coreset: str = "none"

    def __post_init__(self) -> None:
        for key in ("block_size", "min_experts", "capacity", "top_p", "capacity_factor"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"router.{key}={value!r}: must be a number")
        if self.name not in POLICIES:
            raise ValueError(f"router.name={self.name!r}: must be one of {POLICIES}")
        if self.block_size < 1:
            raise ValueError(f"router.block_size={self.block_size}: must be >= 1")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"router.top_p={self.top_p}: must be in (0, 1]")
        if self.min_experts < 0:
            raise ValueError(f"router.min_experts={self.min_experts}: must be >= 0")
        if self.capacity < 1:
            raise ValueError(f"router.capacity={self.capacity}: must be >= 1")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"router.top_k={self.top_k}: must be >= 1")
        if self.capacity_factor <= 0:
            raise ValueError(f"router.capacity_factor={self.capacity_factor}: must be > 0")
        for key, allowed in (
            ("schedule", SCHEDULES),
            ("ec_group", EC_GROUPS),
            ("ec_coreset", EC_CORESETS),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(f"router.{key}={getattr(self, key)!r}: must be one of {allowed}")
        lo, hi = self.k_min, self.k_max
        if (lo is not None and lo < 0) or (hi is not None and hi < 1):
            raise ValueError(f"router.k_min={lo}, k_max={hi}: need k_min >= 0 and k_max >= 1")
        if lo is not None and hi is not None and lo > hi:
            raise ValueError(f"router.k_min={lo} > router.k_max={hi}")

    @property
    def uses_blocks(self) -> bool:
        return self.name in ("des_vote", "capacity_max", "topp", "expert_choice")

    @property
    def coreset_kind(self) -> str:
        """How a block picks its coreset: `topp`, `sum`/`max` capacity, or `none`."""
        if self.name == "expert_choice":
            return {"capacity": "max"}.get(self.ec_coreset, self.ec_coreset)
        return {"topp": "topp", "des_vote": "sum", "capacity_max": "max"}.get(self.name, "none")

    def check_against(self, num_experts: int, top_k: int) -> None:
        """Validate the settings that depend on the model's expert count and k."""
        coreset = self.coreset_kind
        if coreset == "topp" and not top_k <= self.min_experts <= num_experts:
            raise ValueError(
                f"router.min_experts={self.min_experts}: must be in "
                f"[top_k={top_k}, num_experts={num_experts}]"
            )
        if coreset in ("sum", "max") and not top_k <= self.capacity <= num_experts:
            raise ValueError(
                f"router.capacity={self.capacity}: must be in "
                f"[top_k={top_k}, num_experts={num_experts}]"
            )
        if self.name == "topk_cap" and self.top_k is not None and self.top_k > top_k:
            raise ValueError(f"router.top_k={self.top_k}: topk_cap must not exceed k={top_k}")

    def to_dict(self) -> dict:
        return asdict(self)


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


def _group_rank(selection: Tensor, n_group: int) -> Tensor:
    """Rank `[..., G]` of each group by its top-2 score sum (0 = best)."""
    grouped = selection.unflatten(-1, (n_group, -1))
    group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
    order = group_score.argsort(dim=-1, descending=True, stable=True)
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


def token_topk(
    scores: Tensor,
    expert_bias: Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalise: bool = True,
) -> tuple[Tensor, Tensor]:
    """The published per-token routing: group-limited top-k on scores + bias; the weights are
    the unbiased scores of the chosen experts (the model scales them)."""
    selection = scores if expert_bias is None else scores + expert_bias
    return _topk(scores, group_limited(selection, n_group, topk_group), top_k, renormalise)


def route_in_coreset(
    scores: Tensor,
    expert_bias: Tensor | None,
    coreset: Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalise: bool = True,
) -> tuple[Tensor, Tensor]:
    """Each token takes its top-k among its block's coreset (`coreset` `[..., E]` per token).

    The rule for group-limited routing: groups are ranked by the token's own unrestricted group
    scores (what the pretrained router prefers); the token keeps its `topk_group` best groups and
    then further groups, in that order, until the kept groups hold `top_k` coreset experts. So a
    token never picks an expert outside the coreset (restricting first and then falling back to
    the full expert set is the known failure), and with the coreset = the union of the tokens'
    own choices every token keeps exactly its own experts. A coreset smaller than `top_k` gives
    the token all of it and empty (-1) slots.
    """
    selection = scores if expert_bias is None else scores + expert_bias
    allowed = coreset
    if n_group > 1 and topk_group < n_group:
        rank = _group_rank(selection, n_group)
        in_group = coreset.unflatten(-1, (n_group, -1)).sum(-1)
        # coreset experts held by strictly better-ranked groups, in the token's group order
        by_rank = torch.zeros_like(in_group).scatter(-1, rank, in_group)
        before = (by_rank.cumsum(-1) - by_rank).gather(-1, rank)
        kept = (rank < topk_group) | (before < top_k)
        allowed = coreset & _expand_groups(kept, selection)
    return _topk(scores, selection.masked_fill(~allowed, float("-inf")), top_k, renormalise)


def _topk_mass(block_scores: Tensor, top_k: int, valid: Tensor | None) -> tuple[Tensor, Tensor]:
    """Each valid token keeps its own top-k scores (others 0); returns the kept mass `[..., T, E]`
    (negative biased scores count 0) and which experts the token picked."""
    values, ids = block_scores.topk(top_k, dim=-1)
    picked = torch.zeros_like(block_scores, dtype=torch.bool).scatter(-1, ids, values > -torch.inf)
    if valid is not None:
        picked &= valid.unsqueeze(-1)
    mass = torch.zeros_like(block_scores).scatter(-1, ids, values.clamp_min(0.0))
    return mass.masked_fill(~picked, 0.0), picked


def topp_coreset(
    block_scores: Tensor,
    top_k: int,
    top_p: float,
    min_experts: int,
    valid: Tensor | None = None,
) -> Tensor:
    """dMoE coreset `[..., E]` of one block `[..., T, E]`: the top-p of the block's distribution.

    The distribution is the sum over valid tokens of their top-k-masked scores, normalised. Experts
    are kept in descending mass while the cumulative mass before them is <= top_p (so the first
    one crossing top_p is kept, and the top expert always is); experts no token picked are never
    kept, so top_p = 1 gives the union of the tokens' top-k. Below `min_experts`, the
    `min_experts` heaviest are kept instead.
    """
    mass, picked = _topk_mass(block_scores, top_k, valid)
    block_mass = mass.sum(-2)
    block_picked = picked.any(-2)
    if top_p >= 1.0:
        keep = block_picked
    else:
        dist = block_mass / block_mass.sum(-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)
        sorted_p, order = dist.sort(dim=-1, descending=True, stable=True)
        keep_sorted = (sorted_p.cumsum(-1) - sorted_p) <= top_p
        keep_sorted[..., 0] = True
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted) & block_picked
    if min_experts > 0:
        # ties in mass (e.g. unpicked experts at 0) break by the highest raw score in the block
        strongest = _top_experts(block_mass, block_scores, min_experts, valid)
        keep = torch.where(keep.sum(-1, keepdim=True) < min_experts, strongest, keep)
    return keep


def _top_experts(block_agg: Tensor, block_scores: Tensor, n: int, valid: Tensor | None) -> Tensor:
    """The `n` experts with the largest `block_agg`, ties broken by the block's max score."""
    scores = (
        block_scores if valid is None else block_scores.masked_fill(~valid[..., None], -torch.inf)
    )
    by_score = scores.amax(-2).argsort(dim=-1, descending=True, stable=True)
    by_agg = block_agg.gather(-1, by_score).argsort(dim=-1, descending=True, stable=True)
    ids = by_score.gather(-1, by_agg)[..., :n]
    return torch.zeros_like(block_agg, dtype=torch.bool).scatter(-1, ids, True)


def capacity_coreset(
    block_scores: Tensor,
    capacity: int,
    aggregate: Literal["max", "sum"],
    top_k: int | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """Fixed-size coreset `[..., E]`: the `capacity` best experts of one block `[..., T, E]`.

    `max`: an expert's block score is its best token score (LLaDA2.2 token racing).
    `sum`: the sum of the tokens' top-k-masked scores (DES-Vote); needs `top_k`.
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
        agg = _topk_mass(block_scores, top_k, valid)[0].sum(-2)
    else:
        raise ValueError(f"capacity_coreset aggregate={aggregate!r}: must be 'max' or 'sum'")
    ids = agg.topk(min(capacity, agg.shape[-1]), dim=-1).indices
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


def block_coreset(policy: RoutingPolicy, selection: Tensor, top_k: int, valid: Tensor) -> Tensor:
    """The coreset `[B, n_blocks, E]` of every block of `selection` `[B, L, E]` under `policy`."""
    blocks = to_blocks(selection, policy.block_size, float("-inf"))
    block_valid = to_blocks(valid, policy.block_size, False)
    if policy.coreset_kind == "topp":
        return topp_coreset(blocks, top_k, policy.top_p, policy.min_experts, block_valid)
    return capacity_coreset(blocks, policy.capacity, policy.coreset_kind, top_k, block_valid)


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
    top_k: int,
    valid: Tensor,
    ratio: Tensor,
    renormalise: bool,
) -> Routing:
    """Expert choice over `[B, L, E]`, optionally inside block coresets; `ratio` `[B, L]` is each
    position's noise level r."""
    coreset = None
    if policy.ec_coreset != "none":
        coreset = block_coreset(policy, selection, top_k, valid)
        per_token = from_blocks(coreset, policy.block_size, scores.shape[1])
        selection = selection.masked_fill(~per_token, float("-inf"))
    size = policy.block_size if policy.ec_group == "block" else selection.shape[1]
    groups = to_blocks(selection, size, float("-inf")).flatten(0, 1)  # [G, T, E]
    group_valid = to_blocks(valid, size, False).flatten(0, 1)
    group_ratio = to_blocks(ratio.float(), size, 0.0).flatten(0, 1)
    tokens = group_valid.sum(-1).clamp_min(1)
    r = (group_ratio * group_valid).sum(-1) / tokens
    experts = ((groups > float("-inf")) & group_valid[..., None]).any(-2).sum(-1).clamp_min(1)
    c = policy.capacity_factor * scheduled_k(policy, top_k, r) * tokens / experts
    chosen = expert_choice(groups, c.round().clamp_min(1), group_valid)
    chosen = chosen.unflatten(0, (scores.shape[0], -1)).flatten(1, 2)[:, : scores.shape[1]]
    ids, weights = _chosen_to_slots(chosen, scores, renormalise)
    return Routing(ids, weights, scores, coreset)


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
        return route_expert_choice(policy, scores, selection, top_k, valid, ratio, renormalise)
    coreset = block_coreset(policy, group_limited(selection, n_group, topk_group), top_k, valid)
    per_token = from_blocks(coreset, policy.block_size, scores.shape[1])
    ids, weights = route_in_coreset(
        scores, expert_bias, per_token, top_k, n_group, topk_group, renormalise
    )
    return Routing(ids, weights, scores, coreset)
