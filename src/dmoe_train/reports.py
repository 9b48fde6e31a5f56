"""What every report shares: its markdown tables, its CSV files and how a figure is finished."""

from __future__ import annotations

import csv
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


def markdown_table(head: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A markdown table: the header, the `|---|` rule, one line per row of cells (as text)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, head: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(head)
        writer.writerows(rows)


def write_report(
    out: Path, name: str, title: str, text: str, head: Sequence[str], rows: Iterable[dict]
) -> None:
    """A study's `<out>/<name>.csv` (the `head` keys of each row) and `<out>/<name>.md` (`title`
    over `text`), and `text` printed."""
    write_csv(out / f"{name}.csv", head, ([r[k] for k in head] for r in rows))
    (out / f"{name}.md").write_text(f"# {title}\n\n{text}\n")
    print(text)


def accuracy_line(ax: Any, rows: list[dict], x: str, label: str, bold: bool = False) -> Any:
    """One method's points: `accuracy` against `x`, with their interval bars
    (`accuracy_lo`, `accuracy_hi`); the line (its colour marks the method's other marks)."""
    return ax.errorbar(
        [r[x] for r in rows],
        [r["accuracy"] for r in rows],
        yerr=[
            [r["accuracy"] - r["accuracy_lo"] for r in rows],
            [r["accuracy_hi"] - r["accuracy"] for r in rows],
        ],
        marker="o", ms=4, capsize=2, lw=2 if bold else 1, label=label,
    )  # fmt: skip


def save_figure(fig: Any, axes: Any, path: Path, legend: bool = True) -> None:
    """A grid on each of `axes` (one, or a sequence), the legend on the last, a tight layout,
    saved at 120 dpi."""
    axes = list(axes) if hasattr(axes, "__len__") else [axes]  # one Axes, or an array of them
    for ax in axes:
        ax.grid(alpha=0.3)
    if legend:
        axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
