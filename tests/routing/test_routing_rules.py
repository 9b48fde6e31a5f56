"""The block rule settings, one hand-computed case per published detail, and the properties
that hold for every combination of them."""

import itertools
import json
import warnings

import pytest
import torch
from helpers import CONFIGS, moe_spec
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dmoe_train.models import build_model, is_router_param, load_model
from dmoe_train.models.adapted_weights import adapted_manifest, load_adapted, save_adapted
from dmoe_train.routing import (
    GUARD_TIES,
    IN_CORESET,
    RULES,
    VOTE_MASSES,
    VOTES,
    RoutingPolicy,
    engine_config,
    group_limited,
    policy_from_engine_config,
    route,
    route_in_coreset,
    topp_coreset,
)


def _ids(routing_ids):
    return [sorted(i for i in row if i >= 0) for row in routing_ids.tolist()]


def test_votes_plain_against_routed():
    # 2 groups of 2, keep 1: group scores g0 {e0 .9, e1 .1} = 1.0 < g1 {e2 .8, e3 .7} = 1.5.
    # routed votes: e2 .8, e3 .7 -> dist .533/.467; plain votes: e0 .9, e2 .8 -> .529/.471
    scores = torch.tensor([[[0.9, 0.1, 0.8, 0.7]]])
    for vote, expected in (("routed", [2]), ("plain", [0])):
        policy = RoutingPolicy("topp", block_size=1, top_p=0.5, min_experts=0, vote=vote)
        routing = route(policy, scores, moe=moe_spec(scores, 2, n_group=2, topk_group=1))
        assert routing.coreset[0, 0].nonzero().flatten().tolist() == expected


def test_guard_ties():
    # k = 1: votes e0 .9 (token 0), e1 .8 (token 1); top-p 0.5 keeps e0 only, below the guard of
    # 4. The guard takes e0, e1 and two of the zero-vote experts e2..e5.
    block = torch.tensor([[0.9, 0.1, 0.2, 0.3, 0.6, 0.05], [0.2, 0.8, 0.1, 0.7, 0.3, 0.4]])
    by_score = topp_coreset(block, 1, 0.5, 4, guard_ties="max_score")
    # block max scores of the zero-vote experts: e2 .2, e3 .7, e4 .6, e5 .4 -> e3, e4
    assert by_score.nonzero().flatten().tolist() == [0, 1, 3, 4]
    by_topk = topp_coreset(block, 1, 0.5, 4, guard_ties="topk")
    dist = torch.tensor([0.9, 0.8, 0, 0, 0, 0]) / 1.7
    assert set(by_topk.nonzero().flatten().tolist()) == set(dist.topk(4).indices.tolist())
    # no guard needed: both rules keep the same top-p set
    assert torch.equal(
        topp_coreset(block, 1, 0.5, 1, guard_ties="topk"),
        block.new_tensor([1, 0, 0, 0, 0, 0]).bool(),
    )


# one token, 4 groups of 2: g0 {e0 .9, e1 .1}, g1 {e2 .8, e3 .7}, g2 {e4 .6, e5 .5},
# g3 {e6 .95, e7 .05}; unrestricted group scores g1 1.5, g2 1.1, g0 1.0, g3 1.0
TOKEN = torch.tensor([[0.9, 0.1, 0.8, 0.7, 0.6, 0.5, 0.95, 0.05]])


def _coreset(*experts):
    return torch.zeros(1, 8, dtype=torch.bool).index_fill(-1, torch.tensor(experts), True)


def test_selection_inside_the_coreset():
    core = _coreset(0, 1, 2, 4, 5, 6)
    picks = {
        rule: _ids(
            route_in_coreset(
                TOKEN, None, core, moe=moe_spec(TOKEN, 2, n_group=4, topk_group=2), in_coreset=rule
            )[0]
        )
        for rule in IN_CORESET
    }
    # ranked: the token's own best groups g1, g2 hold 3 coreset experts: e2 .8, e4 .6
    assert picks["ranked_groups"] == [[2, 4]]
    # masked: coreset-masked group scores g0 1.0, g1 -inf (one coreset expert), g2 1.1,
    # g3 -inf -> g2, g0: e0 .9, e4 .6
    assert picks["masked_groups"] == [[0, 4]]
    # plain: the two best coreset experts, any group
    assert picks["plain"] == [[0, 6]]


