"""`dmoe-generate`: writes only into its own output under the same settings. (docs/reliability.md
lists the guarantees.)"""

import sys

import pytest
from helpers import (
    compose_generate,
    compose_train,
    hashes,
    run_cli,
    steps,
)
from spec_helpers import refuse_loading

from dmoe_train.cli.generate import run_generate
from dmoe_train.cli.train import train


def test_generate_refuses_a_directory_it_did_not_write(tmp_path, monkeypatch):
    run = tmp_path / "run"  # a training run's directory
    train(compose_train(run, *steps(1)))
    before = hashes(run)
    monkeypatch.setattr("dmoe_train.cli.generate.instantiate", refuse_loading)
    with pytest.raises(ValueError, match=rf"out_dir={run}: not empty and not dmoe-generate output"):
        run_generate(compose_generate(run, "max_rows=16"))
    assert hashes(run) == before


def test_generate_resumes_only_under_the_same_settings(tmp_path, monkeypatch):
    out = tmp_path / "gen"
    summary = run_generate(compose_generate(out, "max_rows=32"))
    # the summary says what the shards hold: which prompts, decoded how
    assert summary["complete"] and summary["prompt_rows"] == [[0, 16], [16, 32]]
    assert summary["settings"]["max_rows"] == 32 and summary["settings"]["seed"] == 0
    assert summary["kept"] == len([1 for f in (out / "rows").iterdir() for _ in f.open()])
    before = hashes(out)
    monkeypatch.setattr("dmoe_train.cli.generate.instantiate", refuse_loading)
    changed = r"\(data.seed: 0 -> 1; max_rows: 32 -> 16; seed: 0 -> 1\)"
    with pytest.raises(ValueError, match=rf"out_dir={out} holds dmoe-generate output .* {changed}"):
        run_generate(compose_generate(out, "seed=1", "max_rows=16"))
    assert hashes(out) == before


def test_generate_runs_in_its_hydra_directory_named_relative(tmp_path):
    """`hydra.run.dir` = `out_dir`, both relative (as `make breadth --out results/...` gives
    them): hydra's own files there are the job's, not another's output."""
    small = ("data.train_size=64", "data.val_size=16", "data.test_size=16", "shard_size=16")
    cmd = (sys.executable, "-m", "dmoe_train.cli.generate")
    done = run_cli("hydra.run.dir=gen", "out_dir=gen", "max_rows=16", *small, cmd=cmd, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "gen" / "summary.json").is_file() and (tmp_path / "gen" / ".hydra").is_dir()
