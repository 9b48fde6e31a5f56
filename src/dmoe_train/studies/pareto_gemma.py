"""`make pareto-gemma`: block routing on DiffusionGemma, transformers' own MoE dLLM, measured on
the tiny base shipped in `assets/tiny-diffusion-gemma` (128 experts, top-8, a canvas of 64 in
blocks of 32): token routing, every training-free rule at several budgets and routers trained
by `experiment=tiny_gemma_topp`, each with unique experts per block and per canvas, forwards per
canvas, tokens committed per forward and exact match with 95% paired-bootstrap intervals, on
the same test prompts and sampler seed. Points are kept under `<out>/pareto_gemma/` as
`make pareto`'s are. Writes `<out>/pareto_gemma.{md,csv,png}`."""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dmoe_train.evaluation.frontier import (  # noqa: E402
    Point,
    bootstrap_intervals,
    dominated,
    share_kept,
)
from dmoe_train.locations import ASSETS, PROJECT_ROOT  # noqa: E402
from dmoe_train.reports import accuracy_line, markdown_table, save_figure, write_report  # noqa: E402
from dmoe_train.routing import RoutingPolicy  # noqa: E402
from dmoe_train.studies.pareto_points import StudyPoint, Training, free, trained  # noqa: E402
from dmoe_train.studies.point_store import PointStore, point_file  # noqa: E402

BASE = ASSETS / "tiny-diffusion-gemma"
BLOCKS = "router.block_size=32"
# the goal this study checks: >= 99% of token routing's exact match at <= 20% of its experts
GOAL_RETAINED, GOAL_EXPERTS = 0.99, 0.20


def points() -> list[StudyPoint]:
    """Token routing first (the reference), the trained points, then every training-free rule
    at several budgets."""
    rules = [
        free("token", "token", "router=token", BLOCKS),
        *(
            free(
                "topp", f"p={p}", "router=topp", BLOCKS, "router.min_experts=8", f"router.top_p={p}"
            )
            for p in (0.5, 0.7, 0.9)
        ),
        *(
            free(name, f"c={c}", f"router={name}", BLOCKS, f"router.capacity={c}")
            for name in ("des_vote", "capacity_max")
            for c in (16, 32)
        ),
        *(free("topk_cap", f"k={k}", "router=topk_cap", BLOCKS, f"router.top_k={k}") for k in (4,)),
        free("dmoe", "p=0.6", "router=dmoe", "router.top_p=0.6"),
        free("llada22", "c=48", "router=llada22", "router.capacity=48"),
    ]
    # distilled from the base under token routing (KL, weight 1.0), as the main job trains
    routers = [
        trained(method, Training(name, 0.5, trainable=name, distill="batch"))
        for method, name in (
            ("trained", "router"),
            ("trained+lora", "router+lora"),
            ("trained+dense", "router+dense"),
        )
    ]
    return [rules[0], *routers, *rules[1:]]


def gemma_study(base: Path, out: Path, samples: int) -> PointStore:
    """`make pareto`'s store and runner, on the DiffusionGemma base and its presets, measured on
    the first `samples` test prompts."""
    study = PointStore(base, out, name="pareto_gemma", model="tiny_gemma", generation="tiny_gemma",
                  experiment="tiny_gemma_topp")  # fmt: skip
    study.eval.append(f"generation.max_samples={samples}")
    return study


def analyse(pts: list[StudyPoint], metrics: list[dict]) -> list[dict]:
    measured = [Point.measured(p.method, p.label, m) for p, m in zip(pts, metrics, strict=True)]
    token = measured[0]
    ci = bootstrap_intervals(measured, token)
    beaten = dominated(
        np.array([p.experts for p in measured]), np.array([p.accuracy for p in measured])
    )
    return [
        {
            "method": p.method,
            "label": p.label,
            "rule": RoutingPolicy.from_record(m["policy"]).rule,
            "experts_per_block": m["unique_experts_per_block"],
            "experts_per_canvas": m["unique_experts_per_canvas"],
            "share_of_token": p.experts / token.experts,
            "forwards_per_canvas": m["forwards_per_canvas"],
            "tokens_per_forward": m["tokens_per_forward"],
            "accuracy": p.accuracy,
            "accuracy_lo": ci["accuracy"][i, 0],
            "accuracy_hi": ci["accuracy"][i, 1],
            "retained": share_kept(p.accuracy, token.accuracy),
            "retained_lo": ci["retained"][i, 0],
            "retained_hi": ci["retained"][i, 1],
            "dominated": bool(beaten[i]),
            "train_seconds": m.get("train_seconds"),
            "trainable_params": m.get("trainable_params"),
        }
        for i, (p, m) in enumerate(zip(measured, metrics, strict=True))
    ]


