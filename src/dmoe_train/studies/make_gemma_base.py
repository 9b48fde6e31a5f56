"""`python -m dmoe_train.studies.make_gemma_base`: the tiny DiffusionGemma base, trained here from
scratch by its own objective: every weight, token routing with Switch load balancing,
uniform-state diffusion of the answer's canvas under its prompt with self-conditioning and the
encoder's autoregressive loss, on the four skills. transformers' model class with a config in
the published routing regime (128 experts, top-8, a dense MLP beside them, sliding and full
attention, a canvas of 64 split into blocks of 32) at a width a CPU trains. Writes the model
directory `from_pretrained` loads (bf16), the character tokenizer and `quality.json` (exact
match on the test split under DiffusionGemma's decoding, per skill, unique experts per block and
per canvas).

The training is a `dmoe-train` run (`module.trainable=all`) in `<out>.run/`, resumable: a rerun
continues it, then writes the base again."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch
from hydra.utils import instantiate
from transformers import DiffusionGemmaForBlockDiffusion

from dmoe_train.data.tokenizer import char_tokenizer
from dmoe_train.evaluation.canvas_decoding import CanvasDecoding, decode_canvas_split
from dmoe_train.files import file_mode
from dmoe_train.locations import ASSETS
from dmoe_train.models import load_model
from dmoe_train.models.adapted_weights import load_adapted
from dmoe_train.models.families.diffusion_gemma import text_only_config
from dmoe_train.resolvers import composed
from dmoe_train.routing import RoutingPolicy
from dmoe_train.settings import preset

CANVAS = 64
LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
TEXT = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=len(LAYERS), num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, global_head_dim=32, num_experts=128, top_k_experts=8,
    moe_intermediate_size=32, sliding_window=64, layer_types=LAYERS,
)  # fmt: skip


def initial_model(out: Path, seed: int) -> Path:
    """The randomly initialised base (transformers' init), with its tokenizer."""
    tokenizer = char_tokenizer()
    pad = tokenizer.pad_token_id
    config = text_only_config(
        CANVAS, vocab_size=len(tokenizer), pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=pad, **TEXT,
    )  # fmt: skip
    torch.manual_seed(seed)
    DiffusionGemmaForBlockDiffusion(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def train(init: Path, run: Path, args: argparse.Namespace) -> Path:
    """`dmoe-train` of every weight under token routing (resumes an unfinished run)."""
    overrides = [
        "experiment=tiny_gemma_topp", f"model.path={init}", "router=token", "~router.top_p",
        "~router.min_experts", "router.block_size=32", "regularizer=none", "module.trainable=all",
        f"module.balance_weight={args.balance_weight}",
        f"module.optimizer.lr={args.lr}", f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={min(args.steps, 500)}", f"data.batch_size={args.batch_size}",
        "callbacks.model_checkpoint.every_n_train_steps=100", "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run}", f"seed={args.seed}",
    ]  # fmt: skip
    if not (run / "summary.json").is_file():
        subprocess.run([sys.executable, "-m", "dmoe_train.cli.train", *overrides], check=True)
    return run / "checkpoints" / "router.safetensors"


def quality(base: Path, test_size: int) -> dict:
    """Exact match on the test split under DiffusionGemma's decoding and token routing."""
    cfg = composed("eval", ["model=tiny_gemma", f"model.path={base}", "data=skills",
                            "data.train_size=64", f"data.test_size={test_size}"])  # fmt: skip
    data = instantiate(cfg.data, tokenizer_path=str(base))
    data.setup()
    model = load_model(base, dtype=torch.float32, routing=RoutingPolicy("token", block_size=32))
    decoding = CanvasDecoding(**{**preset("generation", "tiny_gemma"), "max_samples": test_size})
    return decode_canvas_split(model, data, decoding, "test")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=ASSETS / "tiny-diffusion-gemma")
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--balance-weight", type=float, default=0.01, help="Switch load balancing")
    ap.add_argument("--test-size", type=int, default=500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    init = args.out.with_name(f"{args.out.name}.init")
    if not (init / "config.json").is_file():
        initial_model(init, args.seed)
    weights = train(init, args.out.with_name(f"{args.out.name}.run"), args)
    model = load_model(init)
    load_adapted(model, weights, RoutingPolicy("token", block_size=32))
    model.to(torch.bfloat16).save_pretrained(args.out)
    char_tokenizer().save_pretrained(args.out)
    measured = quality(args.out, args.test_size)
    record = {
        "train_steps": args.steps, "batch_size": args.batch_size, "lr": args.lr,
        "balance_weight": args.balance_weight,
        "test_problems": measured["samples"], "exact_match": measured["accuracy"],
        "exact_match_by_skill": measured.get("accuracy_by_skill", {}),
        "correct": measured["correct"],
        "unique_experts_per_block": measured["unique_experts_per_block"],
        "unique_experts_per_canvas": measured["unique_experts_per_canvas"],
        "forwards_per_canvas": measured["forwards_per_canvas"],
        "tokens_per_forward": measured["tokens_per_forward"],
        "decoding": measured["settings"],
    }  # fmt: skip
    (args.out / "quality.json").write_text(json.dumps(record, indent=2) + "\n")
    for path in args.out.iterdir():
        path.chmod(file_mode())
    print(json.dumps({k: v for k, v in record.items() if k != "correct"}, indent=2))


if __name__ == "__main__":
    main()
