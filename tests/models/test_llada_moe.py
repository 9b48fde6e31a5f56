"""The LLaDA-MoE family: its published layout, its router, every policy on it."""

import json

import torch
from safetensors.torch import load_file, save_file

from dmoe_train.models import LLaDAMoeModelLM, build_model, load_model
from dmoe_train.routing import RoutingPolicy

E, K = 16, 4


def _scores(b: int, n: int, seed: int = 0, softmax: bool = True) -> torch.Tensor:
    logits = torch.randn(b, n, E, generator=torch.Generator().manual_seed(seed))
    return logits.softmax(-1) if softmax else logits.sigmoid()


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
