"""`make pareto`: accuracy against unique experts per block for every routing method on the
256-expert base (LLaDA2.0-mini's routing regime), on the same test prompts.

Training-free methods at several coreset sizes, the published rules (dMoE, LLaDA2.2) and routers
trained by `dmoe-train experiment=tiny256_topp` at several settings. Every point is stored under
`results/pareto/` as it finishes (a trained point's run resumes from its last checkpoint), so a
rerun recomputes nothing that is done. Writes `results/pareto.{csv,md,png}`: the points with 95%
paired-bootstrap intervals, dominated points marked, the fewest experts per block at >= 99% and
>= 95% retained per method, and whether the trained frontier lies above every training-free one.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dmoe_train.evaluation.frontier import (
    Point,
    bootstrap_intervals,
    dominated,
    fewest_experts,
    strictly_above,
)
from dmoe_train.locations import PROJECT_ROOT  # noqa: E402
from dmoe_train.models import LLaDA2MoeConfig  # noqa: E402
from dmoe_train.routing import RoutingPolicy  # noqa: E402
from dmoe_train.studies.estimate_memory import parameter_counts  # noqa: E402
from dmoe_train.studies.points import (  # noqa: E402
    evaluate,
    kept,
    router_checkpoint,
    train_run,
)

BASE = PROJECT_ROOT / "assets" / "tiny256-llada2"
# every evaluation: the base, the skills test split (no training data needed), LLaDA2.0 decoding
EVAL = ["model=tiny256", "data=skills", "data.train_size=64", "generation=tiny256"]
CAPACITIES = (8, 12, 16, 24, 32, 48)


@dataclass
class Spec:
    method: str
    label: str
    eval_overrides: list[str] = field(default_factory=list)
    train_overrides: list[str] | None = None  # a trained point: `dmoe-train` with these first

    @property
    def slug(self) -> str:
        return f"{self.method}__{self.label}".replace(" ", "_").replace("=", "")


def training_free() -> list[Spec]:
    blocks = "router.block_size=32"
    return [
        Spec("token", "token", ["router=token", blocks]),
        *(
            Spec(
                "topp",
                f"p={p}",
                ["router=topp", blocks, "router.min_experts=8", f"router.top_p={p}"],
            )
            for p in (0.3, 0.5, 0.7, 0.8, 0.9, 0.95, 0.99)
        ),
        *(
            Spec(name, f"c={c}", [f"router={name}", blocks, f"router.capacity={c}"])
            for name in ("des_vote", "capacity_max")
            for c in CAPACITIES
        ),
        *(  # k=1 too: the frontier then reaches the budgets of the trained points
            Spec("topk_cap", f"k={k}", ["router=topk_cap", blocks, f"router.top_k={k}"])
            for k in range(1, 8)
        ),
        *(
            Spec("dmoe", f"p={p}", ["router=dmoe", f"router.top_p={p}"])
            for p in (0.3, 0.45, 0.6, 0.75, 0.9)
        ),
        *(
            Spec("llada22", f"c={c}", ["router=llada22", f"router.capacity={c}"])
            for c in CAPACITIES
        ),
    ]


# trained routers, the frontier: top_p x objective (experiment=tiny256_topp: union 0.1, 500 steps)
DISTILL = ["regularizer=none", "module.distill_weight=1.0"]
TRAINED = [
    Spec("trained", "p=0.7 union 0.1", train_overrides=["router.top_p=0.7"]),
    Spec("trained", "p=0.5 union 0.1", train_overrides=["router.top_p=0.5"]),
    Spec("trained", "p=0.7 distill", train_overrides=["router.top_p=0.7", *DISTILL]),
    Spec("trained", "p=0.5 distill", train_overrides=["router.top_p=0.5", *DISTILL]),
    Spec("trained", "p=0.3 distill", train_overrides=["router.top_p=0.3", *DISTILL]),
    Spec(
        "trained",
        "p=0.3 union 0.1 curriculum",
        train_overrides=["router.top_p=0.3", "module.curriculum_start=0.9"],
    ),
]
# not router-only: the routed experts train too (module.trainable); its own line and goal verdict.
# At top_p 0.6 one switch each: 3x and 6x the steps, distillation, a 10x lower learning rate
EXPERTS = "module.trainable=router+experts"
WITH_EXPERTS = [
    *(
        Spec("trained+experts", f"p={p} union 0.1", train_overrides=[f"router.top_p={p}", EXPERTS])
        for p in (0.7, 0.6, 0.5)
    ),
    *(
        Spec("trained+experts", f"p=0.6 {label}", train_overrides=["router.top_p=0.6", EXPERTS, *s])
        for label, s in (
            ("union 0.1 1500 steps", ["trainer.max_steps=1500"]),
            ("union 0.1 3000 steps", ["trainer.max_steps=3000"]),
            ("distill", DISTILL),
            ("union 0.1 lr 3e-4", ["module.optimizer.lr=3e-4"]),
        )
    ),
]
# between the router and all experts at one budget (top_p 0.6, union 0.1, 500 steps): the
# trainable-set frontier (retained exact match against trainable parameters); router+experts at
# this budget is WITH_EXPERTS' "p=0.6 union 0.1"
LORA = "module.trainable=router+lora"
SETS: dict[str, list[str]] = {  # the order they are computed in
    "router": [],
    "router+shared": ["module.trainable=router+shared"],
    "router+lora r=2": [LORA, "module.lora.rank=2"],
    "router+lora": [LORA],  # rank 8, the default: 4.0% of LLaDA2.0-mini's expert bytes in fp32
    "router+lora+shared": ["module.trainable=router+lora+shared"],
    "router+experts": [EXPERTS],
}
TRAINABLE_SETS_AT_P06 = [
    Spec("sets", f"p=0.6 {name}", train_overrides=["router.top_p=0.6", *o])
    for name, o in SETS.items()
    if name != "router+experts"
]
# skills held out: the train split holds add and sort only (data.train_skills), reverse and count
# enter training in no form (not as ground truth, generations or KL inputs); evaluated on all four
TWO_SKILLS = "data.train_skills=[add,sort]"
HELD_OUT_SETS = ("router", "router+shared", "router+lora r=2", "router+experts")
# dmoe-generate of the two skills' train prompts (not shipped: `make pareto` regenerates them)
GENERATED = PROJECT_ROOT / "results" / "pareto" / "generated"
HELD_OUT = [
    *(
        Spec(
            "held-out",
            f"p=0.6 {name} add+sort{tag}",
            train_overrides=["router.top_p=0.6", TWO_SKILLS, *SETS[name], *extra],
        )  # fmt: skip
        for tag, extra in (("", []), (" distill", ["module.distill_weight=1.0"]))
        for name in HELD_OUT_SETS
    ),
]
HELD_OUT.insert(
    len(HELD_OUT_SETS),  # before the distilled rows
    Spec(
        "held-out",
        "p=0.6 router+lora r=2 add+sort generated",
        train_overrides=[
            "router.top_p=0.6",
            *SETS["router+lora r=2"],
            f"data.source={GENERATED}/rows",
        ],
    ),  # fmt: skip
)

# KL to the token-routed base on inputs of no task at all (uniformly random tokens, no labels)
HELD_OUT.append(
    Spec(
        "held-out",
        "p=0.6 router+lora r=2 add+sort distill random",
        train_overrides=[
            "router.top_p=0.6",
            TWO_SKILLS,
            *SETS["router+lora r=2"],
            "module.distill_weight=1.0",
            "module.distill_inputs=random",
        ],
    )  # fmt: skip
)


def generated_data() -> None:
    """The base's own decodes (token routing) of 4000 train prompts of the two training skills
    (`dmoe-generate`), written once under `GENERATED`; the generated row trains on these."""
    cmd = [
        sys.executable, "-m", "dmoe_train.cli.generate", "model=tiny256", "data=skills",
        TWO_SKILLS, "generation=tiny256", "max_rows=4000", f"out_dir={GENERATED}",
        f"hydra.run.dir={GENERATED}",
    ]  # fmt: skip
    if not (GENERATED / "summary.json").is_file():
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)


# the ablation: one switch at a time against "p=0.5 union 0.1" (and "p=0.5 distill") above
ABLATION = [
    Spec("ablation", f"p=0.5 {label}", train_overrides=["router.top_p=0.5", *switch])
    for label, switch in (
        ("none", ["regularizer=none"]),
        ("union 0.3", ["regularizer.weight=0.3"]),
        ("entropy 0.1", ["regularizer=entropy"]),
        ("union 0.1 expert bias", ["module.train_expert_bias=true"]),
        ("union 0.1 curriculum", ["module.curriculum_start=0.9"]),
        ("distill + union 0.1", ["module.distill_weight=1.0"]),
    )
]


def train_point(spec: Spec, runs: Path) -> tuple[Path, float]:
    """Train (or resume, or reuse) the spec's router; its checkpoint and training seconds."""
    run_dir = runs / spec.slug

    def timed() -> dict:
        # a resumed run counts only its own last part: the cost of an uninterrupted one is what
        # docs/studies.md reports, from a run that was not interrupted
        if any(str(GENERATED) in o for o in spec.train_overrides):
            generated_data()
        began = time.time()
        train_run(run_dir, ["experiment=tiny256_topp", *spec.train_overrides])
        return {"train_seconds": time.time() - began}

    seconds = kept(run_dir / "cost.json", timed)["train_seconds"]
    return router_checkpoint(run_dir), seconds


