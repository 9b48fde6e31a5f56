"""Train a shipped LLaDA2-MoE base from scratch on CPU: `--base tiny` (`assets/tiny-llada2`,
32 experts, arithmetic, blocks of 8) or `--base tiny256` (`assets/tiny256-llada2`, LLaDA2.0-mini's
routing regime: 256 experts, top-8, 4 of 8 groups, the multi-skill task, blocks of 32).

All parameters, the block-diffusion loss, per-token routing, and LLaDA2's auxiliary-loss-free load
balancing: after every step each router's `expert_bias` moves by `--bias-rate` towards the mean
load, so the base uses its experts evenly as the real one does. Writes the model (bf16, published
layout), its character tokenizer and `quality.json` (exact match on the test split, per skill,
and the share of experts token routing touches per block).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from dmoe_train.data.module import DiffusionDataModule
from dmoe_train.data.tokenizer import char_tokenizer
from dmoe_train.decoding_eval import GenerationSettings, evaluate_generation, masked_token_accuracy
from dmoe_train.diffusion import denoise, masked_diffusion_loss
from dmoe_train.metrics import unique_experts_per_block
from dmoe_train.models import build_model


@torch.no_grad()
def balance_experts(routing: list, model: torch.nn.Module, rate: float) -> None:
    """Raise the bias of under-loaded experts and lower it for over-loaded ones."""
    moe_layers = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    for r, moe in zip(routing, moe_layers, strict=True):
        load = torch.bincount(r.ids[r.ids >= 0], minlength=model.config.num_experts).float()
        moe.gate.expert_bias += rate * torch.sign(load.mean() - load)


# what each shipped base is: its model preset, data and pretraining recipe
BASES: dict[str, dict] = {
    "tiny": dict(
        preset="tiny", source="arithmetic", out="assets/tiny-llada2", max_seq_len=16,
        block_size=8, steps=4000, batch_size=64, lr=3e-3, train_size=14000, test_size=256,
        threshold=None,
    ),
    # LLaDA2.0-mini's routing regime: 256 experts, top-8, 4 of 8 groups, blocks of 32
    "tiny256": dict(
        preset="tiny256", source="skills", out="assets/tiny256-llada2", max_seq_len=96,
        block_size=32, steps=4000, batch_size=48, lr=3e-3, train_size=100000, test_size=1000,
        threshold=0.95,
    ),
}  # fmt: skip


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", choices=sorted(BASES), default="tiny")
    ap.add_argument("--out")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--train-size", type=int)
    ap.add_argument("--test-size", type=int)
    ap.add_argument("--bias-rate", type=float, default=1e-3)
    ap.add_argument("--eval-every", type=int, default=1000, help="exact match on 64 test prompts")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    for key, value in BASES[args.base].items():  # the base's recipe where not given
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    return args


def settings_of(args: argparse.Namespace, max_samples: int) -> GenerationSettings:
    """LLaDA2's decoding at the base's block size (threshold decoding where the base uses it)."""
    return GenerationSettings(
        args.block_size, args.block_size, threshold=args.threshold, max_samples=max_samples
    )


def train_base(model: torch.nn.Module, data: DiffusionDataModule, args: argparse.Namespace) -> None:
    """Block-diffusion pretraining from scratch, every parameter, with LLaDA2's bias balancing."""
    cfg = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    # the schedule router fine-tuning uses (configs/train.yaml: module.scheduler), to zero
    sched = get_cosine_with_min_lr_schedule_with_warmup(
        opt, args.steps // 20, args.steps, min_lr_rate=0.0
    )
    gen = torch.Generator().manual_seed(args.seed)
    start = time.time()
    model.train()
    for step, batch in enumerate(data.stream_loader(args.steps)):
        ids = batch["input_ids"]
        uniforms = torch.rand(len(ids), 1 + ids.shape[1], generator=gen)
        out = denoise(
            model, ids, batch["response_mask"], cfg.mask_token_id, 0.0, 1.0,
            "block_diffusion", args.block_size, uniforms,
        )  # fmt: skip
        loss = masked_diffusion_loss(out.logits, ids, out.masked, out.t, "none")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        balance_experts(out.routing, model, args.bias_rate)
        if step % 100 == 0:
            unique = sum(
                unique_experts_per_block(r.ids, args.block_size).float().mean() for r in out.routing
            ) / len(out.routing)
            print(
                f"step {step:5d}  loss {loss.item():.4f}  unique experts {unique:.1f}  "
                f"{time.time() - start:6.1f}s",
                flush=True,
            )
        if args.eval_every and step and step % args.eval_every == 0:
            model.eval()
            m = evaluate_generation(model, data, settings_of(args, 64), "test")
            model.train()
            print(f"step {step:5d}  exact match on 64 test prompts {m['accuracy']:.3f}", flush=True)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    tokenizer = char_tokenizer()
    model = build_model(args.preset, seed=args.seed)
    # the data module reads its tokenizer from a model directory: the base-to-be's
    tok_dir = Path(tempfile.mkdtemp())
    tokenizer.save_pretrained(tok_dir)
    (tok_dir / "config.json").write_text(json.dumps(model.config.to_dict()))
    data = DiffusionDataModule(
        str(tok_dir), source=args.source, max_seq_len=args.max_seq_len,
        batch_size=args.batch_size, train_size=args.train_size, test_size=args.test_size,
    )  # fmt: skip
    data.setup()
    start = time.time()
    train_base(model, data, args)
    train_seconds = round(time.time() - start, 1)
    model.eval()
    test = evaluate_generation(model, data, settings_of(args, args.test_size), "test")
    quality = {
        "base": args.base,
        "train_steps": args.steps,
        "batch_size": args.batch_size,
        "train_seconds": train_seconds,
        "masked_token_accuracy": masked_token_accuracy(model, data, args.block_size),
        "test_problems": test["samples"],
        "exact_match": test["accuracy"],
        "exact_match_by_skill": test.get("accuracy_by_skill", {}),
        "unique_experts_per_block": test["unique_experts_per_block"],
        "share_of_experts_per_block": test["unique_experts_per_block"] / model.config.num_experts,
        "decoding": test["settings"],
    }
    print(json.dumps(quality, indent=2))
    out_dir = Path(args.out)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")


if __name__ == "__main__":
    main()
