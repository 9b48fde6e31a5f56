"""Expert-choice routing, its capacity schedules and combined mode; the LLaDA-MoE family."""

import json

import pytest
import torch
from helpers import compose_train, moe_spec
from safetensors.torch import load_file, save_file

from dmoe_train.cli.train import train
from dmoe_train.models import LLaDAMoeModelLM, build_model, load_model
from dmoe_train.objectives.expert_metrics import expert_load, load_balance_cv
from dmoe_train.routing import RoutingPolicy, expert_choice, route, scheduled_k
from dmoe_train.training.finetuner import router_z_loss

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


# the published LLaDA-MoE layout (fact sheet and the model's config.json names)
TINY_LLADA_MOE = dict(
    model_type="llada_moe",
    vocab_size=40,
    hidden_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    dense_intermediate_size=48,
    expert_intermediate_size=16,
    num_experts=8,
    num_experts_per_tok=2,
    moe_layer_freq=[0, 1, 1],
    qk_layernorm=True,
    moe_router_score_function="softmax",
    moe_router_enable_expert_bias=True,
    rope_theta=50000.0,
    rms_norm_eps=1e-5,
    mask_token_id=1,
    eos_token_id=0,
    pad_token_id=0,
    tie_word_embeddings=False,
    clip_qkv=None,
)


def llada_moe_tensors(cfg: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    h, hd = cfg["hidden_size"], cfg["hidden_size"] // cfg["num_attention_heads"]
    e, ei, di = cfg["num_experts"], cfg["expert_intermediate_size"], cfg["dense_intermediate_size"]
    t = {
        "model.embed_tokens.weight": rand(cfg["vocab_size"], h),
        "model.norm.weight": 1 + rand(h),
        "lm_head.weight": rand(cfg["vocab_size"], h),
    }
    for n, moe in enumerate(cfg["moe_layer_freq"]):
        p = f"model.layers.{n}."
        t |= {
            p + "input_layernorm.weight": 1 + rand(h),
            p + "post_attention_layernorm.weight": 1 + rand(h),
            p + "self_attn.q_norm.weight": 1 + rand(hd),
            p + "self_attn.k_norm.weight": 1 + rand(hd),
            **{p + f"self_attn.{x}_proj.weight": rand(h, h) for x in "qkvo"},
        }
        if not moe:
            t |= {
                p + "mlp.gate_proj.weight": rand(di, h),
                p + "mlp.up_proj.weight": rand(di, h),
                p + "mlp.down_proj.weight": rand(h, di),
            }
            continue
        t |= {p + "mlp.gate.weight": rand(e, h), p + "mlp.expert_bias": rand(e)}
        for x in range(e):
            t |= {
                p + f"mlp.experts.{x}.gate_proj.weight": rand(ei, h),
                p + f"mlp.experts.{x}.up_proj.weight": rand(ei, h),
                p + f"mlp.experts.{x}.down_proj.weight": rand(h, ei),
            }
    return t


def test_llada_moe_published_layout_loads_and_round_trips(tmp_path):
    tensors = llada_moe_tensors(TINY_LLADA_MOE)
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "config.json").write_text(json.dumps(TINY_LLADA_MOE))
    save_file(tensors, tmp_path / "base" / "model.safetensors")
    model = load_model(tmp_path / "base")  # raises on any missing, unexpected or mis-shaped key
    assert isinstance(model, LLaDAMoeModelLM)
    layer = model.model.layers[1]
    assert torch.equal(layer.mlp.gate.expert_bias, tensors["model.layers.1.mlp.expert_bias"])
    assert torch.equal(
        layer.mlp.experts.down_proj[5], tensors["model.layers.1.mlp.experts.5.down_proj.weight"]
    )
    ids = torch.randint(2, 40, (2, 16), generator=torch.Generator().manual_seed(1))
    logits = model(ids).logits
    model.save_pretrained(tmp_path / "saved")
    assert set(load_file(tmp_path / "saved" / "model.safetensors")) == set(tensors)
    saved_cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved_cfg["model_type"] == "llada_moe" and saved_cfg["clip_qkv"] is None
    torch.testing.assert_close(load_model(tmp_path / "saved")(ids).logits, logits, rtol=0, atol=0)


def test_llada_moe_token_routing_is_softmax_top_k_unnormalised():
    model = build_model("tiny_lladamoe", seed=0)
    ids = torch.randint(2, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(ids)
    for r in out.routing:
        torch.testing.assert_close(r.scores.sum(-1), torch.ones(2, 16))  # softmax
        assert r.ids.shape[-1] == model.config.num_experts_per_tok
        assert (r.weights.sum(-1) < 1).all()  # the chosen probabilities, not renormalised
        torch.testing.assert_close(r.weights, r.scores.topk(r.ids.shape[-1]).values)


def test_llada_moe_runs_every_policy():
    model = build_model("tiny_lladamoe", seed=0)
    ids = torch.randint(2, 100, (2, 16), generator=torch.Generator().manual_seed(0))
    for policy in (
        RoutingPolicy("topp", block_size=8, top_p=0.5, min_experts=4),
        RoutingPolicy("expert_choice", block_size=8, schedule="linear_reverse", k_min=1),
        RoutingPolicy("expert_choice", block_size=8, ec_coreset="capacity", capacity=6),
    ):
        model.set_routing(policy)
        out = model(ids)
        assert torch.isfinite(out.logits).all()
        for r in out.routing:  # every chosen expert within its block's coreset, where there is one
            if r.coreset is not None:
                per_token = r.coreset.repeat_interleave(8, 1)
                assert per_token.gather(-1, r.ids.clamp_min(0))[r.ids >= 0].all()


@pytest.mark.slow
def test_retrofit_lowers_expert_choice_validation_loss(tmp_path):
    cfg = compose_train(
        tmp_path, "experiment=retrofit_ec", "trainer.max_steps=60", "trainer.val_check_interval=60"
    )
    summary = train(cfg)
    assert summary["policy"]["name"] == "expert_choice"
    assert summary["policy"]["schedule"] == "linear_reverse"
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.05
    assert summary["regularizer"]["kind"] == "none"
    manifest = json.loads((tmp_path / "checkpoints" / "router.json").read_text())
    assert manifest["routing"]["name"] == "expert_choice"
    # the recommended retrofit moves the routed experts with the router
    saved = load_file(tmp_path / "checkpoints" / "router.safetensors")
    assert any(".mlp.experts." in key for key in saved)
    assert not any("self_attn" in key or "shared_experts" in key for key in saved)


def test_router_z_loss_is_mean_squared_logsumexp():
    logits = torch.randn(2, 5, E, generator=torch.Generator().manual_seed(0))
    r = route(RoutingPolicy("token"), logits.softmax(-1), moe=moe_spec(logits.softmax(-1), K))
    r.logits = logits
    expected = logits.logsumexp(-1).pow(2).mean()
    torch.testing.assert_close(router_z_loss([r, r]), expected)


def test_sequence_groups_choose_over_the_whole_sequence():
    policy = RoutingPolicy("expert_choice", block_size=4, ec_group="sequence")
    r = route(policy, _scores(2, 16), moe=moe_spec(_scores(2, 16), K))
    load = torch.stack([expert_load(r.ids[b : b + 1], E) for b in range(2)])
    assert (load == round(K * 16 / E)).all()  # c = 4 tokens per expert across 4 blocks
