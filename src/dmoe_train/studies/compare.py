"""`make compare`: the same test prompts under every routing policy and the trained router.

Writes `results/compare.md`, `results/compare.csv` and the Pareto plot `results/compare.png`
(unique experts per block against accuracy retained relative to token routing).
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dmoe_train.evaluation.run import (  # noqa: E402
    CANVAS_COLUMNS,
    COLUMNS,
    format_table,
    prepare_eval,
    retained,
    run_eval,
)
from dmoe_train.evaluation.split_decoding import first_prompts, interleaved_latency  # noqa: E402
from dmoe_train.reports import save_figure  # noqa: E402
from dmoe_train.resolvers import PROJECT_ROOT, composed  # noqa: E402
from dmoe_train.routing import RoutingPolicy  # noqa: E402

# every training-free row: the base's router under each rule
ROWS = {
    "token": ["router=token"],
    "topk_cap (k/2)": ["router=topk_cap"],
    "des_vote (8)": ["router=des_vote"],
    "des_vote (16)": ["router=des_vote", "router.capacity=16"],
    "capacity_max (8)": ["router=capacity_max"],
    "topp 0.6 training-free": ["router=topp", "router.top_p=0.6"],
    "topp 0.9 training-free": ["router=topp", "router.top_p=0.9"],
    "topp 0.95 training-free": ["router=topp", "router.top_p=0.95"],
    "topp 0.99 training-free": ["router=topp", "router.top_p=0.99"],
    # the published rules at this base's scale (blocks of 8, 32 experts)
    "dmoe 0.6 (guard 8) training-free": [
        "router=dmoe",
        "router.block_size=8",
        "router.min_experts=8",
    ],
    "llada22 (capacity 8) training-free": [
        "router=llada22",
        "router.block_size=8",
        "router.capacity=8",
    ],
    "expert_choice static": ["router=expert_choice"],
    "expert_choice linear_reverse": [
        "router=expert_choice",
        "router.schedule=linear_reverse",
        "router.k_min=2",
        "router.k_max=8",
    ],
    "expert_choice in top-p 0.9 coreset": ["router=expert_choice_topp"],
}
RETROFIT = PROJECT_ROOT / "outputs" / "retrofit_ec" / "checkpoints" / "router.safetensors"
TRAINED = "topp trained router"
GOAL_RETAINED = 0.95  # the main job's: at least this share, with fewer experts than every rule


def newest_router(outputs: Path) -> Path:
    """The newest top-p router of `make train` (not the expert-choice retrofit)."""
    found = sorted(
        (p for p in outputs.glob("*/checkpoints/router.safetensors") if p != RETROFIT),
        key=lambda p: p.stat().st_mtime,
    )
    if not found:
        raise SystemExit(f"no router checkpoint under {outputs}/: run `make train` first")
    return found[-1]


# compare.csv columns: its name -> the metrics key
CSV_COLUMNS = {
    "unique_experts_per_block": "unique_experts_per_block",
    "unique_experts_masked": "unique_experts_per_block_masked",
    "accuracy": "accuracy",
    "accuracy_retained": "accuracy_retained",
    "expert_bytes_per_block": "expert_bytes_per_block",
    "forwards_per_block": "forwards_per_block",
    "expert_bytes_per_generated_token": "expert_bytes_per_generated_token",
    "load_balance_cv": "load_balance_cv",
    "experts_per_token": "experts_per_token",
    "expert_flops_per_token": "expert_flops_per_token",
    "latency_ms_per_token": "latency_ms_per_token",
    "latency_vs_token": "latency_vs_token",
}
LATENCY_PROMPTS, LATENCY_ROUNDS = 64, 9


# a DiffusionGemma model's canvases (`generation=tiny_gemma`): its own measures, no latency rounds
CANVAS_CSV_COLUMNS = {
    key: key
    for key in (
        "unique_experts_per_block", "unique_experts_per_canvas", "forwards_per_canvas",
        "tokens_per_forward", "accuracy", "accuracy_retained", "expert_bytes_per_generated_token",
    )
}  # fmt: skip


def has_canvas_metrics(m: dict) -> bool:
    """Whether an evaluation's metrics count per canvas (DiffusionGemma) rather than per block;
    the model itself is asked by `routing_control.is_canvas_model`."""
    return "unique_experts_per_canvas" in m


def run_rows(rows: dict[str, list[str]], out: Path, overrides: list[str]) -> dict[str, dict]:
    """`dmoe-eval` for every row on the same test prompts, retained against the token row; then
    every row's decode latency on the same prompts, in interleaved rounds, against token's (not
    for DiffusionGemma's canvases: transformers' `generate` is timed as a whole there)."""
    results, runs = {}, {}
    for i, (name, extra) in enumerate(rows.items()):
        row_dir = f"paths.output_dir={out / 'compare' / str(i)}"
        cfg = composed("eval", [row_dir, "reference_token=false", *extra, *overrides])
        results[name] = run_eval(cfg)
        if not has_canvas_metrics(results[name]):
            model, data, settings = prepare_eval(cfg)
            runs[name] = (model, settings)
    token = results["token"]
    for m in results.values():
        m["accuracy_retained"] = retained(m["accuracy"], token["accuracy"])
    if runs:
        prompts, gen_length = first_prompts(data, "test", LATENCY_PROMPTS, runs["token"][1])
        latency = interleaved_latency(runs, "token", prompts, gen_length, LATENCY_ROUNDS)
        for name, m in results.items():
            m |= latency[name]
    return results


def verdict(results: dict[str, dict]) -> str:
    """Whether the trained router keeps >= `GOAL_RETAINED` of token routing's exact match with
    fewer experts per block than every training-free row that keeps at least as much."""
    t = results[TRAINED]
    kept, experts = t["accuracy_retained"] or 0.0, t["unique_experts_per_block"]
    rivals = [
        (m["unique_experts_per_block"], name)
        for name, m in results.items()
        if name in ROWS and (m["accuracy_retained"] or 0.0) >= kept
    ]
    fewest = min(rivals, default=None)
    if fewest is None:
        rival = "no training-free row keeps as much"
    else:
        rival = f"the training-free rows keeping as much need {fewest[0]:.2f} ({fewest[1]}) or more"
    met = kept >= GOAL_RETAINED and (fewest is None or experts < fewest[0])
    return (
        f"- the trained router keeps {kept:.1%} of token routing's exact match at {experts:.2f} "
        f"experts per block; {rival}. Goal (>= {GOAL_RETAINED:.0%} with fewer experts than every "
        f"training-free rule at that accuracy): {'met' if met else 'not met'}"
    )


def write_csv(results: dict[str, dict], path: Path) -> None:
    columns = CANVAS_CSV_COLUMNS if has_canvas_metrics(results["token"]) else CSV_COLUMNS
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["run", "rule", *columns])
        for name, m in results.items():
            rule = RoutingPolicy.from_record(m["policy"]).rule
            w.writerow([name, rule, *(m[key] for key in columns.values())])


def plot(results: dict[str, dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in results.items():
        if m["accuracy_retained"] is None:  # token routing scored 0: nothing to retain
            continue
        ax.scatter(m["unique_experts_per_block"], m["accuracy_retained"])
        ax.annotate(name, (m["unique_experts_per_block"], m["accuracy_retained"]), fontsize=7)
    ax.set_xlabel("unique experts per block (mean over MoE layers)")
    ax.set_ylabel("accuracy retained vs token routing")
    save_figure(fig, ax, path, legend=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--router", type=Path, help="trained router (default: newest in outputs/)")
    ap.add_argument("--out", type=Path, default=PROJECT_ROOT / "results")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for every row")
    args = ap.parse_args()
    router = args.router or newest_router(PROJECT_ROOT / "outputs")
    rows = {**ROWS, TRAINED: [f"router_checkpoint={router}"]}
    if RETROFIT.is_file():  # `make retrofit`
        rows["expert_choice retrofit (trained)"] = [f"router_checkpoint={RETROFIT}"]
    else:
        print(f"no expert-choice retrofit row: {RETROFIT} is missing (`make retrofit`, 27 min)")
    results = run_rows(rows, args.out, args.overrides)
    shown = router.resolve()
    shown = shown.relative_to(PROJECT_ROOT) if shown.is_relative_to(PROJECT_ROOT) else shown
    args.out.mkdir(parents=True, exist_ok=True)
    columns = CANVAS_COLUMNS if has_canvas_metrics(results["token"]) else COLUMNS
    table = format_table(list(results.values()), list(results), columns)
    on = f"`{' '.join(args.overrides)}`" if args.overrides else "the embedded default"
    (args.out / "compare.md").write_text(
        f"# Routing policies on {on}\n\ntrained router: `{shown}`\n\n{table}\n\n"
        f"{verdict(results)}\n"
    )
    write_csv(results, args.out / "compare.csv")
    plot(results, args.out / "compare.png")
    print(table)


if __name__ == "__main__":
    main()
