"""Shared fixtures: tiny configs and a checkpoint writer that follows the published layout."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA: skipped, saying so, on a machine without it."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (run with pytest -m gpu where a GPU is lent)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY = dict(
    vocab_size=48,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    partial_rotary_factor=0.5,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    first_k_dense_replace=1,
    num_experts=8,
    num_experts_per_tok=2,
    num_shared_experts=1,
    moe_intermediate_size=16,
    n_group=4,
    topk_group=2,
    routed_scaling_factor=2.5,
    score_function="sigmoid",
    moe_router_enable_expert_bias=True,
    pad_token_id=0,
    tie_word_embeddings=False,
    model_type="llada2_moe",
    architectures=["LLaDA2MoeModelLM"],
    use_qkv_bias=False,
)


def published_tensors(cfg: dict, merged: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors named and shaped as the published LLaDA2 checkpoints are (fact sheet)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    h, hd = cfg["hidden_size"], cfg["head_dim"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * hd
    e, mi = cfg["num_experts"], cfg["moe_intermediate_size"]
    t = {
        "model.word_embeddings.weight": rand(cfg["vocab_size"], h),
        "model.norm.weight": 1 + rand(h),
        "lm_head.weight": rand(cfg["vocab_size"], h),
    }
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        t |= {
            p + "input_layernorm.weight": 1 + rand(h),
            p + "post_attention_layernorm.weight": 1 + rand(h),
            p + "attention.query_key_value.weight": rand(qkv, h),
            p + "attention.query_layernorm.weight": 1 + rand(hd),
            p + "attention.key_layernorm.weight": 1 + rand(hd),
            p + "attention.dense.weight": rand(h, cfg["num_attention_heads"] * hd),
        }
        if n < cfg["first_k_dense_replace"]:
            i = cfg["intermediate_size"]
            t |= {
                p + "mlp.gate_proj.weight": rand(i, h),
                p + "mlp.up_proj.weight": rand(i, h),
                p + "mlp.down_proj.weight": rand(h, i),
            }
            continue
        t |= {
            p + "mlp.gate.weight": rand(e, h),
            p + "mlp.gate.expert_bias": rand(e),
            p + "mlp.shared_experts.gate_proj.weight": rand(mi, h),
            p + "mlp.shared_experts.up_proj.weight": rand(mi, h),
            p + "mlp.shared_experts.down_proj.weight": rand(h, mi),
        }
        experts = {
            "gate_proj": rand(e, mi, h),
            "up_proj": rand(e, mi, h),
            "down_proj": rand(e, h, mi),
        }
        for proj, stack in experts.items():
            if merged:
                t[f"{p}mlp.experts.{proj}"] = stack
            else:
                t |= {f"{p}mlp.experts.{x}.{proj}.weight": stack[x].clone() for x in range(e)}
    return t


def write_published(path: Path, cfg: dict, tensors: dict, shards: int = 1) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, path / "model.safetensors")
        return path
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({k: tensors[k] for k in part}, path / file)
        weight_map |= dict.fromkeys(part, file)
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


@pytest.fixture
def tiny_cfg() -> dict:
    return dict(TINY)


@pytest.fixture
def tokenizer_dir(tmp_path):
    """A model directory holding only what data needs: the tokenizer and a config.json."""
    from dmoe_train.data.tokenizer import char_tokenizer

    char_tokenizer().save_pretrained(tmp_path / "tok")
    (tmp_path / "tok" / "config.json").write_text(json.dumps({"model_type": "llada2_moe"}))
    return tmp_path / "tok"