def test_masked_groups_fills_where_dmoe_would_leak():
    # k = 3, one group kept: g2 {e4, e5} is the only group with two coreset experts, so dMoE's
    # top-3 inside it meets -inf and would return an expert outside the coreset; we take the best
    # coreset expert of the other groups, e6 .95
    ids, weights = route_in_coreset(
        TOKEN,
        None,
        _coreset(4, 5, 6),
        moe=moe_spec(TOKEN, 3, n_group=4, topk_group=1),
        in_coreset="masked_groups",
    )
    assert ids.tolist() == [[4, 5, 6]]
    torch.testing.assert_close(weights, torch.tensor([[0.6, 0.5, 0.95]]) / 2.05)
    # a coreset smaller than k leaves empty slots, never an expert outside it
    ids, weights = route_in_coreset(
        TOKEN,
        None,
        _coreset(4, 5),
        moe=moe_spec(TOKEN, 3, n_group=4, topk_group=1),
        in_coreset="masked_groups",
    )
    assert ids.tolist() == [[4, 5, -1]] and weights[0, 2] == 0


def test_vote_mass_clamp_against_raw():
    # all biased scores negative (negative expert biases): top-2 votes t0 e0 -.5, e2 -.75;
    # t1 e1 -.5, e2 -.75
    block = torch.tensor([[-0.5, -1.0, -0.75, -1.25], [-1.0, -0.5, -0.75, -1.5]])
    # clamp: every vote counts 0, the walk keeps every voted expert and no other
    assert topp_coreset(block, 2, 0.5, 0, vote_mass="clamp").tolist() == [1, 1, 1, 0]
    # raw (dMoE): votes e0 -.5, e1 -.5, e2 -1.5, sum -2.5 -> dist .2, .2, .6, 0: e2 alone
    assert topp_coreset(block, 2, 0.5, 0, vote_mass="raw").tolist() == [0, 0, 1, 0]
    # positive mass: the same coreset under both
    assert torch.equal(
        topp_coreset(-block, 2, 0.5, 0, vote_mass="raw"),
        topp_coreset(-block, 2, 0.5, 0, vote_mass="clamp"),
    )


def test_llada22_pool_and_plain_topk():
    # 3 groups of 2 (keep 1), 2 tokens, capacity 3; bias +.25 on e2.
    # biased t0 [.5 .25 .75 .5 .125 .25], t1 [.25 .75 .5 .5 .25 .125]
    bias = torch.tensor([0.0, 0.0, 0.25, 0.0, 0.0, 0.0])
    biased = torch.tensor(
        [[[0.5, 0.25, 0.75, 0.5, 0.125, 0.25], [0.25, 0.75, 0.5, 0.5, 0.25, 0.125]]]
    )
    policy = instantiate(OmegaConf.load(CONFIGS / "router" / "llada22.yaml"))
    policy = RoutingPolicy(**{**policy.to_dict(), "block_size": 2, "capacity": 3})
    assert policy.rule == "llada22"
    routing = route(
        policy,
        biased - bias,
        moe=moe_spec(biased - bias, 2, n_group=3, topk_group=1),
        expert_bias=bias,
    )
    # block max: e0 .5, e1 .75, e2 .75, e3 .5, ...: e1, e2, then e0 over e3 (tie: lower id)
    assert routing.coreset[0, 0].nonzero().flatten().tolist() == [0, 1, 2]
    # each token's plain top-2 in the pool, across groups: t0 e2 .75 (g1), e0 .5 (g0); t1 e1, e2
    assert _ids(routing.ids[0]) == [[0, 2], [1, 2]]
    # weights: the unbiased scores renormalised (t0: e2 .5, e0 .5; t1: e1 .75, e2 .25)
    by_id = routing.weights[0].gather(-1, routing.ids[0].argsort(-1))
    torch.testing.assert_close(by_id, torch.tensor([[0.5, 0.5], [0.75, 0.25]]))


