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


def save_figure(fig: Any, ax: Any, path: Path, legend: bool = True) -> None:
    """A grid, the legend, a tight layout, saved at 120 dpi."""
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