# what a user pays beside unique experts per forward: a point measured before these existed is
# measured again where that needs no training (training-free, or its run's router still there)
PAID = ("forwards_per_block", "expert_bytes_per_generated_token")


def measure_point(spec: Spec, out: Path, refresh: bool = True) -> dict:
    """The spec's metrics on the test split, computed once and kept in `out/points/<slug>`
    (`point.json`, beside run_eval's `metrics.json`); with `refresh`, measured again when it
    lacks a `PAID` metric and needs no training for it."""
    point_dir = out / "points" / spec.slug

    def measure() -> dict:
        overrides = [*EVAL, *spec.eval_overrides, "reference_token=false"]
        if spec.train_overrides is None:
            return evaluate(point_dir, overrides)
        router, seconds = train_point(spec, out / "runs")
        metrics = evaluate(point_dir, [*overrides, f"router_checkpoint={router}"])
        trained = sum(t.numel() for t in load_file(router).values())
        return metrics | {"train_seconds": seconds, "trainable_params": trained}

    trainless = (
        spec.train_overrides is None or router_checkpoint(out / "runs" / spec.slug).is_file()
    )
    return kept(
        point_dir / "point.json",
        measure,
        stale=lambda point: refresh and trainless and any(k not in point for k in PAID),
    )


def claim_store(store: Path, base: Path) -> None:
    """Tie the point store to the base it measures (the sha256 of its weights in
    `store/base.sha256`): points of another base are never mixed into this one's frontiers, and
    are left untouched."""
    digest = hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest()
    stamp = store / "base.sha256"
    claimed = stamp.read_text().strip() if stamp.is_file() else None
    if claimed is None and any((store / "points").glob("*/point.json")):
        claimed = "unknown"
    if claimed not in (None, digest):
        raise SystemExit(
            f"{store}: its points were measured on another base (sha256 {claimed[:12]}, "
            f"{base} is {digest[:12]}); move {store} away to measure this base afresh"
        )
    store.mkdir(parents=True, exist_ok=True)
    stamp.write_text(digest + "\n")


