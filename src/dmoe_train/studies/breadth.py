"""`make breadth`: how broad router-training data must be to keep the skills it never saw.

Routers trained on k of the broad suite's N skills (k = 2, 4, 8 and N - 2, the skills drawn by a
seed, two draws at the smallest k) and tested on all N: exact match on the held-out skills
against k, for `router` and `router+lora+shared` (the best cheap set), trained on the base's own
generations of the training skills' prompts (`dmoe-generate`), without and with KL to the
token-routed base; beside token routing and the training-free coreset of the same size
(DES-Vote at the trained point's unique experts per block). 95% paired-bootstrap intervals over
the held-out prompts on every point; every point is stored as it finishes (`<out>/breadth/`) and
a rerun resumes. Writes `<out>/breadth.{md,csv,png}` after every point (`--report-only`: from the
finished points alone).
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from dmoe_train.data.skills import BROAD  # noqa: E402
from dmoe_train.evaluation.frontier import Point, bootstrap_intervals, share_kept  # noqa: E402
from dmoe_train.locations import PROJECT_ROOT  # noqa: E402
from dmoe_train.reports import markdown_table, save_figure, write_report  # noqa: E402
from dmoe_train.studies.pareto_points import (  # noqa: E402
    BLOCKS,
    StudyPoint,
    Training,
    free,
    trained,
)
from dmoe_train.studies.point_store import PointStore, point_file  # noqa: E402

BASE = PROJECT_ROOT / "assets" / "tiny256-broad-llada2"
KS = (2, 4, 8, len(BROAD) - 2)
SETS = ("router", "router+lora+shared")
GOAL_HELD_OUT = 0.95  # of token routing's exact match on the held-out skills


@dataclass(frozen=True)
class Draw:
    """The k skills one router family trains on (`index`: which draw at this k)."""

    k: int
    index: int
    skills: tuple[str, ...]

    @property
    def slug(self) -> str:
        return f"k{self.k}_{self.index}"

    @property
    def held_out(self) -> tuple[str, ...]:
        return tuple(s for s in BROAD if s not in self.skills)


def draws(seed: int = 0) -> list[Draw]:
    """Each k's skills, drawn by `seed` (two draws at the smallest k), in the suite's order."""
    out = []
    for k in KS:
        for index in range(2 if k == KS[0] else 1):
            drawn = random.Random(f"breadth-{seed}-{k}-{index}").sample(BROAD, k)
            out.append(Draw(k, index, tuple(s for s in BROAD if s in drawn)))
    return out


def trainings(draw: Draw, store: Path, sets: tuple[str, ...] = SETS) -> list[StudyPoint]:
    """The draw's trained points: each set on the base's generations, without, then with KL."""
    return [
        trained(
            f"k={draw.k}",
            Training(
                f"{trainable}{' KL' if kl else ''} on {'+'.join(draw.skills)}",
                0.6,
                trainable=trainable,
                distill="batch" if kl else None,
                generated=store / "generated" / draw.slug,
                generated_from=draw.skills,
            ),
        )  # fmt: skip
        for kl in (False, True)
        for trainable in sets
    ]


def plan(
    drawn: list[Draw], store: Path, sets: tuple[str, ...] = SETS
) -> list[tuple[Draw, StudyPoint]]:
    """Every trained point in the order computed: one family (a set, without or with KL) at
    every draw before the next family, so a run cut short has whole curves."""
    families = zip(*(trainings(d, store, sets) for d in drawn), strict=True)
    return [pair for family in families for pair in zip(drawn, family, strict=True)]


def coreset_of_size(experts: float) -> StudyPoint:
    """The training-free coreset with the trained point's unique experts per block."""
    c = max(1, round(experts))
    return free("des_vote", f"c={c}", "router=des_vote", BLOCKS, f"router.capacity={c}")


def held_out_rows(draw: Draw, points: list[tuple[str, dict]], token: dict) -> list[dict]:
    """Exact match on the draw's held-out prompts (test prompts interleave the suite's skills
    in order: prompt i is skill i mod N) and its share of token routing's, paired intervals;
    beside it, the share kept on the training skills' prompts (a point keeping little there
    says nothing of breadth)."""
    n = len(token["correct"])
    held = np.array([BROAD[i % len(BROAD)] in draw.held_out for i in range(n)])

    def on_trained(m: dict) -> int:
        return int(np.asarray(m["correct"][:n])[~held].sum())

    as_points = [
        Point.measured(name, name, m, prompts=held) for name, m in [("token", token), *points]
    ]
    ci = bootstrap_intervals(as_points[1:], as_points[0])
    return [
        {
            "k": draw.k,
            "draw": draw.index,
            "train_skills": "+".join(draw.skills),
            "point": p.label,
            "experts": p.experts,
            "held_out": p.accuracy,
            "held_out_lo": ci["accuracy"][i, 0],
            "held_out_hi": ci["accuracy"][i, 1],
            "retained": share_kept(p.accuracy, as_points[0].accuracy),
            "retained_lo": ci["retained"][i, 0],
            "retained_hi": ci["retained"][i, 1],
            "token_held_out": as_points[0].accuracy,
            "trained_retained": on_trained(m) / max(on_trained(token), 1),
        }  # fmt: skip
        for i, (p, (_, m)) in enumerate(zip(as_points[1:], points, strict=True))
    ]


def measure_point(study: PointStore, draw: Draw, point: StudyPoint, token: dict) -> dict:
    """The trained point's held-out row, with the coreset of its size beside it."""
    m = study.measure(point)
    coreset = coreset_of_size(m["unique_experts_per_block"])
    pair = [(point.name, m), (f"coreset {coreset.name}", study.measure(coreset))]
    row, coreset_row = held_out_rows(draw, pair, token)
    return row | {
        "coreset_held_out": coreset_row["held_out"],
        "coreset_held_out_hi": coreset_row["held_out_hi"],
    }


