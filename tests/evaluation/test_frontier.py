import numpy as np
import pytest

from dmoe_train.evaluation.frontier import (
    Point,
    accuracy_at,
    bootstrap_intervals,
    dominated,
    fewest_experts,
    share_kept,
    strictly_above,
)


def test_dominated_points_by_hand():
    experts = np.array([10.0, 12.0, 12.0, 20.0, 8.0])
    accuracy = np.array([0.50, 0.40, 0.60, 0.60, 0.10])
    # 1: beaten by 0 (fewer experts, more accuracy); 3: by 2 (fewer experts, same accuracy)
    assert dominated(experts, accuracy).tolist() == [False, True, False, True, False]
    assert not dominated(np.array([5.0, 5.0]), np.array([0.3, 0.3])).any()  # ties beat nobody


def test_accuracy_between_points_is_linear_and_clamped_at_the_ends():
    experts, acc = np.array([20.0, 10.0, 40.0]), np.array([0.6, 0.2, 0.8])  # unsorted on purpose
    assert accuracy_at(experts, acc, 15.0) == pytest.approx(0.4)
    assert accuracy_at(experts, acc, 30.0) == pytest.approx(0.7)
    assert accuracy_at(experts, acc, 5.0) == pytest.approx(0.2)  # below its range: its lowest
    assert accuracy_at(experts, acc, 99.0) == pytest.approx(0.8)


def test_fewest_experts_at_a_retained_share():
    experts, retained = np.array([30.0, 12.0, 9.0, 20.0]), np.array([1.0, 0.96, 0.5, 0.995])
    assert fewest_experts(experts, retained, 0.99) == (20.0, 3)
    assert fewest_experts(experts, retained, 0.95) == (12.0, 1)
    assert fewest_experts(experts, retained, 1.01) is None


def test_bootstrap_is_paired_on_the_same_prompts():
    rng = np.random.default_rng(0)
    token = Point("token", "token", 60.0, (rng.random(400) < 0.8).astype(float))
    same = Point("copy", "x", 30.0, token.correct.copy())
    worse = Point("worse", "y", 10.0, token.correct * (rng.random(400) < 0.5))
    ci = bootstrap_intervals([token, same, worse], token, samples=500)
    assert np.allclose(ci["retained"][0], 1.0) and np.allclose(ci["retained"][1], 1.0)
    assert np.allclose(ci["accuracy"][0], ci["accuracy"][1])
    lo, hi = ci["accuracy"][2]
    assert lo < worse.accuracy < hi and hi - lo < 0.15
    with pytest.raises(ValueError, match="same prompts"):
        bootstrap_intervals([Point("t", "short", 1.0, np.ones(3))], token)


def test_a_reference_that_resamples_to_nothing_right_gives_an_unbounded_ratio():
    """One right answer in 40: about a third of the resamples have none (0/0 has no ratio and is
    left out; x/0 is unbounded), so the ratio's upper bound is inf, never a 1/epsilon."""
    token = Point("token", "token", 60.0, np.eye(40)[0])
    other = Point("other", "x", 10.0, np.eye(40)[1] + np.eye(40)[2])
    ci = bootstrap_intervals([token, other], token, samples=500)
    assert np.array_equal(ci["retained"][0], [1.0, 1.0])
    lo, hi = ci["retained"][1]
    assert lo == 0.0 and hi == np.inf


def test_share_kept_counts_a_reference_of_nothing_as_the_intervals_do():
    assert share_kept(0.3, 0.6) == 0.5 and share_kept(0.0, 0.6) == 0.0
    assert share_kept(0.2, 0.0) == np.inf  # x/0: unbounded, never a 1/epsilon
    assert np.isnan(share_kept(0.0, 0.0))  # 0/0: no ratio


def test_strictly_above_needs_the_lower_bound_over_the_interpolated_upper_bound():
    others_experts, others_upper = np.array([10.0, 30.0]), np.array([0.3, 0.7])
    assert strictly_above((20.0, 0.51), others_experts, others_upper)  # upper at 20: 0.5
    assert not strictly_above((20.0, 0.49), others_experts, others_upper)
    assert not strictly_above((5.0, 0.29), others_experts, others_upper)  # clamped: 0.3