def paid_share(m: dict, token: dict) -> float | None:
    """The point's expert bytes per generated token as a share of token routing's."""
    key = "expert_bytes_per_generated_token"
    return m[key] / token[key] if key in m and key in token else None


def analyse(specs: list[Spec], metrics: list[dict]) -> list[dict]:
    """One row per point: intervals against token routing (paired bootstrap), domination."""
    points = [
        Point(s.method, s.label, m["unique_experts_per_block"], np.array(m["correct"]))
        for s, m in zip(specs, metrics, strict=True)
    ]
    token = next(p for p in points if p.method == "token")
    ci = bootstrap_intervals(points, token)
    experts = np.array([p.experts for p in points])
    accuracy = np.array([p.accuracy for p in points])
    beaten = dominated(experts, accuracy)
    rows = []
    for i, (p, m) in enumerate(zip(points, metrics, strict=True)):
        rows.append(
            {
                "method": p.method,
                "label": p.label,
                "rule": RoutingPolicy.from_record(m["policy"]).rule,
                "experts": p.experts,
                "experts_share_of_token": p.experts / token.experts,
                "accuracy": p.accuracy,
                "accuracy_lo": ci["accuracy"][i, 0],
                "accuracy_hi": ci["accuracy"][i, 1],
                "retained": p.accuracy / max(token.accuracy, 1e-9),
                "retained_lo": ci["retained"][i, 0],
                "retained_hi": ci["retained"][i, 1],
                "dominated": bool(beaten[i]),
                "forwards_per_block": m.get("forwards_per_block"),
                "expert_bytes_per_token_vs_token": paid_share(m, metrics[points.index(token)]),
                "train_seconds": m.get("train_seconds"),
                "trainable_params": m.get("trainable_params"),
                "accuracy_by_skill": m.get("accuracy_by_skill", {}),
            }
        )
    return rows


