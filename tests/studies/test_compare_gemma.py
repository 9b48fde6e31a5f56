"""`make compare` on DiffusionGemma: every routing row and a trained router on the same
canvases, the table and CSV in the canvas model's own measures."""

import csv
import subprocess
import sys

import pytest
from helpers import cli_train, steps, tiny_gemma_dir

from dmoe_train.studies.compare import ROWS, TRAINED


@pytest.mark.slow
def test_compare_runs_every_row_on_a_diffusion_gemma_model(tmp_path):
    base = tiny_gemma_dir(tmp_path / "base", experts=16, k=4)
    gemma = [f"model.path={base}", "router.min_experts=4"]
    trained = cli_train(tmp_path / "run", "experiment=tiny_gemma_topp", *gemma, *steps(2))
    assert trained.returncode == 0, trained.stderr[-3000:]
    router = tmp_path / "run" / "checkpoints" / "router.safetensors"
    overrides = [
        "model=tiny_gemma", f"model.path={base}", "generation=tiny_gemma", "data=skills",
        "data.train_size=64", "data.test_size=4", "generation.max_samples=4",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "dmoe_train.studies.compare", "--router", str(router)]
    done = subprocess.run([*cmd, "--out", str(tmp_path / "out"), *overrides],
                          capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    report = (tmp_path / "out" / "compare.md").read_text()
    assert "unique experts/canvas" in report and "latency" not in report
    assert all(f"| {name} |" in report for name in [*ROWS, TRAINED])
    assert "the trained router keeps" in report
    with open(tmp_path / "out" / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["run"] for r in rows] == [*ROWS, TRAINED]
    # a random base scores 0: every retained share is undefined (empty), else token's is 1
    assert rows[0]["accuracy_retained"] in ("1.0", "")
    assert all(float(r["unique_experts_per_canvas"]) >= float(r["unique_experts_per_block"])
               for r in rows)  # fmt: skip
