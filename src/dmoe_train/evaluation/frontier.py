"""Accuracy-versus-experts frontiers: paired bootstrap intervals on the same prompts, dominated
points, a method's accuracy between its measured points, and the dominance test `make pareto`
reports. Pure functions of per-prompt correctness and expert counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class Point:
    method: str
    label: str
    experts: float  # unique experts per block, mean over MoE layers, forwards and samples
    correct: np.ndarray  # [N] 0/1 per test prompt, the same prompts for every point

    @classmethod
    def measured(
        cls, method: str, label: str, metrics: dict, key: str = "correct", prompts: Any = None
    ) -> Point:
        """A point from an evaluation's metrics: per-prompt `metrics[key]` (0/1), of the
        `prompts` (a mask or indices) when given."""
        correct = np.array(metrics[key])
        experts = metrics["unique_experts_per_block"]
        return cls(method, label, experts, correct if prompts is None else correct[prompts])

    @property
    def accuracy(self) -> float:
        return float(self.correct.mean())


def share_kept(accuracy: float, reference: float) -> float:
    """`accuracy` as a share of `reference`'s, counted as the intervals count it: x/0 is
    unbounded (inf), 0/0 has no ratio (nan)."""
    if reference == 0:
        return float("nan") if accuracy == 0 else float("inf")
    return accuracy / reference


def bootstrap_intervals(
    points: list[Point], reference: Point, samples: int = 2000, level: float = 0.95, seed: int = 0
) -> dict[str, np.ndarray]:
    """Percentile intervals of every point's accuracy and of its accuracy retained against
    `reference`, resampling prompts jointly (paired: one resample serves every point), so that
    points are compared on the same draws. Returns `[points, 2]` arrays `accuracy`, `retained`."""
    n = len(reference.correct)
    for p in points:
        if len(p.correct) != n:
            raise ValueError(
                f"point {p.method}/{p.label}: {len(p.correct)} prompts, the reference has {n}: "
                "every point must be measured on the same prompts"
            )
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(samples, n))
    acc = np.stack([p.correct[idx].mean(1) for p in points])  # [points, samples]
    ref = reference.correct[idx].mean(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        retained = acc / ref
    tail = (1 - level) / 2 * 100
    if np.isfinite(retained).all():
        retained = np.percentile(retained, [tail, 100 - tail], axis=1).T
    else:
        # resamples where the reference got nothing right: 0/0 has no ratio (left out), x/0 is
        # unbounded (an interval reaching inf); order statistics, as interpolating to inf is not
        retained = np.stack(
            [
                np.nanpercentile(retained, tail, axis=1, method="lower"),
                np.nanpercentile(retained, 100 - tail, axis=1, method="higher"),
            ],
            axis=1,
        )
    return {"accuracy": np.percentile(acc, [tail, 100 - tail], axis=1).T, "retained": retained}


def dominated(experts: np.ndarray, accuracy: np.ndarray) -> np.ndarray:
    """Points some other point beats: no more experts and no less accuracy, one of them strictly."""
    mine_e, mine_a = np.asarray(experts)[:, None], np.asarray(accuracy)[:, None]
    other_e, other_a = mine_e.T, mine_a.T  # [i, j]: does point j beat point i
    no_worse = (other_e <= mine_e) & (other_a >= mine_a)
    return (no_worse & ((other_e < mine_e) | (other_a > mine_a))).any(1)


def accuracy_at(experts: np.ndarray, accuracy: np.ndarray, at: float) -> float:
    """A method's accuracy at `at` experts, linear between its neighbouring points; outside its
    range, its nearest end (a method that never goes as low is credited with its fewest-expert
    accuracy: generous to it)."""
    order = np.argsort(experts)
    return float(np.interp(at, np.asarray(experts)[order], np.asarray(accuracy)[order]))


def fewest_experts(
    experts: np.ndarray, retained: np.ndarray, threshold: float
) -> tuple[float, int] | None:
    """The fewest experts per block among points keeping >= `threshold` of the reference's
    accuracy, and that point's index; None if none does."""
    keep = np.flatnonzero(np.asarray(retained) >= threshold)
    if not len(keep):
        return None
    best = keep[np.argmin(np.asarray(experts)[keep])]
    return float(experts[best]), int(best)


def strictly_above(
    trained: tuple[float, float], others_experts: np.ndarray, others_upper: np.ndarray
) -> bool:
    """A trained point (experts, lower bound of its accuracy interval) lies above another method
    by more than the intervals: its lower bound beats that method's upper bound, interpolated
    at the trained point's expert count."""
    experts, lower = trained
    return lower > accuracy_at(others_experts, others_upper, experts)