def by_method(rows: list[dict]) -> dict[str, list[dict]]:
    methods: dict[str, list[dict]] = {}
    for r in rows:
        methods.setdefault(r["method"], []).append(r)
    return {m: sorted(rs, key=lambda r: r["experts"]) for m, rs in methods.items()}


def goal(rows: list[dict]) -> list[str]:
    """The two measured goals of `make pareto`, as report lines."""
    methods = by_method(rows)
    trained = methods.get("trained", [])
    token = methods["token"][0]
    free = {s.method for s in training_free()} - {"token"}
    lines = []
    for t in trained:
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
    for method in ("trained", "trained+experts"):
        hit = [
            t
            for t in methods.get(method, [])
            if t["retained"] >= 0.99 and t["experts"] <= 0.2 * token["experts"]
        ]
        lines.append(
            f"- {method}: >= 99% retained at <= 20% of token routing's "
            f"{token['experts']:.1f} experts: "
            + (", ".join(t["label"] for t in hit) if hit else "not reached")
        )
    return lines


def markdown(rows: list[dict]) -> str:
    head = (
        "method", "point", "rule", "experts/block", "share of token", "exact match [95% CI]",
        "retained [95% CI]", "forwards/block", "expert bytes/token vs token", "dominated",
        "train s",
    )  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        secs = f"{r['train_seconds']:.0f}" if r["train_seconds"] else "-"
        forwards = r["forwards_per_block"]
        forwards = "-" if forwards is None else f"{forwards:.2f}"
        paid = r["expert_bytes_per_token_vs_token"]
        paid = "-" if paid is None else f"{paid:.0%}"
        lines.append(
            f"| {r['method']} | {r['label']} | {r['rule']} | {r['experts']:.2f} | "
            f"{r['experts_share_of_token']:.0%} | {r['accuracy']:.3f} "
            f"[{r['accuracy_lo']:.3f}, {r['accuracy_hi']:.3f}] | {r['retained']:.3f} "
            f"[{r['retained_lo']:.3f}, {r['retained_hi']:.3f}] | {forwards} | {paid} | "
            f"{'yes' if r['dominated'] else ''} | {secs} |"
        )
    lines += ["", "Fewest experts per block at a retained share, per method:", ""]
    lines += ["| method | >= 99% retained | >= 95% retained |", "|---|---|---|"]
    for method, rs in by_method(rows).items():
        cells = []
        for threshold in (0.99, 0.95):
            found = fewest_experts(
                np.array([r["experts"] for r in rs]),
                np.array([r["retained"] for r in rs]),
                threshold,
            )
            cells.append("-" if found is None else f"{found[0]:.2f} ({rs[found[1]]['label']})")
        lines.append(f"| {method} | {cells[0]} | {cells[1]} |")
    extra = [*ablation(rows), "", *trainable_sets(rows), "", *held_out(rows)]
    return "\n".join([*lines, "", *extra, "", "Goal:", "", *goal(rows)])


