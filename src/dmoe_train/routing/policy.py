"""Routing policies: which rule a MoE layer routes by, and the published rules' settings."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal, get_args

from dmoe_train.settings import SettingError, refuse

PolicyName = Literal["token", "topk_cap", "des_vote", "capacity_max", "topp", "expert_choice"]
Schedule = Literal["static", "linear", "linear_reverse", "cosine"]
Vote = Literal["routed", "plain"]
VoteMass = Literal["clamp", "raw"]
GuardTies = Literal["max_score", "topk"]
InCoreset = Literal["ranked_groups", "masked_groups", "plain"]
EcGroup = Literal["block", "sequence"]
EcCoreset = Literal["none", "topp", "capacity"]
# each field's allowed values, read once from its type
POLICIES, SCHEDULES, VOTES, VOTE_MASSES, GUARD_TIES, IN_CORESET, EC_GROUPS, EC_CORESETS = map(
    get_args, (PolicyName, Schedule, Vote, VoteMass, GuardTies, InCoreset, EcGroup, EcCoreset)
)
# the rule settings of the published block rules (and ours, the defaults); `RoutingPolicy.rule`
RULES: dict[str, dict[str, str]] = {
    "dmoe-train": dict(
        vote="routed", vote_mass="clamp", guard_ties="max_score", in_coreset="ranked_groups"
    ),
    "dmoe": dict(vote="plain", vote_mass="raw", guard_ties="topk", in_coreset="masked_groups"),
    "llada22": dict(vote="plain", in_coreset="plain"),
}
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
    are ours, `dmoe-train`). A setting that does not apply to `name` keeps its default
    (`settings()`): another value for it is refused.
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
    schedule: Schedule = "static"
    ec_group: EcGroup = "block"
    ec_coreset: EcCoreset = "none"
    vote: Vote = "routed"
    vote_mass: VoteMass = "clamp"
    guard_ties: GuardTies = "max_score"
    in_coreset: InCoreset = "ranked_groups"

    def __post_init__(self) -> None:
        for key in ("block_size", "min_experts", "capacity", "top_p", "capacity_factor"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise SettingError(key, f"={value!r}: must be a number")
        if self.name not in POLICIES:
            raise SettingError("name", f"={self.name!r}: must be one of {POLICIES}")
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
                raise SettingError(key, f"={getattr(self, key)!r}: must be one of {allowed}")
        unused = [
            f.name
            for f in fields(self)
            if f.name not in self.settings() and getattr(self, f.name) != f.default
        ]
        if unused:
            key, own = unused[0], sorted(self.settings() - {"name", "block_size"})
            raise SettingError(
                key, f"={getattr(self, key)!r}: not a setting of {self.name} (those are {own})"
            )
        checks = (
            ("block_size", self.block_size >= 1, "must be >= 1"),
            ("top_p", 0.0 < self.top_p <= 1.0, "must be in (0, 1]"),
            ("min_experts", self.min_experts >= 0, "must be >= 0"),
            ("capacity", self.capacity >= 1, "must be >= 1"),
            ("top_k", self.top_k is None or self.top_k >= 1, "must be >= 1"),
            ("capacity_factor", self.capacity_factor > 0, "must be > 0"),
        )
        for key, ok, requirement in checks:
            if not ok:
                raise refuse(key, getattr(self, key), requirement)
        lo, hi = self.k_min, self.k_max
        if (lo is not None and lo < 0) or (hi is not None and hi < 1):
            raise SettingError("k_min", f"={lo}, k_max={hi}: need k_min >= 0 and k_max >= 1")
        if lo is not None and hi is not None and lo > hi:
            raise SettingError("k_min", f"={lo} > k_max={hi}")

    def settings(self) -> set[str]:
        """The fields that apply to this policy: the others keep their defaults (a policy
        refuses another value for them, naming it)."""
        own = {
            "token": (),
            "topk_cap": ("top_k",),
            "topp": ("top_p", "min_experts"),
            "des_vote": ("capacity",),
            "capacity_max": ("capacity",),
            "expert_choice": (
                "capacity_factor", "k_min", "k_max", "schedule", "ec_group", "ec_coreset",
                *{"topp": ("top_p", "min_experts"), "capacity": ("capacity",)}.get(
                    self.ec_coreset, ()
                ),
            ),
        }[self.name]  # fmt: skip
        return {"name", "block_size", *own, *self.rule_settings()}

    @classmethod
    def from_record(cls, record: dict) -> RoutingPolicy:
        """A policy as a manifest or metrics file recorded it: records written before a policy
        refused settings that do not apply to it may hold other values for those; they are
        dropped."""
        policy = cls(name=record["name"], ec_coreset=record.get("ec_coreset", "none"))
        return cls(**{k: v for k, v in record.items() if k in policy.settings()})

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
            raise refuse(
                "min_experts",
                self.min_experts,
                f"must be in [top_k={top_k}, num_experts={num_experts}]",
            )
        if coreset in ("sum", "max") and not top_k <= self.capacity <= num_experts:
            raise refuse(
                "capacity", self.capacity, f"must be in [top_k={top_k}, num_experts={num_experts}]"
            )
        if self.name == "topk_cap" and self.top_k is not None and self.top_k > top_k:
            raise refuse("top_k", self.top_k, f"topk_cap must not exceed k={top_k}")

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
