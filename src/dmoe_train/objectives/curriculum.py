"""A coreset curriculum: the block coreset starts wide and narrows to the policy's own over the
first part of training (validation always runs the policy's own setting)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from dmoe_train.routing import RoutingPolicy
from dmoe_train.settings import SettingError, refuse


@dataclass(frozen=True)
class Curriculum:
    """top_p (`topp`) or capacity (`des_vote`, `capacity_max`) moves from `curriculum_start`
    to the policy's own over the first `curriculum_fraction` of the steps; None: no curriculum."""

    curriculum_start: float | None = None
    curriculum_fraction: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 < self.curriculum_fraction <= 1.0:
            raise refuse("curriculum_fraction", self.curriculum_fraction, "must be in (0, 1]")

    def check(self, policy: RoutingPolicy) -> None:
        """Whether `policy` has a coreset setting this curriculum can move."""
        if self.curriculum_start is not None:
            curriculum_policy(policy, self.curriculum_start, 0.0)

    def policy_at(self, policy: RoutingPolicy, step: int, max_steps: int) -> RoutingPolicy:
        """The policy training routes by at `step` of `max_steps`."""
        if self.curriculum_start is None:
            return policy
        progress = step / (max(1, max_steps) * self.curriculum_fraction)
        return curriculum_policy(policy, self.curriculum_start, progress)


def curriculum_policy(policy: RoutingPolicy, start: float, progress: float) -> RoutingPolicy:
    """The policy `progress` (0..1) of the way from `start` to its own coreset setting: top_p for
    `topp`, the capacity for capacity policies (rounded to whole experts)."""
    progress = min(max(progress, 0.0), 1.0)
    if policy.name == "topp":
        return replace(policy, top_p=start + (policy.top_p - start) * progress)
    if policy.name in ("des_vote", "capacity_max"):
        return replace(policy, capacity=round(start + (policy.capacity - start) * progress))
    raise SettingError(
        "curriculum_start",
        f"={start} with router name {policy.name!r}: a curriculum moves the top_p of topp or the "
        "capacity of des_vote / capacity_max",
    )