HELD_SKILLS = ("reverse", "count")  # what the held-out rows never trained on
SKILL_ORDER = ("add", "sort", *HELD_SKILLS)


def set_of(row: dict) -> tuple[str, int]:
    """The trainable set and LoRA rank of a point (`p=0.6 router+lora r=2 ...`)."""
    if row["method"] == "trained+experts":
        return "router+experts", 8
    words = row["label"].split()
    name = next(w for w in words if w.startswith("router"))
    return name, next((int(w[2:]) for w in words if w.startswith("r=")), 8)


def set_name(row: dict) -> str:
    return "router+experts" if row["method"] == "trained+experts" else row["label"][len("p=0.6 ") :]


def mini_checkpoint_share(row: dict) -> float:
    """The set's checkpoint (fp32) on LLaDA2.0-mini, as a share of its routed experts' bf16
    bytes (from shapes: `estimate_memory.parameter_counts`)."""
    name, rank = set_of(row)
    cfg = LLaDA2MoeConfig()
    routed = (cfg.num_hidden_layers - cfg.first_k_dense_replace) * 3 * cfg.num_experts
    routed *= cfg.hidden_size * cfg.moe_intermediate_size
    return parameter_counts(cfg, name, rank).trained * 4 / (routed * 2)


def nearest_training_free(rows: list[dict], experts: float) -> dict:
    """The training-free top-p point closest in experts per block: the coreset of that size."""
    return min(
        (r for r in rows if r["method"] == "topp"), key=lambda r: abs(r["experts"] - experts)
    )


def at_p06(rows: list[dict]) -> list[dict]:
    """The trainable sets trained on all four skills at top_p 0.6 (500 steps)."""
    return [
        r
        for r in rows
        if r["method"] == "sets"
        or (r["method"] == "trained+experts" and r["label"] == "p=0.6 union 0.1")
    ]


def held_out_training(label: str) -> str:
    """What a held-out row's training read, from its label."""
    if "generated" in label:
        return "add, sort: the base's generations"
    return "add, sort; KL on random tokens" if "random" in label else "add, sort"


