"""`make pareto`: accuracy against unique experts per block for every routing method on the
256-expert base (LLaDA2.0-mini's routing regime), on the same test prompts.

The points (`pareto_points`): training-free methods at several coreset sizes, the published rules
(dMoE, LLaDA2.2) and routers trained by `dmoe-train experiment=tiny256_topp` several ways. Every
point is stored under `<out>/pareto/` as it finishes (a trained point's run resumes from its
last checkpoint), so a rerun recomputes nothing that is done. Writes `<out>/pareto.{csv,md,png}`
and `pareto_sets.png`: the points with 95% paired-bootstrap intervals, dominated points marked,
the fewest experts per block at >= 99% and >= 95% retained per method, and the goals below.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dmoe_train.evaluation.frontier import (  # noqa: E402
    Point,
    bootstrap_intervals,
    dominated,
    fewest_experts,
    share_kept,
    strictly_above,
)
from dmoe_train.locations import PROJECT_ROOT  # noqa: E402
from dmoe_train.models import LLaDA2MoeConfig  # noqa: E402
from dmoe_train.reports import (  # noqa: E402
    accuracy_line,
    markdown_table,
    save_figure,
    write_report,
)
from dmoe_train.routing import RoutingPolicy  # noqa: E402
from dmoe_train.studies.estimate_memory import parameter_counts  # noqa: E402
from dmoe_train.studies.pareto_points import (  # noqa: E402
    BASE,
    EXPERTS_AT_BUDGET,
    TWO_SKILLS,
    StudyPoint,
    preset_config,
    study,
)
from dmoe_train.studies.point_store import PointStore, point_file  # noqa: E402

# the goals this study checks
GOAL_RETAINED, GOAL_EXPERTS = 0.99, 0.20  # >= 99% retained at <= 20% of token's experts
SMALL_CHECKPOINT, SMALL_EXPERTS = 0.05, 0.15  # a set whose LLaDA2.0-mini checkpoint is <= 5%
HELD_OUT_RETAINED = 0.95  # of token routing on each held-out skill
HELD_SKILLS = ("reverse", "count")  # what the held-out rows never trained on
SKILL_ORDER = (*TWO_SKILLS, *HELD_SKILLS)


def paid_share(m: dict, token: dict) -> float | None:
    """The point's expert bytes per generated token as a share of token routing's."""
    key = "expert_bytes_per_generated_token"
    return m[key] / token[key] if key in m and key in token else None


def analyse(points: list[StudyPoint], metrics: list[dict]) -> list[dict]:
    """One row per point: intervals against token routing (paired bootstrap), domination."""
    measured = [Point.measured(p.method, p.label, m) for p, m in zip(points, metrics, strict=True)]
    token = next(p for p in measured if p.method == "token")
    ci = bootstrap_intervals(measured, token)
    experts = np.array([p.experts for p in measured])
    beaten = dominated(experts, np.array([p.accuracy for p in measured]))
    token_metrics = metrics[measured.index(token)]
    return [
        {
            "method": p.method,
            "label": p.label,
            "rule": RoutingPolicy.from_record(m["policy"]).rule,
            "experts": p.experts,
            "experts_share_of_token": p.experts / token.experts,
            "accuracy": p.accuracy,
            "accuracy_lo": ci["accuracy"][i, 0],
            "accuracy_hi": ci["accuracy"][i, 1],
            "retained": share_kept(p.accuracy, token.accuracy),
            "retained_lo": ci["retained"][i, 0],
            "retained_hi": ci["retained"][i, 1],
            "dominated": bool(beaten[i]),
            "forwards_per_block": m.get("forwards_per_block"),
            "expert_bytes_per_token_vs_token": paid_share(m, token_metrics),
            "train_seconds": m.get("train_seconds"),
            "trainable_params": m.get("trainable_params"),
            "accuracy_by_skill": m.get("accuracy_by_skill", {}),
            "point": point,
        }
        for i, (p, m, point) in enumerate(zip(measured, metrics, points, strict=True))
    ]


CSV_COLUMNS = (
    "method", "label", "rule", "experts", "experts_share_of_token", "accuracy", "accuracy_lo",
    "accuracy_hi", "retained", "retained_lo", "retained_hi", "dominated", "forwards_per_block",
    "expert_bytes_per_token_vs_token", "train_seconds", "trainable_params",
)  # fmt: skip


def by_method(rows: list[dict]) -> dict[str, list[dict]]:
    methods: dict[str, list[dict]] = {}
    for r in rows:
        methods.setdefault(r["method"], []).append(r)
    return {m: sorted(rs, key=lambda r: r["experts"]) for m, rs in methods.items()}


def _interval(r: dict, key: str) -> str:
    return f"{r[key]:.3f} [{r[key + '_lo']:.3f}, {r[key + '_hi']:.3f}]"


def _or_dash(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def points_table(rows: list[dict]) -> str:
    head = (
        "method", "point", "rule", "experts/block", "share of token", "exact match [95% CI]",
        "retained [95% CI]", "forwards/block", "expert bytes/token vs token", "dominated",
        "train s",
    )  # fmt: skip
    return markdown_table(
        head,
        (
            (
                r["method"],
                r["label"],
                r["rule"],
                f"{r['experts']:.2f}",
                f"{r['experts_share_of_token']:.0%}",
                _interval(r, "accuracy"),
                _interval(r, "retained"),
                _or_dash(r["forwards_per_block"], ".2f"),
                _or_dash(r["expert_bytes_per_token_vs_token"], ".0%"),
                "yes" if r["dominated"] else "",
                f"{r['train_seconds']:.0f}" if r["train_seconds"] else "-",
            )  # fmt: skip
            for r in rows
        ),
    )


def fewest_table(rows: list[dict]) -> str:
    def cell(rs: list[dict], threshold: float) -> str:
        found = fewest_experts(
            np.array([r["experts"] for r in rs]), np.array([r["retained"] for r in rs]), threshold
        )
        return "-" if found is None else f"{found[0]:.2f} ({rs[found[1]]['label']})"

    return markdown_table(
        ("method", ">= 99% retained", ">= 95% retained"),
        ((method, cell(rs, 0.99), cell(rs, 0.95)) for method, rs in by_method(rows).items()),
    )


def goal(rows: list[dict]) -> list[str]:
    """The two measured goals of `make pareto`, as report lines."""
    methods = by_method(rows)
    token = methods["token"][0]
    free = {r["method"] for r in rows if r["point"].training is None} - {"token"}
    lines = []
    for t in methods.get("trained", []):
        below = [
            m
            for m, rs in methods.items()
            if m in free
            and not strictly_above(
                (t["experts"], t["accuracy_lo"]),
                np.array([r["experts"] for r in rs]),
                np.array([r["accuracy_hi"] for r in rs]),
            )
        ]
        verdict = "above every training-free method" if not below else f"not above {below}"
        lines.append(f"- trained {t['label']} ({t['experts']:.1f} experts): {verdict}")
    for method in (m for m in ("trained", "trained+experts") if m in methods):  # measured ones
        hit = [
            t["label"]
            for t in methods[method]
            if t["retained"] >= GOAL_RETAINED and t["experts"] <= GOAL_EXPERTS * token["experts"]
        ]
        lines.append(
            f"- {method}: >= {GOAL_RETAINED:.0%} retained at <= {GOAL_EXPERTS:.0%} of token "
            f"routing's {token['experts']:.1f} experts: " + (", ".join(hit) or "not reached")
        )
    return lines


def mini_checkpoint_share(row: dict) -> float:
    """The set's checkpoint (fp32) on LLaDA2.0-mini, as a share of its routed experts' bf16
    bytes (from shapes: `estimate_memory.parameter_counts`)."""
    training = row["point"].training
    cfg = LLaDA2MoeConfig()
    routed = (cfg.num_hidden_layers - cfg.first_k_dense_replace) * 3 * cfg.num_experts
    routed *= cfg.hidden_size * cfg.moe_intermediate_size
    counts = parameter_counts(cfg, training.trainable, training.lora_rank_or_default)
    return counts.trained * 4 / (routed * 2)


def nearest_training_free(rows: list[dict], experts: float) -> dict:
    """The training-free top-p point closest in experts per block: the coreset of that size."""
    return min(
        (r for r in rows if r["method"] == "topp"), key=lambda r: abs(r["experts"] - experts)
    )


def at_budget(rows: list[dict]) -> list[dict]:
    """The trainable sets trained on every skill of the suite: at top_p 0.6 for 500 steps, and
    LONG_CHEAP's 3000-step runs where the study has them."""
    return [
        r
        for r in rows
        if r["method"] == "sets"
        or (r["method"] == "trained+experts" and r["point"].training == EXPERTS_AT_BUDGET)
    ]


