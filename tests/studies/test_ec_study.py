"""`make ec-study`'s verdicts on fake curves and evaluations: steps to token choice's final loss,
the best schedule, the recommended retrofit against its 95% target."""

import pytest

from dmoe_train.models import build_model
from dmoe_train.studies import ec_study


def fake_quality(losses: list[float], hits: int, n: int = 20) -> dict:
    curve = [
        {"step": 10 * (i + 1), "tokens": 100 * (i + 1), "seconds": i + 1.0, "val_loss": loss,
         "load_cv": 0.0}
        for i, loss in enumerate(losses)
    ]  # fmt: skip
    return {
        "curve": curve,
        "correct": [1] * hits + [0] * (n - hits),
        "exact_match": hits / n,
        "train_tokens_per_s": 1000.0,
        "unique_experts_per_block": 32.0,
    }


def test_the_schedules_match_top_k_flops_of_the_tiny_base():
    assert build_model("tiny").config.num_experts_per_tok == ec_study.TOP_K
    assert (ec_study.K_MIN + ec_study.K_MAX) / 2 == ec_study.TOP_K  # mean k(r), r ~ U[0, 1]
    names = [b.name for b in ec_study.BASES]
    assert names == ["token choice", "EC static", "EC linear", "EC linear_reverse", "EC cosine"]


def test_steps_to_reach_is_the_first_step_at_or_below_the_loss():
    curve = fake_quality([3.0, 2.0, 1.5, 1.6], 0)["curve"]
    assert ec_study.steps_to_reach(curve, 2.0) == 20
    assert ec_study.steps_to_reach(curve, 1.55) == 30
    assert ec_study.steps_to_reach(curve, 1.0) is None


def test_scratch_verdicts_name_the_fraction_and_the_best_schedule():
    quality = [
        fake_quality([3.0, 2.0, 1.5, 1.2, 1.0], 10),  # token choice: 1.0 at step 50
        fake_quality([2.5, 1.8, 1.0, 0.9, 0.8], 12),  # static reaches 1.0 at step 30 (60%)
        fake_quality([3.0, 2.0, 1.5, 1.2, 0.95], 11),
        fake_quality([2.0, 1.5, 0.9, 0.8, 0.7], 13),  # linear_reverse: the lowest final loss
        fake_quality([3.0, 2.5, 2.0, 1.5, 1.1], 9),
    ]
    rows, verdicts = ec_study.scratch_table(ec_study.BASES, quality)
    assert "| EC static | 0.8000 | 30 (60%) |" in rows[3]
    assert "| EC cosine | 1.1000 | never |" in rows[6]
    assert "at step 30 of 50 (60%); target <= 80%: met" in verdicts[0]
    assert "loss **EC linear_reverse** (0.7000, 0.1000 below EC static)" in verdicts[1]
    assert "match **EC linear_reverse** (65.0%" in verdicts[1]
    assert "against EC static's 60.0%" in verdicts[1]


@pytest.mark.parametrize(("hits", "verdict"), [(19, "met"), (18, "not met")])
def test_the_retrofit_verdicts_judge_matched_flops_and_the_recommended_one(hits, verdict):
    reference = {"accuracy": 1.0, "correct": [1] * 20, "unique_experts_per_block": 10.0}
    reference |= {"load_balance_cv": 0.4, "experts_per_token": 4.0}
    runs = {
        name: {"accuracy": h / 20, "correct": [1] * h + [0] * (20 - h),
               "unique_experts_per_block": 32.0, "train_seconds": 5.0, "load_balance_cv": 0.0,
               "experts_per_token": k, "policy": {"name": policy}}
        for name, h, k, policy in (
            ("router", 5, 4.0, "expert_choice"),
            ("all", 12, 4.0, "expert_choice"),
            ("wide", hits, 8.1, "expert_choice"),
            ("control", 20, 4.0, "token"),  # a row, never the retrofit judged
        )
    }  # fmt: skip
    rows, line = ec_study.retrofit_table(reference, runs, recommended="wide")
    assert len(rows) == 7 and rows[-3].startswith("| all |") and "| 8.10 |" in rows[-2]
    assert rows[-1].startswith("| control |")
    assert "FLOPs: the best is **all**, 60.0% of the base's exact match (not reproduced" in line
    assert f"**wide**, keeps {hits / 20:.1%} at 8.10 experts per token" in line
    assert f"(target >= 95%: {verdict})" in line
