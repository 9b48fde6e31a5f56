"""Gather every run's `metrics.json` of a sweep directory into one table and a plot.

Usage: python -m dmoe_train.studies.summarize_sweep multirun/<sweep dir>
(writes sweep.md, sweep.csv, sweep.png there)
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dmoe_train.reports import markdown_table, save_figure
from dmoe_train.routing import RoutingPolicy  # noqa: E402

FIELDS = (
    "overrides",
    "rule",
    "unique_experts_per_block",
    "accuracy",
    "val_loss_after",
    "unique_experts_token",
)


def collect(sweep: Path) -> list[dict]:
    rows = []
    for path in sorted(sweep.rglob("metrics.json")):
        m = json.loads(path.read_text())
        rows.append(
            {
                "overrides": " ".join(m.get("overrides", [])) or path.parent.name,
                "rule": RoutingPolicy.from_record(m["policy"]).rule,
                "unique_experts_per_block": m["unique_experts_per_block"],
                "accuracy": m["accuracy"],
                "val_loss_after": m["summary"]["val_loss_after"],
                "unique_experts_token": m["summary"]["unique_experts_token"],
            }
        )
    if not rows:
        raise SystemExit(
            f"no metrics.json under {sweep}: was the sweep run with evaluate_after=true?"
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("sweep", type=Path)
    args = ap.parse_args()
    rows = collect(args.sweep)
    table = markdown_table(
        FIELDS, ([r[f] if isinstance(r[f], str) else f"{r[f]:.4g}" for f in FIELDS] for r in rows)
    )
    (args.sweep / "sweep.md").write_text(table + "\n")
    with open(args.sweep / "sweep.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        ax.scatter(r["unique_experts_per_block"], r["accuracy"])
        ax.annotate(r["overrides"], (r["unique_experts_per_block"], r["accuracy"]), fontsize=6)
    ax.set_xlabel("unique experts per block (decoding)")
    ax.set_ylabel("exact-match accuracy")
    save_figure(fig, ax, args.sweep / "sweep.png", legend=False)
    print(table)


if __name__ == "__main__":
    main()