def held_out_report(rows: list[dict]) -> list[str]:
    """Per-skill exact match of every held-out row beside token routing, the same sets trained
    on all four skills and the training-free coreset of the same size; then the goal lines."""
    token = next(r for r in rows if r["method"] == "token")
    held = [r for r in rows if r["method"] == "held-out"]
    if not held:
        return []
    free = {id(f): f for f in (nearest_training_free(rows, r["experts"]) for r in held)}
    shown = [
        (token, "all four (the base)"),
        *((r, "all four") for r in at_budget(rows)),
        *((f, "- (training-free)") for f in free.values()),
        *((r, r["point"].training.trained_on()) for r in held),
    ]
    table = markdown_table(
        ("row", "trained on", "experts/block", *SKILL_ORDER, "all [95% CI]"),
        (
            (
                f"{r['method']} {r['label']}",
                trained_on,
                f"{r['experts']:.2f}",
                *(f"{r['accuracy_by_skill'].get(k, float('nan')):.1%}" for k in SKILL_ORDER),
                _interval(r, "accuracy"),
            )  # fmt: skip
            for r, trained_on in shown
        ),
    )
    lines = [
        "Skills held out (top_p 0.6, 500 steps; every row on the same 1000 test prompts of all "
        "four skills; held-out rows saw no prompt, response or KL input of reverse and count):",
        "",
        table,
        "",
        f"Held-out goal (>= {HELD_OUT_RETAINED:.0%} of token routing's exact match on reverse "
        "and count, and never below the training-free coreset of the same size):",
        "",
    ]
    for r in held:
        f = nearest_training_free(rows, r["experts"])
        ratio = min(r["accuracy_by_skill"][k] / token["accuracy_by_skill"][k] for k in HELD_SKILLS)
        above = all(r["accuracy_by_skill"][k] >= f["accuracy_by_skill"][k] for k in HELD_SKILLS)
        reached = "reached" if ratio >= HELD_OUT_RETAINED else "not reached"
        lines.append(
            f"- {r['label']}: {ratio:.1%} of token routing on the worse held-out skill "
            f"({reached}); {'never below' if above else 'below'} topp {f['label']} "
            f"({f['experts']:.1f} experts)"
        )
    return lines