CSV_COLUMNS = (
    "k", "draw", "train_skills", "point", "experts", "held_out", "held_out_lo", "held_out_hi",
    "retained", "retained_lo", "retained_hi", "token_held_out", "coreset_held_out",
    "trained_retained",
)  # fmt: skip


def family(row: dict) -> str:
    """The trained set of a row's point, with " KL" where it distils: one curve each."""
    return row["point"].split(" on ")[0]


def retained_cell(row: dict) -> str:
    """The share of token routing's held-out exact match, or why there is none."""
    if row["token_held_out"] == 0:  # 0/0: the draw held out only skills the base never solves
        return "- (token routing: 0%)"
    return f"{row['retained']:.1%} [{row['retained_lo']:.1%}, {row['retained_hi']:.1%}]"


def markdown(rows: list[dict], planned: int) -> str:
    """The held-out table and its verdict; `planned`: the points a whole run measures."""
    head = ["k", "draw", "point", "experts/block", "held-out exact match [95%]",
            "of token routing [95%]", "coreset of that size", "above it",
            "training skills: of token routing"]  # fmt: skip
    table = markdown_table(
        head,
        (
            (
                r["k"],
                r["draw"],
                r["point"],
                f"{r['experts']:.2f}",
                f"{r['held_out']:.1%} [{r['held_out_lo']:.1%}, {r['held_out_hi']:.1%}]",
                retained_cell(r),
                f"{r['coreset_held_out']:.1%}",
                "yes" if r["held_out_lo"] > r["coreset_held_out_hi"] else "no",
                f"{r['trained_retained']:.1%}",
            )  # fmt: skip
            for r in rows
        ),
    )
    verdict = (
        f"- the smallest k whose held-out skills keep >= {GOAL_HELD_OUT:.0%} of token routing's "
        "exact match (some draw) and never fall below the coreset of the same size (every "
        "draw), per family:"
    )
    for name in dict.fromkeys(family(r) for r in rows):  # each set, without and with KL
        ours = [r for r in rows if family(r) == name]
        kept = sorted(
            {r["k"] for r in ours if r["retained"] >= GOAL_HELD_OUT}
            - {r["k"] for r in ours if r["held_out"] < r["coreset_held_out"]}
        )
        ks = sorted({r["k"] for r in ours})
        verdict += f"\n  - {name}: {kept[0] if kept else f'none of {ks}'}"
    missing = planned - len(rows)
    if missing:  # written after every point: a run cut short reports what it measured
        verdict += f"\n- {missing} of {planned} points not measured yet: `make breadth` resumes"
    return f"{table}\n\n{verdict}"


def plot(rows: list[dict], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 5))
    for name in dict.fromkeys(family(r) for r in rows):
        rs = sorted((r for r in rows if family(r) == name), key=lambda r: r["k"])
        by_k: dict[int, list[float]] = {}
        for r in rs:
            by_k.setdefault(r["k"], []).append(r["retained"])
        # the line joins each k's mean over its draws; every draw is a point with its interval
        (line,) = ax.plot(list(by_k), [np.mean(v) for v in by_k.values()], label=name)
        ax.errorbar(
            [r["k"] for r in rs], [r["retained"] for r in rs],
            yerr=[[r["retained"] - r["retained_lo"] for r in rs],
                  [r["retained_hi"] - r["retained"] for r in rs]],
            fmt="o", ms=4, capsize=2, c=line.get_color(),
        )  # fmt: skip
    coreset = sorted(rows, key=lambda r: r["k"])
    ax.plot([r["k"] for r in coreset],
            [share_kept(r["coreset_held_out"], r["token_held_out"]) for r in coreset],
            "x", c="grey", label="coreset of the same size")  # fmt: skip
    ax.axhline(GOAL_HELD_OUT, ls="--", c="grey", lw=0.8, label=f"{GOAL_HELD_OUT:.0%} of token")
    ax.set_xlabel(f"skills in the training data (of {len(BROAD)})")
    ax.set_ylabel("held-out exact match / token routing's (95% CI)")
    save_figure(fig, ax, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", type=Path, default=BASE, help="a base trained on the broad suite")
    ap.add_argument("--out", type=Path, default=PROJECT_ROOT / "results")
    ap.add_argument("--seed", type=int, default=0, help="draws the training skills")
    ap.add_argument("--sets", nargs="+", choices=SETS, default=SETS, help="the sets trained")
    ap.add_argument(
        "--report-only", action="store_true", help="report the trained points finished, train none"
    )
    args = ap.parse_args()
    if not (args.base / "model.safetensors").is_file():
        raise SystemExit(
            f"--base {args.base}: no model.safetensors (the broad-suite base: "
            "python -m dmoe_train.studies.make_base --base tiny256-broad)"
        )
    study = PointStore(args.base, args.out, name="breadth", data="broad_skills")
    study.claim()
    planned = plan(draws(args.seed), study.store, tuple(args.sets))
    whole = len(planned)
    if args.report_only:  # the finished points (a coreset beside one is measured if missing)
        planned = [(d, p) for d, p in planned if point_file(study.store, p).is_file()]
    progress = tqdm(total=len(planned) + 1, desc="breadth points (token routing first)")
    token = study.measure(free("token", "token", "router=token", BLOCKS))
    progress.update()
    title, rows = "Held-out skills against training breadth", []
    for draw, point in planned:
        rows.append(measure_point(study, draw, point, token))
        progress.update()
        write_report(args.out, "breadth", title, markdown(rows, whole), CSV_COLUMNS, rows)
        plot(rows, args.out / "breadth.png")
    progress.close()


if __name__ == "__main__":
    main()
