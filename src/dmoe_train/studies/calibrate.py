"""`make calibrate`: how close a proxy base comes to LLaDA2.0-mini's published training-free
figures, rule by rule, at the same relative budgets (a share of token routing's unique experts
per block, each counted on its own model).

For each base: token routing (the reference), DES-Vote with the capacity at 45% and at 30% of
token routing's unique experts per block, and the top-4 cap per token (the published rule as
is: top-4 of top-8). Each retained share is given twice, with 95% paired-bootstrap intervals on
the same prompts: exact match over the whole 47-53 character answer, and the final answer alone
(the answer's last field, as the published benchmarks score a final answer after a chain). The
points are kept under `<out>/calibration/<base label>/` (resumable) with the base's
`quality.json` (its recipe), and each store is tied to its base's weights. Writes
`<out>/calibration.{md,csv}` over every store there, so the recipes tried stay in the report
without their bases at hand. The bases of one suite are also compared on the same problems: those
whose final answer token routing gets right on every one of them.

Counting: unique experts per block per denoising forward and MoE layer (dMoE's). The published
top-4 shares (43.5 of 69.5) are counted so; DES-Vote's (38 and 25 of 84) another way, so only
their shares are compared.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dmoe_train.evaluation.frontier import Point, bootstrap_intervals, share_kept
from dmoe_train.files import write_json
from dmoe_train.locations import PROJECT_ROOT
from dmoe_train.reports import markdown_table, write_report
from dmoe_train.studies.make_base import RECIPE_DEFAULTS
from dmoe_train.studies.pareto_points import BASE, BLOCKS, StudyPoint, free
from dmoe_train.studies.point_store import PointStore, point_file

RECIPE = ("suite", *RECIPE_DEFAULTS, "hidden_size")  # make_base's knobs, as recorded
CLOSE = 0.03  # the goal: within 3 points of the published DES-Vote figures


@dataclass(frozen=True)
class Published:
    """A training-free rule's figure on LLaDA2.0-mini (block 32): its unique experts as a share
    of token routing's and the accuracy it keeps."""

    rule: str
    share: float
    retained: float
    source: str


PUBLISHED = (
    Published("des_vote", 38 / 84, 0.995, "DES-Vote, 38 of 84 experts"),
    Published("des_vote", 25 / 84, 0.964, "DES-Vote, 25 of 84 experts"),
    Published(
        "topk_cap", 43.5 / 69.5, 72.4 / 90.8, "top-4 per token, 43.5 of 69.5; GSM8K 72.4 of 90.8"
    ),
)


@dataclass(frozen=True)
class ProxyBase:
    """A base to calibrate: its label (its store's name), directory and data preset."""

    label: str
    path: Path
    data: str = "skills"

    @classmethod
    def parse(cls, text: str) -> ProxyBase:
        """`LABEL=PATH` or `LABEL=PATH@DATA` (`--base`)."""
        label, _, rest = text.partition("=")
        path, _, data = rest.partition("@")
        if not label or not path:
            raise SystemExit(f"--base {text}: expected LABEL=PATH or LABEL=PATH@DATA")
        return cls(label, Path(path), data or "skills")

    def quality(self) -> dict:
        """The base's own record (`quality.json`, written by `make_base`): its recipe, per-skill
        quality and training curve, kept beside its points."""
        path = self.path / "quality.json"
        if not path.is_file():
            raise SystemExit(f"--base {self.label}: no {path} (a base made by make_base)")
        return json.loads(path.read_text())


def recipe_of(quality: dict) -> dict:
    """What the table of recipe tries compares: make_base's knobs, as recorded (a knob a base's
    record predates had make_base's default)."""
    recipe = RECIPE_DEFAULTS | quality["recipe"]
    return {"steps": quality["train_steps"]} | {k: recipe[k] for k in RECIPE}


def rule_point(published: Published, token_experts: float) -> StudyPoint:
    """The proxy's point of a published rule at the same relative budget."""
    if published.rule == "topk_cap":
        return free("topk_cap", "k=4", "router=topk_cap", BLOCKS, "router.top_k=4")
    capacity = max(1, round(published.share * token_experts))
    return free(
        "des_vote", f"c={capacity}", "router=des_vote", BLOCKS, f"router.capacity={capacity}"
    )


TOKEN = free("token", "token", "router=token", BLOCKS)


