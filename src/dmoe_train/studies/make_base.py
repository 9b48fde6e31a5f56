"""Train a shipped LLaDA2-MoE base from scratch on CPU: `--base tiny` (`assets/tiny-llada2`,
32 experts, arithmetic, blocks of 8), `--base tiny256` (`assets/tiny256-llada2`, LLaDA2.0-mini's
routing regime: 256 experts, top-8, 4 of 8 groups, the four skills, blocks of 32),
`--base tiny256-broad` (the same regime on the broad suite of 12 skills), `--base
tiny256-calibrated` (the broad suite by the recipe `make calibrate` found closest to LLaDA2.0-mini's
published training-free figures: 2000 steps, router noise 3.0, bias rate 1e-4) or `--base
tiny256-dropout` (calibrated too, by expert dropout 0.75 per block instead of noise, and its
token routing touches more experts per block: 15% of them stays above top-8).

All parameters, the block-diffusion loss, per-token routing, and LLaDA2's auxiliary-loss-free load
balancing: after every step each router's `expert_bias` moves by `--bias-rate` towards the mean
load, so the base uses its experts evenly as the real one does. `--router-noise` and
`--expert-dropout` perturb the routing in training (how much a block's tokens come to agree on
their experts, the knobs `make calibrate` compares). `--routing expert_choice` trains
with expert choice instead (arXiv 2604.01622: each expert takes its top-c tokens of a routing
group, `--ec-group`; capacity from the sample's mask ratio by `--schedule` between `--k-min` and
`--k-max`; balanced by construction, so no bias balancing). Writes the model (bf16, published
layout, its routing in the config), its character tokenizer and `quality.json`: exact match on the
test split (per skill), the share of experts per block, and the training curve (validation loss
every `--val-every` steps against tokens and seconds, expert-load CV, tokens per second).
Every `--checkpoint-every` steps the run is saved to `<out>/training_state.pt`: the same command
run again resumes it, as the uninterrupted run would (the file goes once the base is written).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from dmoe_train.data.module import DiffusionDataModule, data_module
from dmoe_train.data.tokenizer import char_tokenizer
from dmoe_train.evaluation.split_decoding import (
    GenerationSettings,
    decode_split,
    masked_token_metrics,
)
from dmoe_train.files import atomic_write
from dmoe_train.models import build_model
from dmoe_train.models.block_diffusion import noised_forward
from dmoe_train.objectives.expert_metrics import (
    expert_load,
    load_balance_cv,
    unique_experts_per_block,
)
from dmoe_train.objectives.masked_diffusion import masked_diffusion_loss
from dmoe_train.routing import EC_GROUPS, SCHEDULES, RoutingPolicy
from dmoe_train.training.finetuner import router_z_loss


@torch.no_grad()
def balance_experts(loads: torch.Tensor, model: torch.nn.Module, rate: float) -> None:
    """Raise the bias of under-loaded experts and lower it for over-loaded ones; `loads`
    `[moe_layers, E]` tokens per expert."""
    moe_layers = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "gate")]
    for load, moe in zip(loads.float(), moe_layers, strict=True):
        moe.gate.expert_bias += rate * torch.sign(load.mean() - load)


def perturb_routing(
    model: torch.nn.Module, noise: float, dropout: float, span: int, seed: int
) -> torch.Generator:
    """In training only, two recipe knobs for how much the tokens of a block agree on their
    experts (seeded): Gaussian noise of std `noise` on every router's logits before its scores,
    and expert dropout, each `span` consecutive tokens of each sequence (a block, or 1: each
    token) routing without a random `dropout` share of the experts (per MoE layer; dropped by
    the selection bias alone, as a coreset drops them). Returns the generator (its state
    resumes with the run)."""
    gen = torch.Generator().manual_seed(seed)

    def perturbed(gate: torch.nn.Module, _: tuple, out: tuple) -> tuple | None:
        if not gate.training:
            return None
        logits, scores, bias = out
        if noise:
            logits = logits + noise * torch.randn(logits.shape, generator=gen).to(logits.device)
            scores = logits.sigmoid() if gate.score_function == "sigmoid" else logits.softmax(-1)
        if dropout:
            b, length, experts = logits.shape
            spans = -(-length // span)
            dropped = torch.rand(b, spans, experts, generator=gen) < dropout
            dropped = dropped.repeat_interleave(span, 1)[:, :length].to(logits.device)
            bias = (0.0 if bias is None else bias) - 1e4 * dropped.to(scores.dtype)
        return logits, scores, bias

    for layer in model.model.layers:
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(perturbed)
    return gen


# what each shipped base is: its model preset, data and pretraining recipe
BASES: dict[str, dict] = {
    "tiny": dict(
        preset="tiny", source="arithmetic", out="assets/tiny-llada2", max_seq_len=16,
        block_size=8, steps=4000, batch_size=64, lr=3e-3, train_size=14000, test_size=256,
        threshold=None,
    ),
    # LLaDA2.0-mini's routing regime: 256 experts, top-8, 4 of 8 groups, blocks of 32
    "tiny256": dict(
        preset="tiny256", source="skills", suite="four", out="assets/tiny256-llada2",
        max_seq_len=96, block_size=32, steps=4000, batch_size=48, lr=3e-3, train_size=100000,
        test_size=1000, threshold=0.95,
    ),
    # the same regime on the broad suite of 12 skills (data=broad_skills)
    "tiny256-broad": dict(
        preset="tiny256", source="skills", suite="broad", out="assets/tiny256-broad-llada2",
        max_seq_len=96, block_size=32, steps=4000, batch_size=48, lr=3e-3, train_size=100000,
        test_size=1200, threshold=0.95,
    ),
}  # fmt: skip
# the broad base's recipe with the knobs that make its blocks agree as the real model's do
BASES["tiny256-calibrated"] = BASES["tiny256-broad"] | dict(
    out="assets/tiny256-calibrated-llada2", steps=2000, router_noise=3.0, bias_rate=1e-4
)
# calibrated by expert dropout instead: its token routing touches more experts per block
BASES["tiny256-dropout"] = BASES["tiny256-broad"] | dict(
    out="assets/tiny256-dropout-llada2", steps=2000, expert_dropout=0.75, bias_rate=1e-4
)
# where a base's recipe is silent
RECIPE_DEFAULTS = dict(
    bias_rate=1e-3, router_noise=0.0, expert_dropout=0.0, expert_dropout_per="block"
)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", choices=sorted(BASES), default="tiny")
    ap.add_argument("--out")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--train-size", type=int)
    ap.add_argument("--test-size", type=int)
    ap.add_argument("--val-size", type=int, default=256, help="validation loss and accuracy")
    ap.add_argument("--bias-rate", type=float, help="default: the base's, else 1e-3")
    ap.add_argument("--eval-every", type=int, default=1000, help="exact match on 64 test prompts")
    ap.add_argument("--val-every", type=int, default=100, help="validation loss (the curve)")
    ap.add_argument("--routing", choices=("token", "expert_choice"), default="token")
    ap.add_argument("--schedule", choices=SCHEDULES, default="static")
    ap.add_argument("--k-min", type=int, help="expert choice's k at r = 0 (default: top-k)")
    ap.add_argument("--k-max", type=int, help="expert choice's k at r = 1 (default: top-k)")
    ap.add_argument("--ec-group", choices=EC_GROUPS, default="sequence")
    ap.add_argument("--z-loss", type=float, default=0.0, help="router z-loss weight")
    ap.add_argument(
        "--router-noise",
        type=float,
        help="router logit noise std in training (default: the base's, else 0)",
    )
    ap.add_argument(
        "--expert-dropout",
        type=float,
        help="share of experts dropped from routing in training (default: the base's, else 0)",
    )
    ap.add_argument(
        "--expert-dropout-per",
        choices=("block", "token"),
        help="what shares one draw of dropped experts (default: the base's, else block)",
    )
    ap.add_argument("--hidden-size", type=int, help="the width (default: the preset's)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--checkpoint-every", type=int, default=200,
        help=f"steps between saves of <out>/{STATE} (a rerun resumes from it)",
    )  # fmt: skip
    args = ap.parse_args()
    for key, value in (RECIPE_DEFAULTS | BASES[args.base]).items():  # where not given
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if not 0 <= args.expert_dropout < 1:
        ap.error(f"--expert-dropout {args.expert_dropout}: a share in [0, 1)")
    if args.router_noise < 0:
        ap.error(f"--router-noise {args.router_noise}: a std, >= 0")
    return args


def decoding_of(args: argparse.Namespace, max_samples: int) -> GenerationSettings:
    """LLaDA2's decoding at the base's block size (threshold decoding where the base uses it)."""
    return GenerationSettings.preset(
        "tiny", block_length=args.block_size, steps=args.block_size, threshold=args.threshold,
        max_samples=max_samples,
    )  # fmt: skip


def routing_of(args: argparse.Namespace) -> RoutingPolicy | None:
    """The routing the base trains with (None: the model's own token routing)."""
    if args.routing == "token":
        return None
    return RoutingPolicy(
        "expert_choice", block_size=args.block_size, k_min=args.k_min, k_max=args.k_max,
        schedule=args.schedule, ec_group=args.ec_group,
    )  # fmt: skip


STATE = "training_state.pt"  # in the output directory until the base is written
UNSAVED = ("out", "checkpoint_every", "eval_every")  # settings a resumed run may change


def resumable(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k not in UNSAVED}


def train_base(
    model: torch.nn.Module,
    data: DiffusionDataModule,
    args: argparse.Namespace,
    state: Path,
    perturbation: torch.Generator | None = None,
) -> list[dict]:
    """Block-diffusion pretraining from scratch, every parameter, with LLaDA2's bias balancing
    under token routing. Every `--checkpoint-every` steps and at the end the run is saved to
    `state` (weights, optimizer, schedule, random streams, curve); a run that finds it continues
    from it, as the uninterrupted run would. Returns the curve: one row per `--val-every` steps."""
    cfg = model.config
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.95))
    # the schedule router fine-tuning uses (configs/train.yaml: module.scheduler), to zero
    sched = get_cosine_with_min_lr_schedule_with_warmup(
        opt, args.steps // 20, args.steps, min_lr_rate=0.0
    )
    gen = torch.Generator().manual_seed(args.seed)
    streams = {"diffusion": gen} | ({"routing": perturbation} if perturbation is not None else {})
    run = {"step": 0, "curve": [], "seconds": 0.0, "tokens": 0, "cvs": []}  # seconds: training
    if state.is_file():
        saved = torch.load(state, weights_only=False)
        if saved["args"] != resumable(args):
            changed = sorted(k for k in resumable(args) if saved["args"].get(k) != getattr(args, k))
            raise SystemExit(
                f"{state}: a run of other settings ({', '.join(changed)}); move it away to start "
                "afresh, or rerun with its settings to resume it"
            )
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        for name, stream in streams.items():
            stream.set_state(saved["streams"][name])
        run = saved["run"]
        print(f"resumed from {state} at step {run['step']}", flush=True)

    def save() -> None:
        saved = {
            "args": resumable(args), "model": model.state_dict(), "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "streams": {name: s.get_state() for name, s in streams.items()}, "run": run,
        }  # fmt: skip
        atomic_write(state, lambda tmp: torch.save(saved, tmp))  # never half a file

    curve, cvs = run["curve"], run["cvs"]
    model.train()
    for step, batch in enumerate(data.stream_loader(args.steps, run["step"]), run["step"]):
        began = time.perf_counter()
        ids = batch["input_ids"]
        uniforms = torch.rand(len(ids), 1 + ids.shape[1], generator=gen)
        out = noised_forward(
            model, ids, batch["response_mask"], cfg.mask_token_id, 0.0, 1.0,
            "block_diffusion", args.block_size, uniforms,
        )  # fmt: skip
        loss = masked_diffusion_loss(out.logits, ids, out.masked, out.t, "none")
        if args.z_loss:
            loss = loss + args.z_loss * router_z_loss(out.routing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        loads = torch.stack([expert_load(r.ids, cfg.num_experts) for r in out.routing])
        if args.routing == "token":
            balance_experts(loads, model, args.bias_rate)
        run["seconds"] += time.perf_counter() - began
        run["tokens"] += ids.numel()
        cvs.append(float(load_balance_cv(loads).mean()))  # mean over MoE layers
        if args.val_every and ((step + 1) % args.val_every == 0 or step + 1 == args.steps):
            model.eval()
            val = masked_token_metrics(model, data, args.block_size, 0.0, 1.0)
            model.train()
            curve.append(dict(
                step=step + 1, tokens=run["tokens"], seconds=round(run["seconds"], 2),
                val_loss=val["loss"], val_accuracy=val["accuracy"], load_cv=sum(cvs) / len(cvs),
            ))  # fmt: skip
            cvs.clear()
        if step % 100 == 0:
            unique = sum(
                unique_experts_per_block(r.ids, args.block_size).float().mean() for r in out.routing
            ) / len(out.routing)
            print(
                f"step {step:5d}  loss {loss.item():.4f}  unique experts {unique:.1f}  "
                f"{run['seconds']:6.1f}s",
                flush=True,
            )
        if args.eval_every and step and step % args.eval_every == 0:
            model.eval()
            m = decode_split(model, data, decoding_of(args, 64), "test")
            model.train()
            print(f"step {step:5d}  exact match on 64 test prompts {m.accuracy:.3f}", flush=True)
        run["step"] = step + 1
        if run["step"] % args.checkpoint_every == 0 or run["step"] == args.steps:
            save()
    return curve


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    tokenizer = char_tokenizer()
    width = {"hidden_size": args.hidden_size} if args.hidden_size else {}
    model = build_model(args.preset, seed=args.seed, **width)
    perturbation = None
    if args.router_noise or args.expert_dropout:
        span = args.block_size if args.expert_dropout_per == "block" else 1
        perturbation = perturb_routing(
            model, args.router_noise, args.expert_dropout, span, args.seed
        )
    if (policy := routing_of(args)) is not None:
        model.set_routing(policy)
    # the data module reads its tokenizer from a model directory: the base-to-be's
    tok_dir = Path(tempfile.mkdtemp())
    tokenizer.save_pretrained(tok_dir)
    (tok_dir / "config.json").write_text(json.dumps(model.config.to_dict()))
    suite = {"suite": args.suite} if "suite" in BASES[args.base] else {}
    data = data_module(
        str(tok_dir), source=args.source, max_seq_len=args.max_seq_len,
        batch_size=args.batch_size, train_size=args.train_size, val_size=args.val_size,
        test_size=args.test_size, **suite,
    )  # fmt: skip
    data.setup()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    curve = train_base(model, data, args, out_dir / STATE, perturbation)
    model.eval()
    test = decode_split(model, data, decoding_of(args, args.test_size), "test")
    quality = {
        "base": args.base,
        "train_steps": args.steps,
        "batch_size": args.batch_size,
        "recipe": {k: getattr(args, k) for k in ("lr", "z_loss", *RECIPE_DEFAULTS)}
        | {"hidden_size": model.config.hidden_size, "suite": getattr(args, "suite", None)},
        "routing": model.config.routing.to_dict(),
        "train_seconds": curve[-1]["seconds"] if curve else None,
        "train_tokens_per_s": curve[-1]["tokens"] / curve[-1]["seconds"] if curve else None,
        "masked_token_accuracy": masked_token_metrics(model, data, args.block_size)["accuracy"],
        "test_problems": test.samples,
        "exact_match": test.accuracy,
        "exact_match_by_skill": test.accuracy_by_skill or {},
        "final_answer_by_skill": test.final_answer_by_skill or {},
        "correct": test.correct,  # per test problem: paired intervals between bases
        "unique_experts_per_block": test.unique_experts_per_block,
        "share_of_experts_per_block": test.unique_experts_per_block / model.config.num_experts,
        "decoding": test.settings,
        "curve": curve,
    }
    print(json.dumps({k: v for k, v in quality.items() if k != "curve"}, indent=2))
    model.to(torch.bfloat16).save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / "quality.json").write_text(json.dumps(quality, indent=2) + "\n")
    (out_dir / STATE).unlink()  # the base is written: nothing left to resume


if __name__ == "__main__":
    main()
