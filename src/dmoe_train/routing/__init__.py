"""Routing: policies (which rule a MoE layer routes by) and the rules themselves, as small pure
tensor functions. The bottom layer: it imports nothing of the package.

- `policy`: `RoutingPolicy`, the published rules' settings, serving-engine config keys;
- `coresets`: token top-k, group limits, a block's coreset (top-p, votes, capacity) and top-k
  inside it;
- `expert_choice`: each expert takes its best tokens (optionally inside coresets);
- `moe_spec`: `MoeSpec`, a MoE layer as routing sees it (each family's `config.moe`);
- `layer`: `route`, what one MoE layer does with its router scores under a policy.
"""

from dmoe_train.routing.coresets import (
    Routing,
    block_coreset,
    capacity_coreset,
    from_blocks,
    group_limited,
    route_in_coreset,
    to_blocks,
    token_topk,
    topp_coreset,
)
from dmoe_train.routing.expert_choice import expert_choice, route_expert_choice, scheduled_k
from dmoe_train.routing.layer import route
from dmoe_train.routing.moe_spec import MoeSpec, ScoreFunction
from dmoe_train.routing.policy import (
    CORESET_POLICIES,
    EC_CORESETS,
    EC_GROUPS,
    ENGINE_KEYS,
    GUARD_TIES,
    IN_CORESET,
    POLICIES,
    RULES,
    SCHEDULES,
    VOTE_MASSES,
    VOTES,
    RoutingPolicy,
    engine_config,
    policy_from_engine_config,
)

__all__ = [
    "CORESET_POLICIES", "EC_CORESETS", "EC_GROUPS", "ENGINE_KEYS", "GUARD_TIES", "IN_CORESET",
    "POLICIES", "RULES", "SCHEDULES", "VOTES", "VOTE_MASSES", "MoeSpec", "Routing", "RoutingPolicy",
    "ScoreFunction",
    "block_coreset", "capacity_coreset", "engine_config", "expert_choice", "from_blocks",
    "group_limited", "policy_from_engine_config", "route", "route_expert_choice",
    "route_in_coreset", "scheduled_k", "to_blocks", "token_topk", "topp_coreset",
]  # fmt: skip
