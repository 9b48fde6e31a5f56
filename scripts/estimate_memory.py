"""Per-GPU memory of router fine-tuning, from a model config: weights, the trainable set's
optimizer state, activations with and without per-layer checkpointing, for DDP and FSDP layouts.

    python scripts/estimate_memory.py [--config DIR/config.json] [--seq 2048] [--out FILE.md]
        [--trainable router|router+experts|all]

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

from dmoe_train.models import (
    FAMILIES,
    TRAINABLE_SETS,
    LLaDA2MoeModelLM,
    MoeDiffusionLM,
    TrainableSet,
    in_trainable_set,
)

GB = 1e9
BF16, FP32 = 2, 4


@dataclass
class Layout:
    name: str
    shard: int  # ranks one copy of the weights and trainable state is spread over


def read_config(path: Path) -> Any:
    """A model directory's (or a config.json's) config, any family."""
    file = path / "config.json" if path.is_dir() else path
    raw = json.loads(file.read_text())
    return FAMILIES[raw.get("model_type", "llada2_moe")].config_class.from_dict(raw)


def parameter_counts(cfg: Any, trainable: TrainableSet = "router") -> tuple[int, int, int]:
    """(all, trainable, largest decoder layer) parameter counts, from the model built on meta."""
    family: type[MoeDiffusionLM] = FAMILIES[cfg.model_type]
    with torch.device("meta"):
        model = family(cfg)
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for n, p in model.named_parameters() if in_trainable_set(n, trainable))
    layer = max(sum(p.numel() for p in block.parameters()) for block in model.model.layers)
    return total, trained, layer


def layer_activations(cfg: Any, tokens: int) -> float:
    """Bytes one MoE decoder layer keeps for backward (bf16 unless noted)."""
    h, k, i = cfg.hidden_size, cfg.num_experts_per_tok, cfg.moe_intermediate_size
    q_kv = cfg.head_dim * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads)
    attention = tokens * (2 * h + 2 * q_kv + h) * BF16  # norms, qkv + roped q/k, output
    router = tokens * cfg.num_experts * 3 * FP32  # logits, scores, biased selection scores
    routed = tokens * k * (2 * h + 3 * i) * BF16  # gathered inputs/outputs, gate/up/act
    shared = (
        tokens * 3 * cfg.shared_expert_intermediate_size * BF16
        if cfg.shared_expert_intermediate_size
        else 0
    )
    return attention + router + routed + shared + 2 * tokens * h * BF16  # residual, norm


def estimate(
    cfg: Any, seq: int, micro_batch: int, layout: Layout, trainable: TrainableSet = "router"
) -> dict[str, float]:
    total, trained, layer = parameter_counts(cfg, trainable)
    tokens = 2 * seq * micro_batch  # [x_t ; x_0]
    weights = (total - trained) * BF16 / layout.shard  # the frozen base
    # FSDP: the current and the prefetched layer, whole (fp32 where its experts train)
    gathered = 2 * layer * (BF16 if trainable == "router" else FP32) if layout.shard > 1 else 0
    # fp32 master + grad + Adam m, v, and the step's temporaries: AdamW computes sqrt(v) / c
    # out of place, one more fp32 copy of the trainable set (all at once under foreach, the
    # CUDA default; two of the largest tensor at a time on the CPU: measured 16.6 GiB added
    # against 13.4 estimated without this term, for the 2-layer full-width slice's experts)
    optimizer = trained * (FP32 * 5) / layout.shard
    per_layer = layer_activations(cfg, tokens)
    logits = seq * micro_batch * cfg.vocab_size * (BF16 + 2 * FP32)  # x_t half, fp32 CE + grad
    full = cfg.num_hidden_layers * per_layer + logits
    checkpointed = cfg.num_hidden_layers * tokens * cfg.hidden_size * BF16 + per_layer + logits
    return {
        "weights": weights + gathered,
        "trainable_state": optimizer,
        "activations": full,
        "activations_ckpt": checkpointed,
        "total": weights + gathered + optimizer + full,
        "total_ckpt": weights + gathered + optimizer + checkpointed,
    }


def table(
    cfg: Any, seq: int, micro_batch: int, layouts: list[Layout], trainable: TrainableSet
) -> str:
    total, trained, _ = parameter_counts(cfg, trainable)
    lines = [
        f"Per-GPU memory (GB), {total / 1e9:.2f}B parameters ({trained / 1e6:.1f}M trainable: "
        f"{trainable}), seq {seq}, micro batch {micro_batch}: frozen weights bf16 (+2 gathered "
        "layers under FSDP), the trainable set fp32 + grad + AdamW + the step's fp32 temporaries, "
        "activations of [x_t ; x_0] "
        "with and without per-layer checkpointing.",
        "",
        "| layout | weights | trainable state | activations | activations (ckpt) | total "
        "| total (ckpt) |",
        "|---|---|---|---|---|---|---|",
    ]
    for lay in layouts:
        e = estimate(cfg, seq, micro_batch, lay, trainable)
        lines.append(
            f"| {lay.name} | "
            + " | ".join(
                f"{e[k] / GB:.1f}"
                for k in (
                    "weights",
                    "trainable_state",
                    "activations",
                    "activations_ckpt",
                    "total",
                    "total_ckpt",
                )
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", help="a model's config.json, any family (default: LLaDA2.0-mini's)"
    )
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--trainable", choices=TRAINABLE_SETS, default="router")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    cfg = read_config(Path(args.config)) if args.config else LLaDA2MoeModelLM.config_class()
    layouts = [
        Layout("1 GPU", 1),
        Layout("DDP, 1 node x 8", 1),
        Layout("FSDP, 1 node x 8", 8),
        Layout("FSDP (HSDP), 2 nodes x 8", 8),  # shards within a node, replicates across nodes
    ]
    text = table(cfg, args.seq, args.micro_batch, layouts, args.trainable)
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
