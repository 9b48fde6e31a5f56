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
VOTES = ("routed", "plain")
VOTE_MASSES = ("clamp", "raw")
GUARD_TIES = ("max_score", "topk")
IN_CORESET = ("ranked_groups", "masked_groups", "plain")
# the rule settings of the published block rules (and ours, the defaults); `RoutingPolicy.rule`
RULES: dict[str, dict[str, str]] = {
    "dmoe-train": dict(
        vote="routed", vote_mass="clamp", guard_ties="max_score", in_coreset="ranked_groups"
    ),
    "dmoe": dict(vote="plain", vote_mass="raw", guard_ties="topk", in_coreset="masked_groups"),
    "llada22": dict(vote="plain", in_coreset="plain"),
}
EC_GROUPS = ("block", "sequence")
EC_CORESETS = ("none", "topp", "capacity")
# the policies that route tokens inside a block coreset: where every rule setting applies
CORESET_POLICIES = ("topp", "des_vote", "capacity_max")


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

    The rule settings of block coresets (`RULES` names the published combinations; the defaults
    are ours, `dmoe-train`). A setting that does not apply to `name` is ignored.
    - `vote` (every coreset): what a token contributes to its block. `routed`: its group-limited
      top-k, the experts it would really use; `plain`: its top-k of score + bias with no group
      limit (dMoE's votes; LLaDA2.2's max over the plain biased scores).
    - `vote_mass` (sum votes: topp, des_vote): `clamp` counts a negative biased score as 0 and
      never keeps an expert no token voted for (top_p = 1 is the union of the votes); `raw` sums
      the biased scores as they are and walks top-p over all experts, as dMoE does (an unvoted
      expert, mass 0, is kept while the cumulative mass is still <= top_p; with negative biases
      the normalised distribution can change sign: reproduced, not repaired).
    - `guard_ties` (topp): when the top-p walk keeps fewer than `min_experts`, the `min_experts`
      heaviest are kept; ties in mass (unvoted experts at 0) go to the block's highest score
      (`max_score`) or to `torch.topk`'s order over the distribution (`topk`, dMoE).
    - `in_coreset` (topp, des_vote, capacity_max): how a token picks its top-k inside the
      coreset. `ranked_groups`: groups ranked by the token's unrestricted group scores, widened
      until they hold k coreset experts (see `route_in_coreset`). `masked_groups` (dMoE): group
      scores are the top-2 sums of the coreset-masked scores (a group with fewer than two coreset
      experts scores -inf), the `topk_group` best groups by `torch.topk`, then top-k in them;
      where dMoE would return experts outside the coreset (its kept groups hold fewer than k
      coreset experts), those slots take the best remaining coreset experts of the other groups
      instead, and stay empty only when the coreset has fewer than k. `plain` (LLaDA2.2): top-k
      of score + bias inside the coreset, no group step.
    Capacity coresets break ties in block score to the lower expert id (LLaDA2.2's pool).
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
    vote: str = "routed"
    vote_mass: str = "clamp"
    guard_ties: str = "max_score"
    in_coreset: str = "ranked_groups"

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
            ("vote", VOTES),
            ("vote_mass", VOTE_MASSES),
            ("guard_ties", GUARD_TIES),
            ("in_coreset", IN_CORESET),
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
        return self.name in (*CORESET_POLICIES, "expert_choice")

    @property
    def coreset_kind(self) -> str:
        """How a block picks its coreset: `topp`, `sum`/`max` capacity, or `none`."""
        if self.name == "expert_choice":
            return {"capacity": "max"}.get(self.ec_coreset, self.ec_coreset)
        return {"topp": "topp", "des_vote": "sum", "capacity_max": "max"}.get(self.name, "none")

    def rule_settings(self) -> dict[str, str]:
        """The rule settings that apply to this policy (see the class docstring)."""
        kind = self.coreset_kind
        applies = {
            "vote": kind != "none",
            "vote_mass": kind in ("topp", "sum"),
            "guard_ties": kind == "topp",
            "in_coreset": self.name in CORESET_POLICIES,
        }
        return {key: getattr(self, key) for key, used in applies.items() if used}

    @property
    def rule(self) -> str:
        """The block rule by name: `dmoe` or `llada22` where the settings are that published
        rule's, `dmoe-train` for ours, else `custom`; other policies give their name."""
        if self.name not in CORESET_POLICIES:
            return self.name
        settings = self.rule_settings()
        if self.name == "topp" and settings == RULES["dmoe"]:
            return "dmoe"
        if self.name == "capacity_max" and settings == RULES["llada22"]:
            return "llada22"
        ours = {k: v for k, v in RULES["dmoe-train"].items() if k in settings}
        return "dmoe-train" if settings == ours else "custom"

    def describe(self) -> str:
        """`name [rule: settings]`, for logs and warnings."""
        settings = ", ".join(f"{k}={v}" for k, v in self.rule_settings().items())
        return f"{self.name} [{self.rule}: {settings}]" if settings else self.name

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


ENGINE_KEYS = ("expert_capacity", "block_size", "mode", "core_threshold")


def engine_config(policy: RoutingPolicy) -> dict:
    """The top-level `config.json` keys by which a serving engine enables `policy`'s published
    rule: LLaDA2.2 in SGLang reads `expert_capacity` and `block_size`; dMoE's model code reads
    `mode` and `core_threshold` (its block size 32 and guard 16 are constants there)."""
    if policy.rule == "llada22":
        return {"expert_capacity": policy.capacity, "block_size": policy.block_size}
    if policy.rule == "dmoe":
        return {"mode": "aggregate", "core_threshold": policy.top_p}
    return {}


def policy_from_engine_config(raw: dict) -> RoutingPolicy | None:
    """The policy a published `config.json` asks its engine for (the inverse of
    `engine_config`), or None when it names no block rule."""
    if "expert_capacity" in raw and "block_size" in raw:
        return RoutingPolicy(
            "capacity_max",
            block_size=raw["block_size"],
            capacity=raw["expert_capacity"],
            **RULES["llada22"],
        )
    if raw.get("mode") == "aggregate" and "core_threshold" in raw:
        return RoutingPolicy(
            "topp", block_size=32, top_p=raw["core_threshold"], min_experts=16, **RULES["dmoe"]
        )
    return None


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
    in_coreset: str = "ranked_groups",
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
    selection = scores if expert_bias is None else scores + expert_bias
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
    policy: RoutingPolicy,
    selection: Tensor,
    top_k: int,
    n_group: int,
    topk_group: int,
    valid: Tensor,
) -> Tensor:
    """The coreset `[B, n_blocks, E]` of every block of `selection` `[B, L, E]` (score + bias)
    under `policy`; `routed` votes see each token's group-limited scores."""
    if policy.vote == "routed":
        selection = group_limited(selection, n_group, topk_group)
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
    n_group: int,
    topk_group: int,
    valid: Tensor,
    ratio: Tensor,
    renormalise: bool,
) -> Routing:
    """Expert choice over `[B, L, E]`, optionally inside block coresets; `ratio` `[B, L]` is each
    position's noise level r."""
    coreset = None
    if policy.ec_coreset != "none":
        coreset = block_coreset(policy, selection, top_k, n_group, topk_group, valid)
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
        return route_expert_choice(
            policy, scores, selection, top_k, n_group, topk_group, valid, ratio, renormalise
        )
    coreset = block_coreset(policy, selection, top_k, n_group, topk_group, valid)
    per_token = from_blocks(coreset, policy.block_size, scores.shape[1])
    ids, weights = route_in_coreset(
        scores, expert_bias, per_token, top_k, n_group, topk_group, renormalise, policy.in_coreset
    )
    return Routing(ids, weights, scores, coreset)