def calibrate(base: ProxyBase, out: Path) -> None:
    """Measure the base's points at the published rules' budgets, kept (resumable) in its store
    `<out>/calibration/<label>/` with the base's `quality.json` (its recipe)."""
    store = PointStore(base.path, out, name=f"calibration/{base.label}", data=base.data)
    quality = base.quality()
    store.claim()
    write_json(store.store / "quality.json", quality)
    token = store.measure(TOKEN)
    for point in tqdm(rule_points(token), desc=base.label, unit="point"):
        store.measure(point)


def rule_points(token: dict) -> list[StudyPoint]:
    return [rule_point(p, token["unique_experts_per_block"]) for p in PUBLISHED]


@dataclass(frozen=True)
class StoredBase:
    """A calibration store as read once (the base itself is not needed): its label, recipe,
    token routing's metrics and, per published figure, the proxy's point and metrics."""

    label: str
    recipe: dict
    token: dict
    measured: list[tuple[StudyPoint, dict]]

    @classmethod
    def read(cls, store: Path) -> StoredBase:
        def metrics(point: StudyPoint) -> dict:
            path = point_file(store, point)
            if not path.is_file():
                raise SystemExit(
                    f"{store}: no point {point.slug}; measure it with --base {store.name}=PATH"
                )
            return json.loads(path.read_text())

        recipe = recipe_of(json.loads((store / "quality.json").read_text()))
        token = metrics(TOKEN)
        return cls(store.name, recipe, token, [(p, metrics(p)) for p in rule_points(token)])


def stored_rows(
    base: StoredBase,
    keys: tuple[str, ...] = ("correct", "final_answer_correct"),
    prompts: np.ndarray | None = None,
) -> list[dict]:
    """One row per published figure and measure (`keys`), from a store's points and recipe: the
    proxy's share of experts, retained accuracy with intervals; on `prompts` (a mask) when given."""
    rows = []
    for key in keys:
        as_points = [
            Point.measured(p.method, p.label, m, key, prompts)
            for p, m in [(TOKEN, base.token), *base.measured]
        ]
        ci = bootstrap_intervals(as_points[1:], as_points[0])
        for i, (published, p) in enumerate(zip(PUBLISHED, as_points[1:], strict=True)):
            retained = share_kept(p.accuracy, as_points[0].accuracy)
            rows.append({
                "base": base.label, "measure": key, "rule": published.rule,
                "published_share": published.share, "published_retained": published.retained,
                "point": p.label, "share": p.experts / as_points[0].experts, "experts": p.experts,
                "token_experts": as_points[0].experts, "token_accuracy": as_points[0].accuracy,
                "prompts": len(as_points[0].correct),
                "retained": retained, "retained_lo": ci["retained"][i, 0],
                "retained_hi": ci["retained"][i, 1], "gap": retained - published.retained,
                "source": published.source,
            } | base.recipe)  # fmt: skip
    return rows


def same_problem_rows(bases: list[StoredBase]) -> list[dict]:
    """Per suite of two or more bases: each base's rows (measure `same_problems`) on the problems
    whose final answer token routing gets right on every one of them, so that a weaker base is
    not flattered by the easier problems it still solves."""
    suites: dict[tuple, dict[str, tuple]] = {}  # per suite: each base, token routing's answers
    for base in bases:
        final = np.array(base.token["final_answer_correct"], bool)
        suites.setdefault((base.recipe["suite"], len(final)), {})[base.label] = (base, final)
    rows = []
    for group in (g for g in suites.values() if len(g) > 1):
        solved = np.logical_and.reduce([final for _, final in group.values()])
        for base, _ in group.values():
            found = stored_rows(base, ("final_answer_correct",), solved)
            rows += [r | {"measure": "same_problems"} for r in found]
    return rows


CSV_COLUMNS = (
    "base", "measure", "rule", "point", "published_share", "share", "experts", "token_experts",
    "token_accuracy", "prompts", "published_retained", "retained", "retained_lo", "retained_hi",
    "gap", "steps", *RECIPE,
)  # fmt: skip


