import json
import subprocess
import sys

import pytest

from dmoe_train.locations import ASSETS
from dmoe_train.studies import bench_full_width


@pytest.mark.slow
def test_bench_quick_writes_both_files(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "dmoe_train.studies.bench", "--quick", "--out", str(tmp_path)],
        check=True,
        capture_output=True,
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["environment"]["quick"] is True
    layer = results["moe_layer"]
    assert [r["unique_experts"] for r in layer] == [16, 12, 8, 4]
    assert all(r["ideal_ratio"] == r["unique_experts"] / 16 for r in layer)
    assert {r["mode"] for r in results["expert_compute"]} == {"forward", "forward+backward"}
    train = results["train_step"]
    assert [(r["model"], r["mode"]) for r in train] == [("tiny", "router"), ("tiny", "full")]
    assert train[0]["trainable_params"] == 3 * 32 * 128  # the three routers only
    md = (tmp_path / "results.md").read_text()
    masks = results["attention_mask"]
    assert [r["tokens"] for r in masks] == [16, 512]
    assert masks[1]["dense_mask_MiB"] == 4 and masks[1]["ratio"] > 1000  # [1024, 1024] fp32
    # the tiny base through the shipped trainer configs: one row per rank, per trainable set
    runs = [(r["trainer"], r["trainable"], r["rank"]) for r in results["train_strategies"]]
    assert runs == [
        ("cpu", "router", "0 of 1"),
        ("ddp_cpu", "router", "0 of 2"),
        ("ddp_cpu", "router", "1 of 2"),
    ]
    for r in results["train_strategies"]:
        assert 0 < r["loaded_peak_GiB"] <= r["peak_GiB"] and r["tokens_per_s"] > 0
    sections = (
        "moe_layer",
        "expert_compute",
        "routing_overhead",
        "train_step",
        "attention_mask",
        "train_strategies",
    )
    for section in sections:
        assert f"## {section}" in md


def test_training_cases_that_would_not_fit_are_rows_saying_so(monkeypatch):
    monkeypatch.setattr(bench_full_width, "available_bytes", lambda: 0)
    monkeypatch.setattr(bench_full_width.subprocess, "run", None)  # nothing may be launched
    rows = bench_full_width.train_rows(ASSETS / "tiny-llada2")
    assert [(r["trainer"], r["trainable"]) for r in rows] == list(bench_full_width.TRAIN_CASES)
    for r in rows:
        ranks = 1 if r["trainer"] == "cpu" else 2
        assert r["rank"] == f"- of {ranks}" and r["skipped"].endswith(", 0 GiB available")
        assert "peak_GiB" not in r


def test_gemma_slice_counts_each_policys_experts_per_forward(tmp_path):
    from helpers import tiny_gemma_dir

    from dmoe_train.studies import bench_gemma_slice

    base = tiny_gemma_dir(tmp_path / "base", experts=32, k=4)
    rows = {
        p: bench_gemma_slice.decode_case(base, p, steps=3) for p in ("token", "capacity_max c=16")
    }
    token, pool = rows["token"], rows["capacity_max c=16"]
    assert token["forwards"] == pool["forwards"] == 3  # random weights never settle
    # one canvas of two blocks, each its own pool of 16
    assert token["tokens"] == 64 and pool["experts_per_block"] < pool["experts_per_canvas"] <= 32
    assert pool["experts_per_block"] <= 16 < token["experts_per_block"] <= 32
    assert token["experts_per_block"] <= token["experts_per_canvas"]
    assert 0 < token["loaded_GiB"] <= token["peak_GiB"]
