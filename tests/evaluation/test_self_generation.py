"""`dmoe-generate`: the base's own decodes as training data, sharded and resumable."""

import json
import socket
import sys
from pathlib import Path

import pytest
from helpers import compose_train, run_cli, steps
from hydra import compose, initialize_config_dir

from dmoe_train.cli.generate import run_generate
from dmoe_train.cli.train import train
from dmoe_train.locations import CONFIG_DIR


def _generate(out, *overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "generate",
            [
                f"paths.output_dir={out}",
                f"out_dir={out}",
                "shard_size=16",
                "max_rows=40",
                "data.train_size=64",
                "data.val_size=16",
                "data.test_size=16",
                *overrides,
            ],
        )
    return run_generate(cfg)


def test_generates_resumable_shards_that_training_reads(tmp_path):
    out = tmp_path / "gen"
    summary = _generate(out)
    rows = [json.loads(line) for f in sorted((out / "rows").iterdir()) for line in f.open()]
    assert summary["shards"] == 3 and summary["prompts"] == 40  # 16 + 16 + 8
    assert summary["kept"] + summary["unfinished"] == 40 and len(rows) == summary["kept"] > 0
    assert all(set(r) == {"prompt", "response"} and r["prompt"].endswith("=") for r in rows)
    assert 0 < summary["agrees_with_reference"] <= summary["kept"]  # the base is mostly right
    assert json.loads((out / "summary.json").read_text()) == summary

    # a rerun redoes only what is missing
    (out / "shards" / "shard-00001.json").unlink()
    shard = (out / "rows" / "shard-00001.jsonl").read_text()
    (out / "rows" / "shard-00001.jsonl").write_text("")
    assert _generate(out) == summary
    assert (out / "rows" / "shard-00001.jsonl").read_text() == shard  # deterministic

    # and the rows are a data source as they are
    run = train(compose_train(tmp_path / "run", f"data.source={out / 'rows'}", *steps(2)))
    assert run["steps"] == 2


@pytest.mark.slow
def test_two_processes_write_the_shards_one_process_writes(tmp_path):
    """`accelerate launch` on two CPU processes: each decodes its own shards (k % 2), the main
    process writes the summary; rows and counts equal one process's."""
    one = _generate(tmp_path / "one")
    accelerate = str(Path(sys.executable).with_name("accelerate"))
    with socket.socket() as free:  # a port no other test's process group holds
        free.bind(("127.0.0.1", 0))
        port = str(free.getsockname()[1])
    launch = (accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1")
    launch += ("--main_process_port", port, "--mixed_precision", "no", "--dynamo_backend", "no")
    launch += ("-m", "dmoe_train.cli.generate")
    out = tmp_path / "two"
    overrides = [f"hydra.run.dir={out}", f"out_dir={out}", "shard_size=16", "max_rows=40"]
    overrides += ["data.train_size=64", "data.val_size=16", "data.test_size=16"]
    done = run_cli(*overrides, cmd=launch)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((out / "summary.json").read_text())
    assert {k: v for k, v in two.items() if k != "train_on"} == {
        k: v for k, v in one.items() if k != "train_on"
    }
    for shard in sorted((tmp_path / "one" / "rows").iterdir()):
        assert (out / "rows" / shard.name).read_text() == shard.read_text()
