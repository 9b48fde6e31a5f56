"""Per-GPU memory of router fine-tuning, from a model config: weights, the trainable set's
optimizer state, activations with and without per-layer checkpointing, for DDP and FSDP layouts.

    python -m dmoe_train.studies.estimate_memory [--config DIR/config.json] [--seq 2048] \
        [--out FILE.md]
        [--trainable router|router+shared|router+lora|router+lora+shared|router+experts|all]

An estimate from shapes (bf16 frozen base, the trainable set in fp32 with AdamW, block
diffusion's [x_t ; x_0] input of 2 x seq tokens, memory-efficient attention: no seq^2 scores
kept); allocator slack and CUDA context (~1-2 GB) are not included.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import DiffusionGemmaForBlockDiffusion

from dmoe_train.models import (
    FAMILIES,
    TRAINABLE_SETS,
    LLaDA2MoeModelLM,
    MoeDiffusionLM,
    TrainableSet,
    in_trainable_set,
)
from dmoe_train.models.families.diffusion_gemma import MODEL_TYPE as GEMMA
from dmoe_train.models.families.diffusion_gemma import text_only_config
from dmoe_train.models.lora import ExpertLora, add_expert_lora
from dmoe_train.reports import markdown_table

GB = 1e9
BF16, FP32 = 2, 4


@dataclass
class Layout:
    name: str
    shard: int  # ranks one copy of the weights and trainable state is spread over
    broadcast: bool = False  # DDP: rank 0's weights are broadcast when the model is wrapped


@dataclass
class Counts:
    total: int  # parameters
    trained: int
    layer: int  # the largest decoder layer
    root: int  # outside the decoder layers: embedding, final norm, head
    broadcast_bucket: int  # bytes of DDP's largest flattened broadcast bucket


# google/diffusiongemma-26B-A4B-it's text config, as published (its vision tower aside)
DIFFUSION_GEMMA_26B = dict(
    vocab_size=262_144, hidden_size=2816, intermediate_size=2112, num_hidden_layers=30,
    num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
    sliding_window=1024, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
    pad_token_id=0, eos_token_id=1, bos_token_id=2,
)  # fmt: skip
CANVAS_26B = 256
PRESETS = ("llada2-mini", "diffusiongemma-26b-a4b")


def read_config(path: Path) -> Any:
    """A model directory's (or a config.json's) config, any family."""
    file = path / "config.json" if path.is_dir() else path
    raw = json.loads(file.read_text())
    if raw.get("model_type") == GEMMA:
        return text_only_config(raw.get("canvas_length", CANVAS_26B), **raw["text_config"])
    return FAMILIES[raw.get("model_type", "llada2_moe")].config_class.from_dict(raw)


def is_gemma(cfg: Any) -> bool:
    return getattr(cfg, "model_type", None) == GEMMA


def broadcast_bucket(sizes: list[tuple[bool, int]], limit: int = 250 * 2**20) -> int:
    """Bytes of the largest bucket DDP copies when it broadcasts rank 0's weights at wrap time.
    `sizes` are (dtype key, bytes) in parameter order. As torch buckets them: per dtype, a
    bucket closes once it holds `limit` bytes (so a large tensor closes the bucket it joins),
    and a bucket of more than one tensor is flattened into a new buffer (a lone tensor is sent
    in place). Measured on two gloo ranks: 0.67 GiB transient for [1000 elements, 0.6 GiB], none
    for the 0.6 GiB tensor alone, 0.37 GiB for [1000, 3 x 0.19 GiB]."""
    open_buckets: dict[bool, list[int]] = {}
    largest = 0
    for key, nbytes in sizes:
        bucket = open_buckets.setdefault(key, [])
        bucket.append(nbytes)
        if sum(bucket) >= limit:
            open_buckets[key] = []
            largest = max(largest, sum(bucket) if len(bucket) > 1 else 0)
    return max([largest] + [sum(b) for b in open_buckets.values() if len(b) > 1])


def parameter_counts(cfg: Any, trainable: TrainableSet = "router", lora_rank: int = 8) -> Counts:
    """Parameter counts of the model built on meta (frozen bf16, trained fp32); the `+lora`
    sets with adapters of `lora_rank` on gate/up/down (`module.lora`'s default: 8)."""
    with torch.device("meta"):
        if is_gemma(cfg):  # transformers' model; its encoder and decoder share their layers
            model = DiffusionGemmaForBlockDiffusion(cfg)
            blocks = model.model.decoder.layers
        else:
            family: type[MoeDiffusionLM] = FAMILIES[cfg.model_type]
            model = family(cfg)
            blocks = model.model.layers
            if "lora" in trainable.split("+"):
                add_expert_lora(model, ExpertLora(rank=lora_rank))
    named = [(n, p.numel(), in_trainable_set(n, trainable)) for n, p in model.named_parameters()]
    if is_gemma(cfg) and "lora" in trainable.split("+"):  # rank x (in + out) per expert matrix
        text = cfg.text_config
        h, i, e = text.hidden_size, text.moe_intermediate_size, text.num_experts
        per_layer = lora_rank * e * ((h + 2 * i) + (i + h))  # gate_up [2I, H], down [H, I]
        named.append(("lora", per_layer * text.num_hidden_layers, True))
    layers = [sum(p.numel() for p in block.parameters()) for block in blocks]
    return Counts(
        total=sum(n for _, n, _ in named),
        trained=sum(n for _, n, t in named if t),
        layer=max(layers),
        root=sum(n for _, n, _ in named) - sum(layers),
        broadcast_bucket=broadcast_bucket([(t, n * (FP32 if t else BF16)) for _, n, t in named]),
    )


def gemma_layer_activations(text: Any, tokens: int) -> float:
    """Bytes one DiffusionGemma layer keeps for backward (bf16 unless noted): attention, the
    router, the routed experts, the dense MLP beside them, norms and the residual."""
    h, k, i = text.hidden_size, text.top_k_experts, text.moe_intermediate_size
    q_kv = 512 * (text.num_attention_heads + 2 * text.num_key_value_heads)  # global layers' heads
    attention = tokens * (2 * h + 2 * q_kv + h) * BF16
    router = tokens * text.num_experts * 3 * FP32
    routed = tokens * k * (2 * h + 3 * i) * BF16
    dense = tokens * 3 * text.intermediate_size * BF16
    return attention + router + routed + dense + 6 * tokens * h * BF16


def layer_activations(cfg: Any, tokens: int) -> float:
    """Bytes one MoE decoder layer keeps for backward (bf16 unless noted)."""
    h, k, i = cfg.hidden_size, cfg.moe.top_k, cfg.moe.expert_width
    q_kv = cfg.head_dim * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    attention = tokens * (2 * h + 2 * q_kv + h) * BF16  # norms, qkv + roped q/k, output
    router = tokens * cfg.num_experts * 3 * FP32  # logits, scores, biased selection scores
    routed = tokens * k * (2 * h + 3 * i) * BF16  # gathered inputs/outputs, gate/up/act
    shared = tokens * 3 * cfg.moe.shared_width * BF16
    return attention + router + routed + shared + 2 * tokens * h * BF16  # residual, norm


def estimate(
    cfg: Any, seq: int, micro_batch: int, layout: Layout, trainable: TrainableSet = "router"
) -> dict[str, float]:
    counts = parameter_counts(cfg, trainable)
    # DiffusionGemma: the prompt through the encoder and the canvas through the decoder (the
    # self-conditioning pass runs without gradients); our LMs: [x_t ; x_0]
    gemma = is_gemma(cfg)
    tokens = (seq + cfg.canvas_length if gemma else 2 * seq) * micro_batch
    weights = (counts.total - counts.trained) * BF16 / layout.shard  # the frozen base
    # FSDP: the current and the prefetched layer, whole (fp32 where its experts train), and the
    # root unit (embedding, head), which FSDP2 keeps gathered from forward through backward:
    # measured 5.9 GiB added per rank against 4.6 estimated without it on the full-width slice.
    # DiffusionGemma's encoder and decoder layer i are one unit (one set of tied weights),
    # gathered from the encoder's pass to the decoder's: every layer at once
    text = cfg.text_config if gemma else cfg
    dtype = FP32 if trainable in ("router+experts", "all") else BF16
    root = counts.root * (FP32 if trainable == "all" else BF16)
    held = text.num_hidden_layers if gemma else 2
    gathered = held * counts.layer * dtype + root if layout.shard > 1 else 0
    # fp32 master + grad + Adam m, v, and the step's temporaries: AdamW computes sqrt(v) / c
    # out of place, one more fp32 copy of the trainable set (all at once under foreach, the
    # CUDA default; two of the largest tensor at a time on the CPU: measured 16.6 GiB added
    # against 13.4 estimated without this term, for the 2-layer full-width slice's experts)
    optimizer = counts.trained * (FP32 * 5) / layout.shard
    per_layer = gemma_layer_activations(text, tokens) if gemma else layer_activations(cfg, tokens)
    scored = tokens if gemma else seq * micro_batch  # encoder + canvas; the x_t half
    logits = scored * text.vocab_size * (BF16 + 2 * FP32)  # fp32 CE + grad
    full = text.num_hidden_layers * per_layer + logits
    checkpointed = text.num_hidden_layers * tokens * text.hidden_size * BF16 + per_layer + logits
    steady = weights + gathered + optimizer
    # DDP's wrap, before any optimizer state or activation: the weights and the flat copy of
    # the largest broadcast bucket (the peak of a short-sequence run)
    wrap = weights + counts.broadcast_bucket if layout.broadcast else 0.0
    return {
        "weights": weights + gathered,
        "trainable_state": optimizer,
        "activations": full,
        "activations_ckpt": checkpointed,
        "total": max(steady + full, wrap),
        "total_ckpt": max(steady + checkpointed, wrap),
    }


def table(
    cfg: Any, seq: int, micro_batch: int, layouts: list[Layout], trainable: TrainableSet
) -> str:
    counts = parameter_counts(cfg, trainable)
    lines = [
        f"Per-GPU memory (GB), {counts.total / 1e9:.2f}B parameters "
        f"({counts.trained / 1e6:.1f}M trainable: "
        f"{trainable}), seq {seq}, micro batch {micro_batch}: frozen weights bf16 (+"
        + ("every layer" if is_gemma(cfg) else "2 layers")
        + " gathered and the embedding and head under FSDP), the trainable set fp32 + grad + AdamW "
        "+ the step's fp32 temporaries, activations of "
        + ("the prompt and the canvas" if is_gemma(cfg) else "[x_t ; x_0]")
        + " with and without per-layer checkpointing (under DDP a total is at least the "
        "weights plus the largest bucket of the wrap-time broadcast).",
        "",
    ]
    keys = ("weights", "trainable_state", "activations", "activations_ckpt", "total", "total_ckpt")
    rows = []
    for lay in layouts:
        e = estimate(cfg, seq, micro_batch, lay, trainable)
        rows.append((lay.name, *(f"{e[k] / GB:.1f}" for k in keys)))
    head = (
        "layout", "weights", "trainable state", "activations", "activations (ckpt)", "total",
        "total (ckpt)",
    )  # fmt: skip
    lines.append(markdown_table(head, rows))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="a model's config.json, any family")
    parser.add_argument("--preset", choices=PRESETS, default="llada2-mini", help="without --config")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--trainable", choices=TRAINABLE_SETS, default="router")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    if args.config:
        cfg = read_config(Path(args.config))
    elif args.preset == "diffusiongemma-26b-a4b":
        cfg = text_only_config(CANVAS_26B, **DIFFUSION_GEMMA_26B)
    else:
        cfg = LLaDA2MoeModelLM.config_class()
    layouts = [
        Layout("1 GPU", 1),
        Layout("DDP, 1 node x 8", 1, broadcast=True),
        Layout("FSDP, 1 node x 8", 8),
        Layout("FSDP (HSDP), 2 nodes x 8", 8),  # shards within a node, replicates across nodes
    ]
    text = table(cfg, args.seq, args.micro_batch, layouts, args.trainable)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
