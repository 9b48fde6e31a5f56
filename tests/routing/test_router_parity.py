"""Our group-limited sigmoid router (LLaDA2's) against a well-kept library implementation of the
same routing: transformers' DeepSeek-V3 router (sigmoid scores, a score-correction bias that only
steers selection, groups ranked by their two best scores, top-k renormalised and scaled)."""

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

from dmoe_train.models import build_model
from dmoe_train.routing import RoutingPolicy, route


@pytest.mark.parametrize(("n_group", "topk_group"), [(4, 2), (8, 4), (1, 1)])
def test_token_routing_equals_deepseek_v3s_router(n_group, topk_group):
    model = build_model("tiny", seed=3, num_experts=32, n_group=n_group, topk_group=topk_group)
    cfg = model.config
    moe = model.model.layers[1].mlp
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        moe.gate.expert_bias.copy_(torch.randn(cfg.num_experts, generator=gen) * 0.1)
    theirs = DeepseekV3TopkRouter(
        DeepseekV3Config(
            hidden_size=cfg.hidden_size,
            n_routed_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            n_group=n_group,
            topk_group=topk_group,
            norm_topk_prob=True,
            routed_scaling_factor=cfg.routed_scaling_factor,
        )
    )
    with torch.no_grad():
        theirs.weight.copy_(moe.gate.weight)
        theirs.e_score_correction_bias.copy_(moe.gate.expert_bias)
    x = torch.randn(2, 64, cfg.hidden_size, generator=gen)
    _, scores, bias = moe.gate(x)
    ours = route(RoutingPolicy("token", block_size=8), scores, moe=cfg.moe, expert_bias=bias)
    _, weights, ids = theirs(x)
    ours_ids, order = ours.ids.flatten(0, 1).sort(-1)
    ours_weights = ours.weights.flatten(0, 1).gather(-1, order) * cfg.routed_scaling_factor
    theirs_ids, order = ids.sort(-1)
    assert torch.equal(ours_ids, theirs_ids)
    torch.testing.assert_close(ours_weights, weights.gather(-1, order), rtol=1e-6, atol=1e-6)
