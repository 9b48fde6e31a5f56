import pytest
import torch
from helpers import moe_spec

from dmoe_train.routing import (
    RoutingPolicy,
    capacity_coreset,
    group_limited,
    route,
    route_in_coreset,
    token_topk,
    topp_coreset,
)


def test_token_topk_group_limited_by_hand():
    # 4 groups of 2; group scores (top-2 sums): g0 0.2, g1 1.5, g2 1.6, g3 0.9 -> keep g2, g1
    scores = torch.tensor([[0.1, 0.1, 0.7, 0.8, 0.9, 0.7, 0.85, 0.05]])
    ids, weights = token_topk(scores, None, moe=moe_spec(scores, 2, n_group=4, topk_group=2))
    assert ids.tolist() == [[4, 3]]  # 0.85 (g3) is better than 0.8 but its group is dropped
    torch.testing.assert_close(weights, torch.tensor([[0.9 / 1.7, 0.8 / 1.7]]))


def test_token_topk_bias_steers_selection_not_weights():
    scores = torch.tensor([[0.5, 0.4, 0.3]])
    ids, weights = token_topk(scores, torch.tensor([0.0, 0.0, 0.5]), moe=moe_spec(scores, 2))
    assert sorted(ids.tolist()[0]) == [0, 2]
    assert torch.allclose(weights.sum(-1), torch.ones(1))
    assert weights[0, ids[0].tolist().index(2)] == pytest.approx(0.3 / 0.8)


def test_topp_coreset_by_hand():
    # 2 tokens, top-2 masked: t0 keeps e0 .6 e1 .2; t1 keeps e0 .4 e2 .3; sums 1.0 .2 .3 / 1.5
    block = torch.tensor([[0.6, 0.2, 0.1, 0.0], [0.4, 0.1, 0.3, 0.05]])
    # sorted masses: e0 .667, e2 .2, e1 .133; cumulative before each: 0, .667, .867
    assert topp_coreset(block, 2, 0.5, 0).tolist() == [True, False, False, False]
    assert topp_coreset(block, 2, 0.7, 0).tolist() == [True, False, True, False]
    assert topp_coreset(block, 2, 0.9, 0).tolist() == [True, True, True, False]
    assert topp_coreset(block, 2, 1.0, 0).tolist() == [True, True, True, False]  # e3 never picked
    assert topp_coreset(block, 2, 0.5, 3).tolist() == [True, True, True, False]
    # min_experts above the picked union: the highest raw score breaks the tie at zero mass
    assert topp_coreset(block, 2, 0.5, 4).tolist() == [True, True, True, True]


def test_capacity_coreset_by_hand():
    block = torch.tensor([[0.9, 0.1, 0.5, 0.2], [0.1, 0.8, 0.45, 0.3]])
    assert capacity_coreset(block, 2, "max").tolist() == [True, True, False, False]
    # sum of top-2-masked: e0 .9, e1 .8, e2 .95, e3 0
    assert capacity_coreset(block, 2, "sum", top_k=2).tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="top_k"):
        capacity_coreset(block, 2, "sum")


def _random_scores(seed: int, shape=(3, 16, 32)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g), (torch.rand(shape[-1], generator=g) - 0.5) * 0.2


@pytest.mark.parametrize("seed", range(20))
def test_topp_coreset_properties(seed):
    scores, _ = _random_scores(seed)
    top_k = 4
    union = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, scores.topk(top_k).indices, True)
    union = union.any(-2)
    sizes = []
    for top_p in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
        core = topp_coreset(scores, top_k, top_p, 0)
        assert not (core & ~union).any(), "coreset must be a subset of the tokens' picks"
        top_expert = scores.masked_fill(~(scores >= scores.topk(top_k).values[..., -1:]), 0).sum(-2)
        assert core.gather(-1, top_expert.argmax(-1, keepdim=True)).all()
        sizes.append(core.sum(-1))
        with_min = topp_coreset(scores, top_k, top_p, 10)
        assert (with_min.sum(-1) >= 10).all()
    for smaller, larger in zip(sizes, sizes[1:], strict=False):
        assert (smaller <= larger).all()
    assert torch.equal(sizes[-1], union.sum(-1))


@pytest.mark.parametrize("seed", range(10))
def test_capacity_gives_exactly_capacity(seed):
    scores, _ = _random_scores(seed)
    for capacity in (4, 9, 32):
        for aggregate in ("max", "sum"):
            core = capacity_coreset(scores, capacity, aggregate, top_k=4)
            assert (core.sum(-1) == capacity).all()