def held_out(rows: list[dict]) -> list[str]:
    """Per-skill exact match of every held-out row beside token routing, the same sets trained
    on all four skills and the training-free coreset of the same size; then the goal lines."""
    token = next(r for r in rows if r["method"] == "token")
    held = [r for r in rows if r["method"] == "held-out"]
    if not held:
        return []
    free = {id(f): f for f in (nearest_training_free(rows, r["experts"]) for r in held)}
    shown = [
        (token, "all four (the base)"),
        *((r, "all four") for r in at_p06(rows)),
        *((f, "- (training-free)") for f in free.values()),
        *((r, held_out_training(r["label"])) for r in held),
    ]
    lines = [
        "Skills held out (top_p 0.6, 500 steps; every row on the same 1000 test prompts of all "
        "four skills; held-out rows saw no prompt, response or KL input of reverse and count):",
        "",
        "| row | trained on | experts/block | " + " | ".join(SKILL_ORDER) + " | all [95% CI] |",
        "|---|---|---|" + "---|" * len(SKILL_ORDER) + "---|",
    ]
    for r, trained_on in shown:
        skills = " | ".join(
            f"{r['accuracy_by_skill'].get(k, float('nan')):.1%}" for k in SKILL_ORDER
        )
        lines.append(
            f"| {r['method']} {r['label']} | {trained_on} | {r['experts']:.2f} | {skills} | "
            f"{r['accuracy']:.3f} [{r['accuracy_lo']:.3f}, {r['accuracy_hi']:.3f}] |"
        )
    lines += ["", "Held-out goal (>= 95% of token routing's exact match on reverse and count, and "
              "never below the training-free coreset of the same size):", ""]  # fmt: skip
    for r in held:
        f = nearest_training_free(rows, r["experts"])
        ratio = min(r["accuracy_by_skill"][k] / token["accuracy_by_skill"][k] for k in HELD_SKILLS)
        above = all(r["accuracy_by_skill"][k] >= f["accuracy_by_skill"][k] for k in HELD_SKILLS)
        lines.append(
            f"- {r['label']}: {ratio:.1%} of token routing on the worse held-out skill "
            f"({'reached' if ratio >= 0.95 else 'not reached'}); "
            f"{'never below' if above else 'below'} topp {f['label']} ({f['experts']:.1f} experts)"
        )
    return lines


def trainable_sets(rows: list[dict]) -> list[str]:
    """The trainable-set frontier at top_p 0.6 as a table, and the small-checkpoint goal."""
    sets = sorted(at_p06(rows), key=lambda r: r["trainable_params"] or float("inf"))
    if not sets:
        return []
    token = next(r for r in rows if r["method"] == "token")
    lines = [
        "Trainable sets at top_p 0.6 (all four skills, 500 steps):",
        "",
        "| set | trainable (this base) | LLaDA2.0-mini checkpoint (fp32) of its routed experts' "
        "bf16 bytes | experts/block | retained [95% CI] | train s |",
        "|---|---|---|---|---|---|",
    ]
    hits = []
    for r in sets:
        share = mini_checkpoint_share(r)
        params = f"{r['trainable_params'] / 1e6:.2f}M" if r["trainable_params"] else "-"
        lines.append(
            f"| {set_name(r)} | {params} | {share:.2%} | {r['experts']:.2f} | "
            f"{r['retained']:.3f} [{r['retained_lo']:.3f}, {r['retained_hi']:.3f}] | "
            f"{r['train_seconds']:.0f} |"
        )
        if share <= 0.05 and r["retained"] >= 0.99 and r["experts"] <= 0.15 * token["experts"]:
            hits.append(r["label"])
    lines += [
        "",
        "- a set whose LLaDA2.0-mini checkpoint is <= 5% of the routed experts' bytes keeps >= 99%"
        f" at <= 15% of token routing's {token['experts']:.1f} experts: "
        + (", ".join(hits) if hits else "not reached"),
    ]
    return lines