def trainable_sets_report(rows: list[dict]) -> list[str]:
    """The trainable-set frontier (`at_budget`) as a table, and the small-checkpoint goal."""
    sets = sorted(at_budget(rows), key=lambda r: r["trainable_params"] or float("inf"))
    if not sets:
        return []
    token = next(r for r in rows if r["method"] == "token")
    shares = [mini_checkpoint_share(r) for r in sets]
    table = markdown_table(
        (
            "set",
            "top_p",
            "steps",
            "trainable (this base)",
            "LLaDA2.0-mini checkpoint (fp32) of its routed experts' bf16 bytes",
            "experts/block",
            "retained [95% CI]",
            "train s",
        ),  # fmt: skip
        (
            (
                r["point"].training.set_label,
                str(r["point"].training.top_p),
                str(r["point"].training.steps_or_default),
                f"{r['trainable_params'] / 1e6:.2f}M" if r["trainable_params"] else "-",
                f"{share:.2%}",
                f"{r['experts']:.2f}",
                _interval(r, "retained"),
                f"{r['train_seconds']:.0f}",
            )  # fmt: skip
            for r, share in zip(sets, shares, strict=True)
        ),
    )
    hits = [
        r["label"]
        for r, share in zip(sets, shares, strict=True)
        if share <= SMALL_CHECKPOINT
        and r["retained"] >= GOAL_RETAINED
        and r["experts"] <= SMALL_EXPERTS * token["experts"]
    ]
    return [
        "Trainable sets (trained on every skill of the suite):",
        "",
        table,
        "",
        f"- a set whose LLaDA2.0-mini checkpoint is <= {SMALL_CHECKPOINT:.0%} of the routed "
        f"experts' bytes keeps >= {GOAL_RETAINED:.0%} at <= {SMALL_EXPERTS:.0%} of token routing's "
        f"{token['experts']:.1f} experts: "
        + (", ".join(hits) or "not reached")
        + below_guard(SMALL_EXPERTS * token["experts"]),
    ]


def below_guard(budget: float) -> str:
    """Why a budget of experts per block is out of the trained points' reach: below the top-p
    coreset's floor (the preset's `router.min_experts`, which `RoutingPolicy` keeps >= the
    model's top-k: a block whose tokens each use k experts uses at least k)."""
    floor = preset_config().router.min_experts
    if budget >= floor:
        return ""
    return (
        f" ({budget:.1f} experts: below the trained coresets' floor, min_experts {floor}, "
        "never below the k experts each token uses)"
    )


def ablation_report(rows: list[dict]) -> list[str]:
    """Every top_p 0.5 router, one objective switch per row, as report lines."""
    runs = [
        r
        for r in rows
        if r["method"] in ("trained", "ablation", "trained+experts")
        and r["point"].training.top_p == 0.5
    ]
    if not runs:
        return []
    table = markdown_table(
        ("setting", "experts/block", "exact match [95% CI]", "retained", "train s"),
        (
            (
                r["label"] + (" (router+experts)" if r["method"] == "trained+experts" else ""),
                f"{r['experts']:.2f}",
                _interval(r, "accuracy"),
                f"{r['retained']:.3f}",
                f"{r['train_seconds']:.0f}",
            )  # fmt: skip
            for r in runs
        ),
    )
    return [
        "Ablation (trained routers at top_p 0.5, 500 steps; one switch at a time):",
        "",
        table,
    ]