@pytest.mark.parametrize("policy", ["topp", "des_vote", "capacity_max"])
def test_padded_tokens_never_vote(policy):
    scores, bias = _random_scores(0, (2, 16, 32))
    valid = torch.ones(2, 16, dtype=torch.bool)
    valid[:, 10:] = False
    changed = scores.clone()
    changed[:, 10:] = torch.rand(2, 6, 32)
    pol = RoutingPolicy.from_record(
        dict(name=policy, block_size=8, top_p=0.5, min_experts=4, capacity=6)
    )
    a = route(
        pol, scores, moe=moe_spec(scores, 4, n_group=4, topk_group=2), expert_bias=bias, valid=valid
    )
    b = route(
        pol,
        changed,
        moe=moe_spec(changed, 4, n_group=4, topk_group=2),
        expert_bias=bias,
        valid=valid,
    )
    assert torch.equal(a.coreset, b.coreset)
    assert torch.equal(a.ids[:, :10], b.ids[:, :10])


@pytest.mark.parametrize("seed", range(10))
@pytest.mark.parametrize("groups", [(1, 1), (4, 2), (8, 1)])
def test_topp_one_equals_token_routing(seed, groups):
    scores, bias = _random_scores(seed)
    n_group, topk_group = groups
    token = route(
        RoutingPolicy("token"),
        scores,
        moe=moe_spec(scores, 4, n_group=n_group, topk_group=topk_group),
        expert_bias=bias,
    )
    topp = route(
        RoutingPolicy("topp", block_size=8, top_p=1.0, min_experts=0),
        scores,
        moe=moe_spec(scores, 4, n_group=n_group, topk_group=topk_group),
        expert_bias=bias,
    )
    assert torch.equal(token.ids.sort(-1).values, topp.ids.sort(-1).values)
    torch.testing.assert_close(
        token.weights.sort(-1).values, topp.weights.sort(-1).values, rtol=0, atol=0
    )


@pytest.mark.parametrize("seed", range(50))
def test_route_in_coreset_never_leaves_coreset(seed):
    g = torch.Generator().manual_seed(seed)
    scores, bias = _random_scores(seed, (4, 8, 32))
    size = int(torch.randint(1, 12, (1,), generator=g))
    coreset = torch.zeros(4, 8, 32, dtype=torch.bool)
    coreset.scatter_(
        -1, torch.rand(4, 1, 32, generator=g).argsort(-1)[..., :size].expand(4, 8, size), True
    )
    ids, weights = route_in_coreset(
        scores, bias, coreset, moe=moe_spec(scores, 4, n_group=8, topk_group=2)
    )
    chosen = ids >= 0
    assert coreset.gather(-1, ids.clamp_min(0))[chosen].all()
    # the group rule widens until k coreset experts are reachable: no slot left empty needlessly
    assert (chosen.sum(-1) == min(size, 4)).all()
    assert torch.allclose(weights.sum(-1), torch.ones(4, 8))
    assert (weights[~chosen] == 0).all()


def test_group_limited_masks_dropped_groups():
    sel = torch.tensor([[0.1, 0.2, 0.9, 0.8]])
    assert torch.isinf(group_limited(sel, 2, 1)[0, :2]).all()


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        (dict(name="nope"), "name='nope': must be one of"),
        (dict(block_size=0), "block_size=0: must be >= 1"),
        (dict(name="topp", top_p=0.0), r"top_p=0.0: must be in \(0, 1\]"),
        (dict(name="topp", top_p=1.5), r"top_p=1.5: must be in \(0, 1\]"),
        (dict(name="des_vote", capacity=0), "capacity=0: must be >= 1"),
        # a setting of another policy cannot be set: it would do nothing
        (dict(name="token", top_p=0.5), r"top_p=0.5: not a setting of token \(those are \[\]\)"),
        (dict(name="des_vote", vote_mass="raw", top_p=0.5), "top_p=0.5: not a setting of des_vote"),
        (
            dict(name="expert_choice", capacity=6),
            "capacity=6: not a setting of expert_choice",  # without ec_coreset=capacity
        ),
    ],
)
def test_policy_validation_names_the_key(kwargs, key):
    with pytest.raises(ValueError, match=f"^{key}"):
        RoutingPolicy(**kwargs)


def test_a_record_keeps_only_its_policys_settings():
    """Manifests written before settings of other policies were refused hold all fields."""
    record = RoutingPolicy("topp", top_p=0.5).to_dict() | {"capacity": 12, "top_k": 3}
    assert RoutingPolicy.from_record(record) == RoutingPolicy("topp", top_p=0.5)
    assert RoutingPolicy.from_record({"name": "token", "top_p": 0.9}) == RoutingPolicy("token")


def test_policy_checked_against_model():
    with pytest.raises(ValueError, match="capacity=2"):
        RoutingPolicy("des_vote", capacity=2).check_against(num_experts=32, top_k=4)
    with pytest.raises(ValueError, match="min_experts=40"):
        RoutingPolicy("topp", min_experts=40).check_against(num_experts=32, top_k=4)
