"""Expert choice: each expert takes its best tokens in a group, by hand."""

import pytest
import torch
from helpers import moe_spec

from dmoe_train.objectives.expert_metrics import expert_load, load_balance_cv
from dmoe_train.routing import RoutingPolicy, expert_choice, route, scheduled_k

E, K = 16, 4


def _scores(b: int, n: int, seed: int = 0, softmax: bool = True) -> torch.Tensor:
    logits = torch.randn(b, n, E, generator=torch.Generator().manual_seed(seed))
    return logits.softmax(-1) if softmax else logits.sigmoid()


@pytest.mark.parametrize("c", [1, 3, 8])
def test_each_expert_takes_exactly_c_tokens(c):
    selection = _scores(6, 8)  # 6 groups of T = 8 >= c tokens
    chosen = expert_choice(selection, torch.full((6,), c), torch.ones(6, 8, dtype=torch.bool))
    assert (chosen.sum(-2) == c).all()
    # and they are each expert's c best tokens
    kth_best = selection.topk(c, dim=-2).values[:, -1:, :]
    assert ((selection >= kth_best) == chosen).all()


def test_expert_choice_skips_invalid_tokens_and_fewer_than_c():
    valid = torch.ones(2, 8, dtype=torch.bool)
    valid[1, 3:] = False  # 3 valid tokens, c = 5
    chosen = expert_choice(_scores(2, 8), torch.tensor([5, 5]), valid)
    assert (chosen[0].sum(0) == 5).all() and (chosen[1].sum(0) == 3).all()
    assert not chosen[1, 3:].any()


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("static", (8.0, 8.0, 8.0)),
        ("linear", (2.0, 5.0, 8.0)),
        ("linear_reverse", (8.0, 5.0, 2.0)),
        ("cosine", (2.0, 5.0, 8.0)),
    ],
)
def test_capacity_schedules(schedule, expected):
    policy = RoutingPolicy("expert_choice", k_min=2, k_max=8, schedule=schedule)
    k = scheduled_k(policy, K, torch.tensor([0.0, 0.5, 1.0]))
    torch.testing.assert_close(k, torch.tensor(expected))
    # defaults: the model's k at every noise level
    assert (scheduled_k(RoutingPolicy("expert_choice"), K, torch.rand(5)) == K).all()


def test_route_expert_choice_capacity_and_weights():
    scores = _scores(2, 16)
    policy = RoutingPolicy("expert_choice", block_size=8, capacity_factor=2.0)
    r = route(policy, scores, moe=moe_spec(scores, K, renormalise=False))
    c = round(2.0 * K * 8 / E)  # = 4 tokens per expert and block
    for block in range(2):
        ids = r.ids[:, block * 8 : (block + 1) * 8]
        assert (expert_load(ids, E) == 2 * c).all()  # 2 samples
        assert load_balance_cv(expert_load(ids, E)) == 0
    # the weights are the scores of the chosen pairs (softmax, not renormalised)
    chosen = r.ids >= 0
    torch.testing.assert_close(r.weights[chosen], scores.gather(-1, r.ids.clamp_min(0))[chosen])
    # a token may get no expert: its slots are all empty
    per_token = chosen.sum(-1)
    assert per_token.float().mean() == pytest.approx(c * E / 8)


def test_timestep_capacity_follows_the_block_noise_level():
    scores = _scores(1, 16)
    policy = RoutingPolicy("expert_choice", block_size=8, k_min=2, k_max=8, schedule="linear")
    ratio = torch.tensor([[0.0] * 8 + [1.0] * 8])  # a clean block, then a fully masked one
    r = route(policy, scores, moe=moe_spec(scores, K), ratio=ratio)
    per_block = [int((r.ids[:, s : s + 8] >= 0).sum()) for s in (0, 8)]
    assert per_block == [E * round(2 * 8 / E), E * round(8 * 8 / E)]  # c = 1, then c = 4


@pytest.mark.parametrize("coreset", ["topp", "capacity"])
def test_combined_mode_never_leaves_the_coreset(coreset):
    for seed in range(20):
        scores = _scores(3, 16, seed, softmax=False)
        policy = RoutingPolicy.from_record(
            dict(name="expert_choice", block_size=8, ec_coreset=coreset, top_p=0.5, min_experts=4,
                 capacity=6)
        )  # fmt: skip
        r = route(policy, scores, moe=moe_spec(scores, K))
        per_token = r.coreset.repeat_interleave(8, dim=1)  # [B, L, E]
        picked = r.ids >= 0
        inside = per_token.gather(-1, r.ids.clamp_min(0))
        assert inside[picked].all()
        # each coreset expert still takes its tokens: c = round(k * T / |coreset|), at least 1
        blocks = r.ids.unflatten(1, (2, 8))
        for b in range(3):
            for blk in range(2):
                size = int(r.coreset[b, blk].sum())
                load = expert_load(blocks[b, blk], E)
                c = max(1, round(K * 8 / size))
                assert (load[r.coreset[b, blk]] == min(c, 8)).all()
                assert (load[~r.coreset[b, blk]] == 0).all()


def test_policy_settings_are_checked():
    with pytest.raises(ValueError, match="^schedule='fast'"):
        RoutingPolicy("expert_choice", schedule="fast")
    with pytest.raises(ValueError, match="^k_min=5 > k_max=3"):
        RoutingPolicy("expert_choice", k_min=5, k_max=3)
    with pytest.raises(ValueError, match="^ec_group"):
        RoutingPolicy("expert_choice", ec_group="batch")


def test_sequence_groups_choose_over_the_whole_sequence():
    policy = RoutingPolicy("expert_choice", block_size=4, ec_group="sequence")
    r = route(policy, _scores(2, 16), moe=moe_spec(_scores(2, 16), K))
    load = torch.stack([expert_load(r.ids[b : b + 1], E) for b in range(2)])
    assert (load == round(K * 16 / E)).all()  # c = 4 tokens per expert across 4 blocks
