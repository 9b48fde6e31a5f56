"""Resumable points of the studies (`make pareto`, `make ec-study`): a `dmoe-train` run trained
once in its own directory, and a test-split evaluation computed once; each result is kept as JSON
and read back when the study runs again, so an interrupted study redoes only its unfinished
points."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from dmoe_train.evaluation.run import run_eval
from dmoe_train.files import write_json
from dmoe_train.resolvers import composed


def kept(
    stored: Path, compute: Callable[[], dict], stale: Callable[[dict], bool] = lambda _: False
) -> dict:
    """`compute()` once: its result is written to `stored` (atomically, once complete) and read
    back; computed again only when `stale` says the stored result lacks what is asked now."""
    if not stored.is_file() or stale(json.loads(stored.read_text())):
        result = compute()
        stored.parent.mkdir(parents=True, exist_ok=True)
        write_json(stored, result)
    return json.loads(stored.read_text())


def router_checkpoint(run_dir: Path) -> Path:
    """Where a `dmoe-train` run in `run_dir` writes its trained router."""
    return run_dir / "checkpoints" / "router.safetensors"


def train_run(run_dir: Path, overrides: list[str]) -> Path:
    """`dmoe-train` with `overrides` in `run_dir` (resuming its last checkpoint, if any; a
    finished run is not relaunched); the trained router's checkpoint."""
    if not (run_dir / "summary.json").is_file():
        cmd = [sys.executable, "-m", "dmoe_train.cli.train", *overrides]
        cmd += [f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return router_checkpoint(run_dir)


def evaluate(out: Path, overrides: list[str]) -> dict:
    """`dmoe-eval`'s metrics with `overrides`, its files written under `out`."""
    return run_eval(composed("eval", [*overrides, f"paths.output_dir={out}"]))
