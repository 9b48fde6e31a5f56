"""Write a LLaDA2.0-mini checkpoint at full width with few layers and random weights.

Written from the published facts (config keys, tensor names and shapes of the split layout,
sharded safetensors with an index, bfloat16), by code that shares nothing with our
`save_pretrained`: what `load_model` must read when given the real weights. Shard by shard, so
writing never holds more than one shard in memory.

Usage: python scripts/full_width_checkpoint.py OUT [--layers 2] [--shard-gib 1]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from dmoe_train.files import save_safetensors

CONFIG = {  # LLaDA2.0-mini's config.json (the fact sheet), num_hidden_layers aside
    "architectures": ["LLaDA2MoeModelLM"],
    "model_type": "llada2_moe",
    "vocab_size": 157184,
    "hidden_size": 2048,
    "intermediate_size": 5120,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "hidden_act": "silu",
    "first_k_dense_replace": 1,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "num_shared_experts": 1,
    "moe_intermediate_size": 512,
    "n_group": 8,
    "topk_group": 4,
    "routed_scaling_factor": 2.5,
    "score_function": "sigmoid",
    "router_dtype": "fp32",
    "moe_router_enable_expert_bias": True,
    "norm_topk_prob": True,
    "rope_theta": 600000,
    "partial_rotary_factor": 0.5,
    "rotary_dim": 64,
    "rms_norm_eps": 1e-6,
    "use_bias": False,
    "use_qkv_bias": False,
    "norm_head": False,
    "tie_word_embeddings": False,
    "pad_token_id": 156892,
    "eos_token_id": 156892,
    "mask_token_id": 156895,
    "max_position_embeddings": 16384,
    "torch_dtype": "bfloat16",
}


def shapes(layers: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """Every tensor of the published split layout, in file order."""
    c = CONFIG
    h, v, hd = c["hidden_size"], c["vocab_size"], c["head_dim"]
    qkv = (c["num_attention_heads"] + 2 * c["num_key_value_heads"]) * hd
    yield "model.word_embeddings.weight", (v, h)
    for n in range(layers):
        p = f"model.layers.{n}."
        yield p + "input_layernorm.weight", (h,)
        yield p + "post_attention_layernorm.weight", (h,)
        yield p + "attention.query_key_value.weight", (qkv, h)
        yield p + "attention.query_layernorm.weight", (hd,)
        yield p + "attention.key_layernorm.weight", (hd,)
        yield p + "attention.dense.weight", (h, c["num_attention_heads"] * hd)
        if n < c["first_k_dense_replace"]:
            i = c["intermediate_size"]
            yield p + "mlp.gate_proj.weight", (i, h)
            yield p + "mlp.up_proj.weight", (i, h)
            yield p + "mlp.down_proj.weight", (h, i)
            continue
        e, mi = c["num_experts"], c["moe_intermediate_size"]
        yield p + "mlp.gate.weight", (e, h)
        yield p + "mlp.gate.expert_bias", (e,)
        for x in range(e):
            yield p + f"mlp.experts.{x}.gate_proj.weight", (mi, h)
            yield p + f"mlp.experts.{x}.up_proj.weight", (mi, h)
            yield p + f"mlp.experts.{x}.down_proj.weight", (h, mi)
        shared = mi * c["num_shared_experts"]
        yield p + "mlp.shared_experts.gate_proj.weight", (shared, h)
        yield p + "mlp.shared_experts.up_proj.weight", (shared, h)
        yield p + "mlp.shared_experts.down_proj.weight", (h, shared)
    yield "model.norm.weight", (h,)
    yield "lm_head.weight", (v, h)


def random_tensor(name: str, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    if name.endswith("expert_bias"):
        return torch.zeros(shape, dtype=torch.bfloat16)
    if len(shape) == 1:  # norms
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)


def write_full_width(out: Path, layers: int = 2, shard_bytes: int = 2**30, seed: int = 0) -> int:
    """Write the checkpoint; returns the bytes of its weights."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({**CONFIG, "num_hidden_layers": layers}, indent=2))
    g = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes, total, files = [0], 0, []

    def flush() -> None:
        name = f"part-{len(files):05d}.safetensors"
        save_safetensors(shards[-1], out / name, metadata={"format": "pt"})
        files.append((name, list(shards[-1])))
        shards[-1] = {}
        sizes[-1] = 0

    for name, shape in shapes(layers):
        tensor = random_tensor(name, shape, g)
        nbytes = tensor.numel() * tensor.element_size()
        if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
            flush()
        shards[-1][name] = tensor
        sizes[-1] += nbytes
        total += nbytes
    flush()
    n = len(files)
    weight_map = {}
    for i, (name, names) in enumerate(files):  # the published naming: model-0000i-of-0000n
        final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        (out / name).rename(out / final)
        weight_map |= dict.fromkeys(names, final)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--shard-gib", type=float, default=1.0)
    args = ap.parse_args()
    total = write_full_width(args.out, args.layers, int(args.shard_gib * 2**30))
    print(f"wrote {args.out}: {total / 2**30:.2f} GiB of bfloat16 weights, {args.layers} layers")


if __name__ == "__main__":
    main()