def save_figure(fig: plt.Figure, ax: plt.Axes, path: Path) -> None:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_sets(rows: list[dict], path: Path) -> None:
    """Retained exact match against trainable parameters (log scale) at top_p 0.6."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group, marker in (
        (at_p06(rows), "o"),
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
            label="all four skills" if marker == "o" else "add + sort only (held out)",
        )
        for r in group:
            ax.annotate(" ".join(r["label"].split()[1:]), (r["trainable_params"], r["retained"]),
                        fontsize=6, xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xscale("log")
    ax.axhline(0.99, ls="--", c="grey", lw=0.8, label="99% of token routing")
    ax.set_xlabel("trainable parameters (this base; log scale)")
    ax.set_ylabel("exact match retained (95% CI)")
    ax.set_title("256 experts, top_p 0.6: what must train")
    save_figure(fig, ax, path)


def ablation(rows: list[dict]) -> list[str]:
    """Every top_p 0.5 router, one objective switch per row, as report lines."""
    trained = ("trained", "ablation", "trained+experts")
    runs = [r for r in rows if r["method"] in trained and "p=0.5" in r["label"]]
    if not runs:
        return []
    lines = [
        "Ablation (trained routers at top_p 0.5, 500 steps; one switch at a time):",
        "",
        "| setting | experts/block | exact match [95% CI] | retained | train s |",
        "|---|---|---|---|---|",
    ]
    for r in runs:
        label = r["label"] + (" (router+experts)" if r["method"] == "trained+experts" else "")
        lines.append(
            f"| {label} | {r['experts']:.2f} | {r['accuracy']:.3f} "
            f"[{r['accuracy_lo']:.3f}, {r['accuracy_hi']:.3f}] | {r['retained']:.3f} | "
            f"{r['train_seconds']:.0f} |"
        )
    return lines


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    token = by_method(rows)["token"][0]
    for method, rs in by_method(rows).items():
        if method in ("ablation", "held-out"):  # own tables; the figure shows frontiers
            continue
        x = [r["experts"] for r in rs]
        y = [r["accuracy"] for r in rs]
        err = [
            [r["accuracy"] - r["accuracy_lo"] for r in rs],
            [r["accuracy_hi"] - r["accuracy"] for r in rs],
        ]
        line = ax.errorbar(
            x,
            y,
            yerr=err,
            marker="o",
            ms=4,
            capsize=2,
            lw=2 if method == "trained" else 1,
            label=method,
        )
        hollow = [r for r in rs if r["dominated"]]
        ax.scatter(
            [r["experts"] for r in hollow],
            [r["accuracy"] for r in hollow],
            s=40,
            facecolors="white",
            edgecolors=line[0].get_color(),
            zorder=3,
        )
    ax.axhline(0.99 * token["accuracy"], ls="--", c="grey", lw=0.8, label="99% of token routing")
    ax.axvline(0.2 * token["experts"], ls=":", c="grey", lw=0.8, label="20% of token's experts")
    ax.set_xlabel("unique experts per block (mean over MoE layers, forwards, prompts)")
    ax.set_ylabel("exact match (95% bootstrap CI); hollow: dominated")
    ax.set_title("256 experts, top-8, blocks of 32: the same test prompts for every point")
    save_figure(fig, ax, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=PROJECT_ROOT / "results")
    ap.add_argument("--no-trained", action="store_true", help="training-free points only")
    ap.add_argument(
        "--report-only", action="store_true", help="report the finished points, compute none"
    )
    args = ap.parse_args()
    if not (BASE / "model.safetensors").is_file():
        raise SystemExit(
            f"{BASE}: the 256-expert base is missing (scripts/make_base.py --base tiny256)"
        )
    free = training_free()  # token routing first: the reference of every other point
    # the goal's points before the ablation's: a run cut short still answers the goal first
    sets = TRAINABLE_SETS_AT_P06
    trained = TRAINED + WITH_EXPERTS + sets[:4] + HELD_OUT + sets[4:] + ABLATION
    specs = free[:1] + ([] if args.no_trained else trained) + free[1:]
    store = args.out / "pareto"
    claim_store(store, BASE)
    if args.report_only:  # the points finished so far, nothing computed
        specs = [s for s in specs if (store / "points" / s.slug / "point.json").is_file()]
    metrics = [
        measure_point(s, store, refresh=not args.report_only)
        for s in tqdm(specs, desc="pareto points", unit="point")
    ]
    rows = analyse(specs, metrics)
    with open(args.out / "pareto.csv", "w", newline="") as f:
        w = csv.DictWriter(
            f, fieldnames=[k for k in rows[0] if k != "accuracy_by_skill"], extrasaction="ignore"
        )
        w.writeheader()
        w.writerows(rows)
    table = markdown(rows)
    (args.out / "pareto.md").write_text(f"# Pareto frontiers on the 256-expert base\n\n{table}\n")
    plot(rows, args.out / "pareto.png")
    plot_sets(rows, args.out / "pareto_sets.png")
    print(table)


if __name__ == "__main__":
    main()
