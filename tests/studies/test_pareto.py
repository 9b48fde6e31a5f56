"""`make pareto`'s bookkeeping on fake evaluations: points are kept and never recomputed, and the
report marks dominated points, the fewest experts per retained share and the goal verdicts."""

import numpy as np
import pytest
from helpers import fake_metrics

from dmoe_train.studies import pareto
from dmoe_train.studies.pareto_points import StudyPoint, Training, free, trained

TOKEN = free("token", "token")


def router(name: str, top_p: float = 0.5, **how) -> Training:
    return Training(name, top_p, **how)


def test_report_marks_domination_thresholds_and_the_goal():
    specs = [
        TOKEN,
        free("topp", "p=0.5"),
        free("topp", "p=0.9"),
        StudyPoint("trained", "a", training=router("a", 0.7)),
        StudyPoint("trained", "b", training=router("b", 0.7)),
    ]
    metrics = [
        fake_metrics(60.0, 80),
        fake_metrics(10.0, 20),
        fake_metrics(30.0, 60),
        fake_metrics(11.0, 80),  # 99%+ retained at 18% of token's experts, far above topp
        fake_metrics(35.0, 50),  # dominated by trained a
    ]
    rows = pareto.analyse(specs, metrics)
    assert [r["dominated"] for r in rows] == [True, False, True, False, True]
    assert rows[3]["retained"] == 1.0 and rows[3]["experts_share_of_token"] == pytest.approx(
        11 / 60
    )
    lo, hi = rows[1]["accuracy_lo"], rows[1]["accuracy_hi"]
    assert lo < 0.2 < hi
    report = pareto.markdown(rows)
    assert "| trained | 11.00 (p=0.7 a) | 11.00 (p=0.7 a) |" in report
    assert "| topp | - | - |" in report
    assert "- trained p=0.7 a (11.0 experts): above every training-free method" in report
    assert "- trained p=0.7 b (35.0 experts): not above ['topp']" in report
    assert "- trained: >= 99% retained at <= 20% of token routing's 60.0 experts: p=0.7 a" in report


def test_plot_writes_a_figure(tmp_path):
    rows = pareto.analyse(
        [TOKEN, free("topp", "p=0.5")],
        [fake_metrics(60.0, 80), fake_metrics(10.0, 20)],
    )
    pareto.plot(rows, tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000
    assert np.isfinite([r["accuracy_lo"] for r in rows]).all()


def test_ablation_rows_are_tabled_not_judged_against_the_goal():
    specs = [
        TOKEN,
        free("topp", "p=0.5"),
        trained("trained", router("union 0.1")),
        trained("trained", router("union 0.1", 0.7)),
        trained("ablation", router("none", regularizer="none")),
        trained("trained+experts", router("union 0.1", trainable="router+experts")),
    ]
    metrics = [
        fake_metrics(60.0, 80),
        fake_metrics(10.0, 20),
        fake_metrics(12.0, 40) | {"train_seconds": 300.0},
        fake_metrics(20.0, 50) | {"train_seconds": 310.0},
        fake_metrics(30.0, 10) | {"train_seconds": 290.0},  # below topp: no verdict for it
        fake_metrics(12.0, 79) | {"train_seconds": 400.0},  # not a competitor of the trained
    ]
    report = pareto.markdown(pareto.analyse(specs, metrics))
    table = report[report.index("Ablation") : report.index("Goal:")]
    assert "| p=0.5 union 0.1 | 12.00 | 0.400" in table
    assert "| p=0.5 none | 30.00 | 0.100" in table and "p=0.7" not in table
    assert "| p=0.5 union 0.1 (router+experts) | 12.00 | 0.790" in table
    verdicts = report[report.index("Goal:") :]
    assert "p=0.5 none" not in verdicts and "router+experts" not in verdicts
    assert "- trained p=0.5 union 0.1 (12.0 experts): above every training-free method" in verdicts
    # router+experts has its own goal line: 79 of 80 is 98.75% retained, short of 99%
    assert (
        "- trained+experts: >= 99% retained at <= 20% of token routing's 60.0 experts: not reached"
        in verdicts
    )


def test_trainable_sets_and_held_out_skills_are_tabled_and_judged(tmp_path):
    def skills(add, sort, rev, count):
        return {"accuracy_by_skill": {"add": add, "sort": sort, "reverse": rev, "count": count}}

    rank2 = dict(trainable="router+lora", lora_rank=2)
    specs = [
        TOKEN,
        free("topp", "p=0.5"),
        trained("sets", router("router+lora r=2", 0.6, **rank2)),
        trained(
            "held-out", router("router+lora r=2 add+sort", 0.6, **rank2, skills=("add", "sort"))
        ),
        trained(
            "held-out",
            router("router+lora r=2 add+sort distill random", 0.6, **rank2, distill="random"),
        ),
    ]
    cost = {"train_seconds": 300.0, "trainable_params": 880_000}
    metrics = [
        fake_metrics(60.0, 80) | skills(0.8, 0.8, 0.8, 0.8),
        fake_metrics(10.0, 20) | skills(0.1, 0.3, 0.3, 0.1),
        fake_metrics(8.0, 80) | skills(0.8, 0.8, 0.8, 0.8) | cost,
        fake_metrics(12.0, 40) | skills(0.8, 0.8, 0.78, 0.05) | cost,
        fake_metrics(12.0, 50) | skills(0.8, 0.8, 0.8, 0.4) | cost,
    ]
    rows = pareto.analyse(specs, metrics)
    report = pareto.markdown(rows)
    sets = report[report.index("Trainable sets") : report.index("Skills held out")]
    # rank 2 on LLaDA2.0-mini: the router's 0.13% and a quarter of rank 8's adapters (3.91%)
    assert "| router+lora r=2 | 0.6 | 500 | 0.88M | 1.11% | 8.00 | 1.000" in sets
    assert "keeps >= 99% at <= 15% of token routing's 60.0 experts: p=0.6 router+lora r=2" in sets
    # 15% of 60 experts is 9, above the preset's floor of 8 experts per block; 15% of 50 is not
    assert pareto.below_guard(9.0) == "" and "min_experts 8" not in sets
    assert (
        pareto.below_guard(7.5)
        == " (7.5 experts: below the trained coresets' floor, min_experts 8, never below the k"
        " experts each token uses)"
    )
    assert "Goal:" not in report  # no `trained` router here: no goal heading without verdicts
    held = report[report.index("Skills held out") :]
    assert (
        "| held-out p=0.6 router+lora r=2 add+sort | add, sort | 12.00 | 80.0% | 80.0% | " in held
    )
    assert "| topp p=0.5 | - (training-free) | 10.00 |" in held
    assert "add+sort distill random | add, sort; KL on random tokens | 12.00 |" in held
    assert (
        "distill random: 50.0% of token routing on the worse held-out skill (not reached); "
        "never below" in held
    )
    assert (
        "6.2% of token routing on the worse held-out skill (not reached); below topp p=0.5" in held
    )
    pareto.plot_sets(rows, tmp_path / "sets.png")
    assert (tmp_path / "sets.png").stat().st_size > 10_000
