import json

import pytest
import torch
from helpers import published_tensors, write_published

from dmoe_train.models import LLaDA2MoeConfig, LLaDA2MoeModelLM, build_model, load_model
from dmoe_train.models.layers import apply_partial_rope, rope_cos_sin
from dmoe_train.models.model_dir import CheckpointMismatchError
from dmoe_train.routing import RoutingPolicy

IDS = torch.tensor([[5, 9, 3, 17, 22, 40, 1, 7, 8, 30], [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]])


def test_published_split_layout_loads_every_tensor_in_place(tmp_path, tiny_cfg):
    tensors = published_tensors(tiny_cfg)
    model = load_model(write_published(tmp_path / "m", tiny_cfg, tensors, shards=3))
    layer = model.model.layers[2]
    assert torch.equal(
        layer.mlp.experts.up_proj[5], tensors["model.layers.2.mlp.experts.5.up_proj.weight"]
    )
    assert torch.equal(layer.mlp.gate.expert_bias, tensors["model.layers.2.mlp.gate.expert_bias"])
    assert torch.equal(
        model.model.layers[0].mlp.down_proj.weight, tensors["model.layers.0.mlp.down_proj.weight"]
    )
    assert model.config.routing.name == "token"  # no routing settings: the published routing
    assert model.config.extra["architectures"] == ["LLaDA2MoeModelLM"]


def test_save_load_round_trip_and_merged_layout(tmp_path, tiny_cfg):
    model = load_model(write_published(tmp_path / "a", tiny_cfg, published_tensors(tiny_cfg)))
    logits = model(IDS).logits
    model.save_pretrained(tmp_path / "b", max_shard_bytes=20_000)
    assert (tmp_path / "b" / "model.safetensors.index.json").is_file()
    index = json.loads((tmp_path / "b" / "model.safetensors.index.json").read_text())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in index["weight_map"]
    assert torch.equal(load_model(tmp_path / "b")(IDS).logits, logits)
    merged = write_published(tmp_path / "c", tiny_cfg, published_tensors(tiny_cfg, merged=True))
    assert torch.equal(load_model(merged)(IDS).logits, logits)


def test_routing_settings_saved_into_config(tmp_path, tiny_cfg):
    model = load_model(write_published(tmp_path / "a", tiny_cfg, published_tensors(tiny_cfg)))
    model.set_routing(RoutingPolicy("topp", block_size=4, top_p=0.5, min_experts=2))
    model.save_pretrained(tmp_path / "b")
    raw = json.loads((tmp_path / "b" / "config.json").read_text())
    assert raw["routing"]["name"] == "topp" and raw["num_experts"] == 8
    reloaded = load_model(tmp_path / "b")
    assert reloaded.config.routing == model.config.routing
    assert torch.equal(reloaded(IDS).logits, model(IDS).logits)


def test_mismatched_checkpoint_lists_tensors(tmp_path, tiny_cfg):
    tensors = published_tensors(tiny_cfg)
    del tensors["model.layers.1.mlp.experts.3.gate_proj.weight"]
    del tensors["model.norm.weight"]
    tensors["model.layers.1.mlp.bogus"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as err:
        load_model(write_published(tmp_path / "m", tiny_cfg, tensors))
    msg = str(err.value)
    assert "model.layers.1.mlp.experts.3.gate_proj.weight" in msg and "model.norm.weight" in msg
    assert "unexpected (1): model.layers.1.mlp.bogus" in msg


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "nowhere")