def markdown(rows: list[dict]) -> str:
    head = ["base", "published", "published share", "kept (published)", "proxy rule", "share",
            "kept: exact match [95%]", "kept: final answer [95%]", "gap: final answer"]  # fmt: skip
    exact = [r for r in rows if r["measure"] == "correct"]
    final = [r for r in rows if r["measure"] == "final_answer_correct"]
    lines = [
        (
            e["base"],
            e["source"],
            f"{e['published_share']:.0%}",
            f"{e['published_retained']:.1%}",
            f"{e['rule']} {e['point']}",
            f"{e['share']:.0%} ({e['experts']:.1f} of {e['token_experts']:.1f})",
            f"{e['retained']:.1%} [{e['retained_lo']:.1%}, {e['retained_hi']:.1%}]",
            f"{f['retained']:.1%} [{f['retained_lo']:.1%}, {f['retained_hi']:.1%}]",
            f"{100 * f['gap']:+.1f} points",
        )  # fmt: skip
        for e, f in zip(exact, final, strict=True)
    ]
    largest = largest_gaps(final)
    verdicts = [
        f"- {label}: DES-Vote within {CLOSE:.0%} of the published figures on the final answer: "
        f"{'yes' if gap <= CLOSE else 'no'} (largest gap {100 * gap:.1f} points)"
        for label, gap in largest.items()
    ]
    closest = min(largest, key=largest.get)
    verdicts.append(
        f"- closest to the published DES-Vote figures: {closest} (largest gap "
        f"{100 * largest[closest]:.1f} points)"
    )
    token = {r["base"]: (r["token_experts"], r["token_accuracy"], r["prompts"]) for r in exact}
    bases = "; ".join(f"{b}: token routing {e:.1f} experts per block, exact match {a:.1%} on "
                      f"{n} test prompts" for b, (e, a, n) in token.items())  # fmt: skip
    tries = markdown_table(
        ["base", "suite", "steps", "bias rate", "router noise", "expert dropout", "width",
         "token routing",
         *(f"{p.source.split(',')[0]} {p.share:.0%}: final answer kept" for p in PUBLISHED)],
        [(label, r["suite"], r["steps"], r["bias_rate"], r["router_noise"], dropout_cell(r),
          r["hidden_size"],
          f"{r['token_experts']:.1f} experts, {r['token_accuracy']:.1%} exact match",
          *(f"{x['retained']:.1%}" for x in final if x["base"] == label))
         for label, r in {r["base"]: r for r in exact}.items()],
    )  # fmt: skip
    return "\n".join([
        markdown_table(head, lines), "", bases, "", *verdicts, "",
        *same_problems_section([r for r in rows if r["measure"] == "same_problems"]),
        "## The recipes tried", "", tries,
    ])  # fmt: skip


def dropout_cell(recipe: dict) -> str:
    """A recipe's expert dropout, with what shares one draw where there is any."""
    share = recipe["expert_dropout"]
    return f"{share} per {recipe['expert_dropout_per']}" if share else f"{share}"


def largest_gaps(rows: list[dict]) -> dict[str, float]:
    """Per base: the gap of its DES-Vote figure farthest from the published one."""
    return {
        label: max(abs(r["gap"]) for r in rows if r["base"] == label and r["rule"] == "des_vote")
        for label in dict.fromkeys(r["base"] for r in rows)
    }


def same_problems_section(rows: list[dict]) -> list[str]:
    """The final answer kept on the problems every base of a suite solves (`same_problem_rows`)."""
    if not rows:
        return []
    gaps = largest_gaps(rows)
    by_base = {label: [r for r in rows if r["base"] == label] for label in gaps}
    table = markdown_table(
        ["base", "problems", *(f"{p.source.split(',')[0]} {p.share:.0%}: final answer kept [95%]"
                               for p in PUBLISHED), "largest DES-Vote gap"],
        [(label, rs[0]["prompts"],
          *(f"{r['retained']:.1%} [{r['retained_lo']:.1%}, {r['retained_hi']:.1%}]" for r in rs),
          f"{100 * gaps[label]:.1f} points")
         for label, rs in by_base.items()],
    )  # fmt: skip
    return [
        "## On the same problems", "",
        "The final answer kept on the test problems whose final answer token routing gets right "
        "on every base of the same suite: each base is measured on the same problems, so a weaker "
        "base is not flattered by the easier problems it still solves.", "", table, "",
    ]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--base", action="append", type=ProxyBase.parse,
        help="LABEL=PATH[@DATA], repeatable: measure it (default: the shipped 256-expert base, "
        "four skills); the report covers every base measured into --out",
    )  # fmt: skip
    ap.add_argument("--out", type=Path, default=PROJECT_ROOT / "results")
    args = ap.parse_args()
    for base in args.base or [ProxyBase("tiny256", BASE)]:
        calibrate(base, args.out)
    stores = sorted(p.parent for p in (args.out / "calibration").glob("*/quality.json"))
    bases = [StoredBase.read(store) for store in stores]
    rows = [row for base in bases for row in stored_rows(base)] + same_problem_rows(bases)
    title = "Proxy bases against LLaDA2.0-mini's published training-free figures"
    write_report(args.out, "calibration", title, markdown(rows), CSV_COLUMNS, rows)


if __name__ == "__main__":
    main()