def markdown(rows: list[dict]) -> str:
    lines = [
        points_table(rows),
        "",
        "Fewest experts per block at a retained share, per method:",
        "",
        fewest_table(rows),
        "",
        *ablation_report(rows),
        "",
        *trainable_sets_report(rows),
        "",
        *held_out_report(rows),
        "",
        *(["Goal:", "", *verdicts] if (verdicts := goal(rows)) else []),
    ]
    return "\n".join(lines)


def plot_sets(rows: list[dict], path: Path) -> None:
    """Retained exact match against trainable parameters (log scale), top_p 0.6 unless named."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group, marker in (
        (at_budget(rows), "o"),
        ([r for r in rows if r["method"] == "held-out"], "s"),
    ):
        group = [r for r in group if r["trainable_params"]]
        if not group:
            continue
        ax.errorbar(
            [r["trainable_params"] for r in group],
            [r["retained"] for r in group],
            yerr=[
                [r["retained"] - r["retained_lo"] for r in group],
                [r["retained_hi"] - r["retained"] for r in group],
            ],
            fmt=marker,
            capsize=2,
            label="every skill" if marker == "o" else "add + sort only (held out)",
        )
        for r in group:
            # every skill: the set (its steps and top_p where not the preset's); held out: the row
            t, name = r["point"].training, r["point"].name
            if marker == "o":
                name = t.set_label + (f" {t.steps} steps" if t.steps else "")
                name += f" p={t.top_p}" if t.top_p != 0.6 else ""
            ax.annotate(name, (r["trainable_params"], r["retained"]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # the decades alone: minor labels collide
    ax.axhline(GOAL_RETAINED, ls="--", c="grey", lw=0.8, label="99% of token routing")
    ax.set_xlabel("trainable parameters (this base; log scale)")
    ax.set_ylabel("exact match retained (95% CI)")
    ax.set_title("256 experts, top_p 0.6 unless named: what must train")
    save_figure(fig, ax, path)


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    token = by_method(rows)["token"][0]
    for method, rs in by_method(rows).items():
        if method in ("ablation", "held-out"):  # own tables; the figure shows frontiers
            continue
        line = accuracy_line(ax, rs, "experts", method, bold=method == "trained")
        hollow = [r for r in rs if r["dominated"]]
        ax.scatter(
            [r["experts"] for r in hollow],
            [r["accuracy"] for r in hollow],
            s=40,
            facecolors="white",
            edgecolors=line[0].get_color(),
            zorder=3,
        )
    ax.axhline(GOAL_RETAINED * token["accuracy"], ls="--", c="grey", lw=0.8,
               label="99% of token routing")  # fmt: skip
    ax.axvline(GOAL_EXPERTS * token["experts"], ls=":", c="grey", lw=0.8,
               label="20% of token's experts")  # fmt: skip
    ax.set_xlabel("unique experts per block (mean over MoE layers, forwards, prompts)")
    ax.set_ylabel("exact match (95% bootstrap CI); hollow: dominated")
    ax.set_title("256 experts, top-8, blocks of 32: the same test prompts for every point")
    save_figure(fig, ax, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--base", type=Path, default=BASE, help="the base (a model directory)")
    ap.add_argument("--out", type=Path, default=PROJECT_ROOT / "results")
    ap.add_argument("--no-trained", action="store_true", help="training-free points only")
    ap.add_argument(
        "--report-only", action="store_true", help="report the finished points, compute none"
    )
    ap.add_argument(
        "--data", choices=("skills", "broad_skills"), default="skills", help="its test split"
    )
    args = ap.parse_args()
    if not (args.base / "model.safetensors").is_file():
        raise SystemExit(
            f"--base {args.base}: no model.safetensors (the 256-expert base: "
            "python -m dmoe_train.studies.make_base --base tiny256)"
        )
    runner = PointStore(args.base, args.out, data=args.data)
    points = study(
        runner.generated, with_trained=not args.no_trained, broad=args.data == "broad_skills"
    )
    runner.claim()
    if args.report_only:  # the points finished so far, nothing computed
        points = [p for p in points if point_file(runner.store, p).is_file()]
    metrics = [
        runner.measure(p, refresh=not args.report_only)
        for p in tqdm(points, desc="pareto points", unit="point")
    ]
    rows = analyse(points, metrics)
    title = "Pareto frontiers on the 256-expert base"
    write_report(args.out, "pareto", title, markdown(rows), CSV_COLUMNS, rows)
    plot(rows, args.out / "pareto.png")
    plot_sets(rows, args.out / "pareto_sets.png")


if __name__ == "__main__":
    main()