def test_presets_name_their_rule():
    def preset(name):
        return instantiate(OmegaConf.load(CONFIGS / "router" / f"{name}.yaml"))

    dmoe = preset("dmoe")
    assert (dmoe.rule, dmoe.block_size, dmoe.top_p, dmoe.min_experts) == ("dmoe", 32, 0.6, 16)
    llada22 = preset("llada22")
    assert (llada22.rule, llada22.block_size, llada22.capacity) == ("llada22", 32, 48)
    # today's presets keep our rule, written out
    for name in ("topp", "des_vote", "capacity_max"):
        assert preset(name).rule == "dmoe-train"
        assert preset(name) == RoutingPolicy(**{**preset(name).to_dict(), **RULES["dmoe-train"]})
    assert RoutingPolicy("topp", vote="plain").rule == "custom"


@pytest.mark.parametrize("key", ["vote", "vote_mass", "guard_ties", "in_coreset"])
def test_rule_settings_are_validated(key):
    with pytest.raises(ValueError, match=f"^{key}='nope'"):
        RoutingPolicy("topp", **{key: "nope"})


COMBINATIONS = list(itertools.product(VOTES, VOTE_MASSES, GUARD_TIES, IN_CORESET))


def _random(seed, shape=(2, 16, 32), negative=False):
    g = torch.Generator().manual_seed(seed)
    bias = (
        -0.7 - 0.8 * torch.rand(shape[-1], generator=g)
        if negative
        else (torch.rand(shape[-1], generator=g) - 0.5) * 0.2
    )
    return torch.rand(shape, generator=g), bias


@pytest.mark.parametrize(("vote", "vote_mass", "guard_ties", "in_coreset"), COMBINATIONS)
@pytest.mark.parametrize("name", ["topp", "des_vote", "capacity_max"])
def test_every_combination_stays_in_its_coreset(name, vote, vote_mass, guard_ties, in_coreset):
    for seed, negative in itertools.product(range(4), (False, True)):
        scores, bias = _random(seed, negative=negative)
        valid = torch.ones(2, 16, dtype=torch.bool)
        valid[1, 11:] = False
        policy = RoutingPolicy.from_record(  # each policy keeps the settings that apply to it
            dict(
                name=name, block_size=8, top_p=0.5, min_experts=6, capacity=6, vote=vote,
                vote_mass=vote_mass, guard_ties=guard_ties, in_coreset=in_coreset,
            )
        )  # fmt: skip
        routing = route(
            policy,
            scores,
            moe=moe_spec(scores, 4, n_group=8, topk_group=2),
            expert_bias=bias,
            valid=valid,
        )
        per_token = routing.coreset.repeat_interleave(8, 1)
        chosen = routing.ids >= 0
        assert per_token.gather(-1, routing.ids.clamp_min(0))[chosen].all()
        assert (chosen.sum(-1) == 4).all()  # every coreset holds >= k: no slot left empty
        # padded positions never vote
        changed = scores.clone()
        changed[1, 11:] = torch.rand(5, 32)
        assert torch.equal(
            route(
                policy,
                changed,
                moe=moe_spec(changed, 4, n_group=8, topk_group=2),
                expert_bias=bias,
                valid=valid,
            ).coreset,
            routing.coreset,
        )
        if name == "topp" and vote_mass == "clamp":  # a subset of the votes (no guard)
            free = RoutingPolicy(**{**policy.to_dict(), "min_experts": 0, "top_p": 0.9})
            selection = scores + bias
            if vote == "routed":
                selection = group_limited(selection, 8, 2)
            votes = (
                torch.zeros_like(scores, dtype=torch.bool).scatter(
                    -1, selection.topk(4).indices, True
                )
                & valid[..., None]
            )
            union = votes.unflatten(1, (2, 8)).any(2)
            assert not (
                route(
                    free,
                    scores,
                    moe=moe_spec(scores, 4, n_group=8, topk_group=2),
                    expert_bias=bias,
                    valid=valid,
                ).coreset
                & ~union
            ).any()