def test_llada2_mini_published_names_and_shapes():
    raw = json.loads(
        json.dumps(
            dict(
                hidden_size=2048,
                intermediate_size=5120,
                num_hidden_layers=20,
                num_attention_heads=16,
                num_key_value_heads=4,
                head_dim=128,
                first_k_dense_replace=1,
                num_experts=256,
                num_experts_per_tok=8,
                num_shared_experts=1,
                moe_intermediate_size=512,
                n_group=8,
                topk_group=4,
                routed_scaling_factor=2.5,
                score_function="sigmoid",
                rope_theta=600000,
                partial_rotary_factor=0.5,
                rotary_dim=64,
                rms_norm_eps=1e-6,
                vocab_size=157184,
                pad_token_id=156892,
                tie_word_embeddings=False,
                moe_router_enable_expert_bias=True,
                use_bias=False,
                use_qkv_bias=False,
                norm_head=False,
                max_position_embeddings=32768,
            )
        )
    )
    with torch.device("meta"):
        model = LLaDA2MoeModelLM(LLaDA2MoeConfig.from_dict(raw))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["model.layers.3.attention.query_key_value.weight"] == (3072, 2048)
    assert shapes["model.layers.3.mlp.experts.gate_proj"] == (256, 512, 2048)
    assert shapes["model.layers.3.mlp.experts.down_proj"] == (256, 2048, 512)
    assert shapes["model.layers.0.mlp.gate_proj.weight"] == (5120, 2048)
    assert shapes["model.layers.19.mlp.shared_experts.down_proj.weight"] == (2048, 512)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    assert 16.0e9 < total < 16.5e9  # ~16.3B parameters
    assert model.config.rotary_dim == 64 and model.config.use_qk_norm


def test_padding_mask_makes_padded_positions_invisible():
    model = build_model("tiny")
    ids = IDS[:1]
    padded = torch.cat([ids, torch.zeros(1, 6, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 10), torch.zeros(1, 6)], dim=1)
    for policy in (RoutingPolicy("token"), RoutingPolicy("topp", block_size=4, min_experts=4)):
        model.set_routing(policy)
        torch.testing.assert_close(
            model(padded, attention_mask=mask).logits[:, :10],
            model(ids).logits,
            rtol=1e-5,
            atol=1e-5,
        )


def test_attention_is_bidirectional():
    model = build_model("tiny")
    changed = IDS.clone()
    changed[:, -1] = 11
    assert not torch.allclose(model(IDS).logits[:, 0], model(changed).logits[:, 0])


def test_partial_rope_rotates_only_rotary_dims():
    x = torch.randn(1, 2, 5, 16)
    cos, sin = rope_cos_sin(torch.arange(5)[None], rotary_dim=8, theta=10000.0)
    y = apply_partial_rope(x, cos, sin)
    assert torch.equal(y[..., 8:], x[..., 8:])
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0 is the identity
    torch.testing.assert_close(y[..., :8].norm(dim=-1), x[..., :8].norm(dim=-1))  # a rotation


def test_load_with_dtype(tmp_path, tiny_cfg):
    model = load_model(
        write_published(tmp_path / "m", tiny_cfg, published_tensors(tiny_cfg)), dtype=torch.bfloat16
    )
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model(IDS).logits.dtype == torch.bfloat16


def test_topp_at_one_reproduces_token_routing():
    model = build_model("tiny")
    token = model(IDS).logits
    model.set_routing(RoutingPolicy("topp", block_size=4, top_p=1.0, min_experts=4))
    torch.testing.assert_close(model(IDS).logits, token, rtol=0, atol=0)
    model.set_routing(RoutingPolicy("topp", block_size=4, top_p=0.3, min_experts=4))
    out = model(IDS)
    assert not torch.allclose(out.logits, token)
    for r in out.routing:
        core = r.coreset.repeat_interleave(4, dim=1)[:, : IDS.shape[1]]
        assert core.gather(-1, r.ids.clamp_min(0))[r.ids >= 0].all()


def test_activation_checkpointing_keeps_gradients():
    grads = []
    for ckpt in (False, True):
        model = build_model("tiny")
        model.set_routing(RoutingPolicy("topp", block_size=4, min_experts=4))
        model.activation_checkpointing = ckpt
        model.train()
        model(IDS).logits.square().mean().backward()
        grads.append(model.model.layers[1].mlp.gate.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)
