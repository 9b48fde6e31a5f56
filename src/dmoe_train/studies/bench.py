"""`make bench`: what an expert costs, measured side by side -> bench/results.{md,json}.

1. One MoE layer (LLaDA2.0-mini shapes, random weights) on one 32-token block: time under token
   routing (~70 unique experts) and under coresets of 48/32/16/8 experts, against the ideal ratio
   (unique experts / token routing's) and as weight-read bandwidth against a measured copy.
2. Our grouped expert compute against a per-expert Python loop and a dense all-experts compute.
3. A training step, router-only against full fine-tuning: tokens/s and peak memory (each case
   in its own process, so that peaks do not mix).
4. Routing overhead: `topp_coreset` + `route_in_coreset` against token routing alone.
5. Full width on CPU: a 2-layer LLaDA2.0-mini slice (`bench_full_width.py`) and a 2-layer
   DiffusionGemma 26B-A4B slice (`bench_gemma_slice.py`) decoded under token routing and coresets.
`--quick` uses tiny shapes and two training cases (the test suite runs it); no timing is
asserted anywhere.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from dmoe_train.locations import ASSETS
from dmoe_train.models import build_model
from dmoe_train.models.block_diffusion import block_diffusion_block_mask
from dmoe_train.models.grouped_experts import expert_mlp
from dmoe_train.reports import markdown_table
from dmoe_train.routing import MoeSpec, route_in_coreset, token_topk, topp_coreset
from dmoe_train.studies import bench_gemma_slice
from dmoe_train.studies.bench_full_width import run_all as run_full_width
from dmoe_train.studies.bench_full_width import train_rows as strategy_train_rows

SELF = (sys.executable, "-m", "dmoe_train.studies.bench")  # a case in its own process

MINI = dict(hidden=2048, inter=512, experts=256, top_k=8, block=32, token_unique=70)
QUICK = dict(hidden=64, inter=32, experts=32, top_k=4, block=8, token_unique=16)
# --quick's training cases: one process and two ranks
QUICK_CASES = (("cpu", "router"), ("ddp_cpu", "router"))
TINY_BASE = ASSETS / "tiny-llada2"


def timeit(fn: Callable[[], object], repeat: int) -> float:
    """Seconds per call over `repeat` calls after a warm-up (`torch.utils.benchmark`, with this
    process's threads: its default is one)."""
    timer = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return timer.timeit(repeat).mean


def routing_with_unique(n_unique: int, s: dict, gen: torch.Generator) -> tuple:
    """Ids `[block, k]` whose union is exactly `n_unique` experts, and their weights."""
    chosen = torch.randperm(s["experts"], generator=gen)[:n_unique]
    k = min(s["top_k"], n_unique)
    # token t takes k consecutive coreset experts from t * k on: distinct within a token, and
    # the block covers all n_unique (block * k >= n_unique)
    picks = (torch.arange(s["block"])[:, None] * k + torch.arange(k)) % n_unique
    ids = chosen[picks]
    return ids, torch.full(ids.shape, 1.0 / k)


def experts(s: dict, gen: torch.Generator, grad: bool = False) -> list[torch.Tensor]:
    e, h, i = s["experts"], s["hidden"], s["inter"]
    w = [
        torch.randn(e, i, h, generator=gen) * 0.02,
        torch.randn(e, i, h, generator=gen) * 0.02,
        torch.randn(e, h, i, generator=gen) * 0.02,
    ]
    return [t.requires_grad_(grad) for t in w]


def copy_bandwidth(nbytes: int, repeat: int) -> float:
    src = torch.empty(nbytes // 4)
    dst = torch.empty_like(src)
    return 2 * nbytes / timeit(lambda: dst.copy_(src), repeat)  # read + write


def moe_layer_rows(s: dict, repeat: int, gen: torch.Generator) -> list[dict]:
    w = experts(s, gen)
    x = torch.randn(s["block"], s["hidden"], generator=gen)
    expert_bytes = 3 * s["hidden"] * s["inter"] * 4
    bandwidth = copy_bandwidth(64 * expert_bytes, repeat)
    rows, token_time = [], None
    sizes = [s["token_unique"], *[c for c in (48, 32, 16, 8) if c < s["token_unique"]]]
    if s is QUICK:
        sizes = [s["token_unique"], 12, 8, 4]
    with torch.no_grad():
        for n in sizes:
            ids, weights = routing_with_unique(n, s, gen)
            t = timeit(lambda ids=ids, weights=weights: expert_mlp(x, ids, weights, *w), repeat)
            token_time = token_time or t
            rows.append(
                {
                    "routing": "token" if n == s["token_unique"] else f"coreset {n}",
                    "unique_experts": n,
                    "ms": t * 1e3,
                    "time_ratio": t / token_time,
                    "ideal_ratio": n / s["token_unique"],
                    "vs_ideal": (t / token_time) / (n / s["token_unique"]),
                    "weight_GBps": n * expert_bytes / t / 1e9,
                    "copy_GBps": bandwidth / 1e9,
                }
            )
    return rows


def loop_reference(x, ids, weights, gate, up, down):
    """A per-expert Python loop over all experts that have tokens."""
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        token, slot = (ids == e).nonzero(as_tuple=True)
        h = F.silu(x[token] @ gate[e].T) * (x[token] @ up[e].T)
        out = out.index_add(0, token, (h @ down[e].T) * weights[token, slot, None])
    return out


def dense_reference(x, ids, weights, gate, up, down):
    """Every expert on every token, then the routing weights select."""
    h = F.silu(torch.einsum("th,eih->tei", x, gate)) * torch.einsum("th,eih->tei", x, up)
    y = torch.einsum("tei,ehi->teh", h, down)
    dense_w = torch.zeros(x.shape[0], gate.shape[0]).scatter_add(1, ids, weights)
    return (y * dense_w[..., None]).sum(1)


def compute_rows(s: dict, repeat: int, gen: torch.Generator) -> list[dict]:
    w = experts(s, gen)
    ids, weights = routing_with_unique(s["token_unique"], s, gen)
    rows = []
    for mode in ("forward", "forward+backward"):
        times = {}
        for name, fn in (
            ("grouped", expert_mlp),
            ("loop", loop_reference),
            ("dense", dense_reference),
        ):

            def run(fn=fn, backward=mode != "forward"):
                x = torch.randn(s["block"], s["hidden"], requires_grad=backward)
                wt = weights.clone().requires_grad_(backward)
                with torch.set_grad_enabled(backward):
                    out = fn(x, ids, wt, *w)
                    if backward:
                        out.square().sum().backward()

            times[name] = timeit(run, repeat)
        rows.append(
            {
                "mode": mode,
                "grouped_ms": times["grouped"] * 1e3,
                "loop_ms": times["loop"] * 1e3,
                "dense_ms": times["dense"] * 1e3,
                "speedup_vs_loop": times["loop"] / times["grouped"],
                "speedup_vs_dense": times["dense"] / times["grouped"],
            }
        )
    return rows


def routing_rows(s: dict, repeat: int, gen: torch.Generator, moe_ms: float) -> list[dict]:
    scores = torch.rand(1, s["block"], s["experts"], generator=gen)
    bias = torch.zeros(s["experts"])
    n_group, topk_group = (8, 4) if s["experts"] % 8 == 0 else (1, 1)
    moe = MoeSpec(s["experts"], s["top_k"], s["inter"], n_group=n_group, topk_group=topk_group)
    token = timeit(lambda: token_topk(scores, bias, moe=moe), repeat)

    def block():
        core = topp_coreset((scores + bias)[0], s["top_k"], 0.6, 2 * s["top_k"])
        return route_in_coreset(scores, bias, core.expand_as(scores), moe=moe)

    blk = timeit(block, repeat)
    return [
        {
            "token_routing_ms": token * 1e3,
            "block_routing_ms": blk * 1e3,
            "added_ms": (blk - token) * 1e3,
            "moe_layer_ms": moe_ms,
            "added_fraction_of_moe_layer": (blk - token) * 1e3 / moe_ms,
        }
    ]


def train_step_case(preset: str, mode: str, steps: int) -> dict:
    """One process per case: tokens/s and the process's peak resident memory."""
    torch.manual_seed(0)
    if preset == "tiny":
        model, batch, seq = build_model("tiny"), 16, 32
    else:  # two layers (dense + MoE) at LLaDA2.0-mini shapes; a 4096-token vocabulary
        model = build_model("llada2_mini", num_hidden_layers=2, vocab_size=4096)
        batch, seq = 1, 64
    for name, p in model.named_parameters():
        p.requires_grad_(mode == "full" or name.endswith("mlp.gate.weight"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    x = torch.randint(0, model.config.vocab_size, (batch, seq))

    def step():
        opt.zero_grad(set_to_none=True)
        out = model(x)
        F.cross_entropy(out.logits.flatten(0, 1), x.flatten()).backward()
        opt.step()

    t = timeit(step, steps)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "model": preset,
        "mode": mode,
        "trainable_params": trainable,
        "tokens_per_s": batch * seq / t,
        "step_ms": t * 1e3,
        "peak_rss_MB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def train_rows(presets: list[str], steps: int) -> list[dict]:
    rows = []
    for preset in presets:
        pair = []
        for mode in ("router", "full"):
            out = subprocess.run(
                [*SELF, "--train-case", preset, mode, "--repeat", str(steps)],
                check=True,
                capture_output=True,
                text=True,
            ).stdout
            pair.append(json.loads(out.strip().splitlines()[-1]))
        pair[0]["speed_vs_full"] = pair[0]["tokens_per_s"] / pair[1]["tokens_per_s"]
        pair[0]["memory_vs_full"] = pair[0]["peak_rss_MB"] / pair[1]["peak_rss_MB"]
        rows += pair
    return rows


def attention_mask_rows(lengths: list[int], block: int) -> list[dict]:
    """The block-diffusion mask of a training sequence of n tokens ([x_t ; x_0]: 2n x 2n): the
    dense additive fp32 mask (what the dense path builds, and copies to the compute dtype)
    against flex_attention's BlockMask (measured: the bytes of its index tensors)."""
    rows = []
    for n in lengths:
        block_mask = block_diffusion_block_mask(n, block)
        tensors = [t for t in block_mask.as_tuple() if isinstance(t, torch.Tensor)]
        flex = sum(t.numel() * t.element_size() for t in tensors)
        dense = 4 * (2 * n) ** 2
        rows.append(
            {
                "tokens": n,
                "dense_mask_MiB": round(dense / 2**20, 3),
                "block_mask_KiB": round(flex / 2**10, 2),
                "ratio": round(dense / flex),
                "tiles_computed": f"{1 - block_mask.sparsity() / 100:.0%}",
            }
        )
    return rows


def bounds(layer: list[dict]) -> str:
    """Fit time = fixed + per_expert * unique over the MoE-layer rows and say what it means."""
    n = torch.tensor([r["unique_experts"] for r in layer], dtype=torch.float64)
    t = torch.tensor([r["ms"] for r in layer], dtype=torch.float64)
    per_expert = float(((n - n.mean()) * (t - t.mean())).sum() / ((n - n.mean()) ** 2).sum())
    fixed = float(t.mean()) - per_expert * float(n.mean())
    over = [r["routing"] for r in layer if r["vs_ideal"] > 1.5]
    return (
        f"A least-squares fit gives time = {fixed:.2f} ms + {per_expert:.3f} ms x unique experts: "
        "the cost grows with the experts a block reads, not with tokens x top_k (only experts "
        "that received tokens are touched). The fixed part (sorting the block's token-expert "
        "pairs, gathering rows, three grouped-matmul launches, combining outputs) does not "
        "shrink with the coreset, so the smallest coresets fall short of the ideal ratio"
        + (f" ({', '.join(over)} above 1.5x)" if over else "")
        + ". The achieved weight-read bandwidth stays well under the copy bandwidth: with 32 "
        "tokens x top-k spread over the block's experts, each expert multiplies only a few rows, "
        "a matrix-vector shape that a CPU cannot run at memory speed."
    )


def table(rows: list[dict]) -> str:
    """Rows of measures as a markdown table: every key a column, floats to 3 digits."""
    keys = list(dict.fromkeys(k for r in rows for k in r))
    fmt = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    return markdown_table(keys, ([fmt(r.get(k, "")) for k in keys] for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    ap.add_argument("--out", type=Path, default=Path("bench"))
    ap.add_argument("--repeat", type=int, default=None)
    ap.add_argument("--train-case", nargs=2, metavar=("PRESET", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.train_case:
        print(json.dumps(train_step_case(*args.train_case, args.repeat or 3)))
        return
    s = QUICK if args.quick else MINI
    repeat = args.repeat or (3 if args.quick else 20)
    gen = torch.Generator().manual_seed(0)
    env = {
        "device": "cpu",
        "dtype": "float32",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "grouped_mm": hasattr(F, "grouped_mm"),
        "shapes": s,
        "quick": args.quick,
    }
    # first, while this process is small: a child's peak memory (ru_maxrss) starts from its
    # parent's at fork
    train = train_rows(
        ["tiny"] if args.quick else ["tiny", "llada2_mini_2layer"], 1 if args.quick else 3
    )
    # full width (a 2-layer LLaDA2.0-mini slice written to disk); --quick trains the tiny base
    # through one process and two (the tests of each strategy are tests/training's)
    full_width = {} if args.quick else run_full_width()
    strategies = full_width.pop("train", None) or strategy_train_rows(TINY_BASE, QUICK_CASES)
    layer = moe_layer_rows(s, repeat, gen)
    results = {
        "environment": env,
        "moe_layer": layer,
        "expert_compute": compute_rows(s, repeat, gen),
        "routing_overhead": routing_rows(s, repeat, gen, layer[0]["ms"]),
        "train_step": train,
        "train_strategies": strategies,
        "attention_mask": attention_mask_rows([16, 512] if args.quick else [512, 2048, 8192], 32),
        **{f"full_width_{case}": rows for case, rows in full_width.items()},
        # DiffusionGemma 26B-A4B's 2-layer slice: experts per forward of a 256-token canvas
        **({} if args.quick else {"gemma_slice_decode": bench_gemma_slice.run(steps=8)}),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    md = [f"# dmoe-train benchmarks\n\n`{json.dumps(env)}`\n"]
    for section, rows in results.items():
        if section != "environment":
            md += [f"## {section}\n", table(rows if isinstance(rows, list) else [rows]), ""]
    md += ["## What bounds the MoE layer\n", bounds(layer)]
    (args.out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