@pytest.mark.parametrize(("vote_mass", "guard_ties"), itertools.product(VOTE_MASSES, GUARD_TIES))
@pytest.mark.parametrize("seed", range(5))
def test_routed_votes_at_top_p_one_are_token_routing(vote_mass, guard_ties, seed):
    scores, bias = _random(seed)
    token = route(
        RoutingPolicy("token"),
        scores,
        moe=moe_spec(scores, 4, n_group=8, topk_group=2),
        expert_bias=bias,
    )
    topp = route(
        RoutingPolicy(
            "topp",
            block_size=8,
            top_p=1.0,
            min_experts=0,
            vote_mass=vote_mass,
            guard_ties=guard_ties,
        ),
        scores,
        moe=moe_spec(scores, 4, n_group=8, topk_group=2),
        expert_bias=bias,
    )
    assert torch.equal(token.ids.sort(-1).values, topp.ids.sort(-1).values)
    torch.testing.assert_close(
        token.weights.sort(-1).values, topp.weights.sort(-1).values, rtol=0, atol=0
    )


def test_engine_keys_round_trip_through_export(tmp_path):
    base = build_model("tiny", seed=1)
    base.save_pretrained(tmp_path / "base")
    for preset, keys in (
        (
            dict(name="topp", block_size=32, top_p=0.6, min_experts=16, **RULES["dmoe"]),
            {"mode": "aggregate", "core_threshold": 0.6},
        ),
        (
            dict(name="capacity_max", block_size=8, capacity=16, **RULES["llada22"]),
            {"expert_capacity": 16, "block_size": 8},
        ),
        (dict(name="topp", block_size=8, top_p=0.6, min_experts=8), {}),
    ):
        policy = RoutingPolicy(**preset)
        assert engine_config(policy) == keys
        model = load_model(tmp_path / "base")
        model.set_routing(policy)
        out = tmp_path / policy.rule
        model.save_pretrained(out)
        written = json.loads((out / "config.json").read_text())
        assert {k: written[k] for k in keys} == keys
        assert written["routing"] == policy.to_dict()  # every rule setting recorded
        assert load_model(out).config.routing == policy
        if keys:  # an engine's config without our key loads as that engine routes
            del written["routing"]
            assert policy_from_engine_config(written).rule == policy.rule
        # switched back to token routing, no stale engine key stays behind
        reloaded = load_model(out)
        reloaded.set_routing(RoutingPolicy("token"))
        reloaded.save_pretrained(tmp_path / "token")
        assert not set(keys) & set(json.loads((tmp_path / "token" / "config.json").read_text()))


def test_router_under_another_rule_warns_once(tmp_path):
    base = build_model("tiny", seed=1)
    base.save_pretrained(tmp_path / "base")
    trained = load_model(tmp_path / "base")
    trained.set_routing(RoutingPolicy("topp", block_size=8, top_p=0.6, min_experts=8))
    router = {n: p for n, p in trained.named_parameters() if is_router_param(n)}
    path = save_adapted(router, tmp_path / "ckpt", adapted_manifest(trained, base_path="b"))
    dmoe = RoutingPolicy("topp", block_size=8, top_p=0.6, min_experts=8, **RULES["dmoe"])
    with pytest.warns(UserWarning) as caught:
        load_adapted(load_model(tmp_path / "base"), path, dmoe)
    assert len(caught) == 1
    assert "topp [dmoe-train" in str(caught[0].message) and "topp [dmoe:" in str(caught[0].message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # same rule, another top_p: a sweep, not a mismatch
        load_adapted(
            load_model(tmp_path / "base"),
            path,
            RoutingPolicy("topp", block_size=8, top_p=0.9, min_experts=8),
        )