COLUMNS = (
    "method", "label", "rule", "experts_per_block", "experts_per_canvas", "share_of_token",
    "forwards_per_canvas", "tokens_per_forward", "accuracy", "accuracy_lo", "accuracy_hi",
    "retained", "retained_lo", "retained_hi", "dominated", "train_seconds", "trainable_params",
)  # fmt: skip


def report(rows: list[dict]) -> str:
    token = rows[0]
    table = markdown_table(
        (
            "method",
            "point",
            "rule",
            "experts/block",
            "experts/canvas",
            "share of token",
            "forwards/canvas",
            "tokens/forward",
            "exact match [95% CI]",
            "retained [95% CI]",
            "dominated",
            "train s",
        ),
        (
            (
                r["method"],
                r["label"],
                r["rule"],
                f"{r['experts_per_block']:.2f}",
                f"{r['experts_per_canvas']:.2f}",
                f"{r['share_of_token']:.0%}",
                f"{r['forwards_per_canvas']:.2f}",
                f"{r['tokens_per_forward']:.2f}",
                f"{r['accuracy']:.3f} [{r['accuracy_lo']:.3f}, {r['accuracy_hi']:.3f}]",
                f"{r['retained']:.3f} [{r['retained_lo']:.3f}, {r['retained_hi']:.3f}]",
                "yes" if r["dominated"] else "",
                f"{r['train_seconds']:.0f}" if r["train_seconds"] else "-",
            )  # fmt: skip
            for r in rows
        ),
    )
    hits = [
        f"{r['method']} {r['label']}"
        for r in rows
        if r["method"].startswith("trained")
        and r["retained"] >= GOAL_RETAINED
        and r["experts_per_block"] <= GOAL_EXPERTS * token["experts_per_block"]
    ]
    goal = (
        f"- >= {GOAL_RETAINED:.0%} of token routing's exact match at <= {GOAL_EXPERTS:.0%} of its "
        f"{token['experts_per_block']:.1f} experts per block: " + (", ".join(hits) or "not reached")
    )
    base = (
        f"- the reference: token routing's exact match on these prompts, "
        f"{token['accuracy']:.1%}; a retained share above 1 means the trained set improved the "
        "task itself, beyond what block routing costs"
    )
    return f"{table}\n\nGoal:\n\n{goal}\n{base}"


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    methods: dict[str, list[dict]] = {}
    for r in rows:
        methods.setdefault(r["method"], []).append(r)
    for method, rs in methods.items():
        rs = sorted(rs, key=lambda r: r["experts_per_block"])
        accuracy_line(ax, rs, "experts_per_block", method, bold=method.startswith("trained"))
    ax.set_xlabel("unique experts per block of 32 (mean over MoE layers, forwards, prompts)")
    ax.set_ylabel("exact match (95% bootstrap CI)")
    ax.set_title("DiffusionGemma, 128 experts, top-8, canvas 64: the same test prompts")
    save_figure(fig, ax, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", type=Path, default=BASE, help="a DiffusionGemma model directory")
    ap.add_argument("--out", type=Path, default=PROJECT_ROOT / "results")
    ap.add_argument("--report-only", action="store_true", help="report the finished points")
    ap.add_argument("--samples", type=int, default=200, help="test prompts per point")
    args = ap.parse_args()
    if not (args.base / "config.json").is_file():
        raise SystemExit(
            f"--base {args.base}: no config.json (the tiny DiffusionGemma base: "
            "python -m dmoe_train.studies.make_gemma_base)"
        )
    study = gemma_study(args.base, args.out, args.samples)
    study.claim()
    pts = points()
    if args.report_only:
        pts = [p for p in pts if point_file(study.store, p).is_file()]
    metrics = [study.measure(p, refresh=False) for p in tqdm(pts, desc="points", unit="point")]
    rows = analyse(pts, metrics)
    title = "Block routing on DiffusionGemma"
    write_report(args.out, "pareto_gemma", title, report(rows), COLUMNS, rows)
    plot(rows, args.out / "pareto_gemma.png")


if __name__ == "__main__":
    main()
