"""`dmoe-export`: writes only where it may, whole or not at all, naming the flag that refused.
(docs/reliability.md lists the guarantees.)"""

import hashlib
import json
import shutil

import pytest
import torch
from helpers import (
    TINY_BASE,
    compose_train,
    hashes,
    perturbed_router,
    steps,
)
from safetensors.torch import load_file
from spec_helpers import evaluate

from dmoe_train.cli import export as export_cli
from dmoe_train.cli.train import train
from dmoe_train.models import load_model


def test_export_refuses_a_directory_holding_another_model(tmp_path):
    router = perturbed_router(TINY_BASE, tmp_path / "ckpt")
    other = tmp_path / "other"
    shutil.copytree(TINY_BASE, other)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    with pytest.raises(ValueError, match=r"--out .*other: not empty and not an earlier dmoe"):
        export_cli.export(router, other)
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before


def test_export_refuses_the_bases_own_directory(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(TINY_BASE, base)
    router = perturbed_router(base, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    for out in (base, tmp_path):  # the base itself, or a folder that holds it
        with pytest.raises(ValueError, match=r"holds the base model"):
            export_cli.export(router, out)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


def test_export_replaces_an_earlier_export_whole(tmp_path):
    router = perturbed_router(TINY_BASE, tmp_path / "ckpt")
    out = export_cli.export(router, tmp_path / "exp")
    (out / "model-00002-of-00002.safetensors").write_bytes(b"a stale shard of another export")
    again = export_cli.export(router, out)
    assert sorted(p.name for p in again.iterdir()) == sorted(
        ["config.json", "model.safetensors", export_cli.EXPORT_MARKER]
        + [p.name for p in TINY_BASE.glob("tokenizer*.json")]
    )
    assert not list(tmp_path.glob(".exp.*"))  # no staging or replaced copy left behind


def test_export_keeps_the_fp32_router_beside_a_bf16_base(tmp_path):
    base = tmp_path / "bf16"
    load_model(TINY_BASE, dtype=torch.bfloat16).save_pretrained(base)
    for name in TINY_BASE.glob("tokenizer*.json"):
        shutil.copy(name, base)
    router = perturbed_router(base, tmp_path / "ckpt", dtype=torch.bfloat16)
    trained = load_file(router)
    saved = load_file(export_cli.export(router, tmp_path / "exp") / "model.safetensors")
    for name, tensor in trained.items():
        assert saved[name].dtype == torch.float32 and torch.equal(saved[name], tensor), name
    assert saved["model.word_embeddings.weight"].dtype == torch.bfloat16
    assert json.loads((tmp_path / "exp" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_export_errors_are_one_line_and_exit_1(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        export_cli.main(["--router", str(tmp_path / "none.safetensors"), "--out", "x"])
    assert exit_.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("error: router checkpoint") and err.count("\n") == 1


def test_adapter_out_refusal_names_adapter_out(tmp_path):
    run = tmp_path / "run"
    train(compose_train(run, *steps(1), "module.trainable=router+lora", "module.lora.rank=2"))
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("someone else's")
    with pytest.raises(ValueError, match=rf"^--adapter-out {taken}: not empty"):
        export_cli.export(run / "checkpoints" / "router.safetensors", tmp_path / "exp", None, taken)
    assert not (tmp_path / "exp").exists() and hashes(taken) == {
        "notes.txt": hashlib.sha256(b"someone else's").hexdigest()
    }


def test_export_prints_every_directory_it_wrote(tmp_path, capsys):
    run = tmp_path / "run"
    train(compose_train(run, *steps(1), "module.trainable=router+lora", "module.lora.rank=2"))
    router = str(run / "checkpoints" / "router.safetensors")
    exp, adapter = tmp_path / "exp", tmp_path / "adapter"
    export_cli.main(["--router", router, "--out", str(exp), "--adapter-out", str(adapter)])
    printed = capsys.readouterr().out
    assert f"wrote {exp}" in printed and f"wrote {adapter}" in printed


def test_truncated_router_file_names_its_path(tmp_path):
    router = perturbed_router(TINY_BASE, tmp_path / "ckpt")
    router.write_bytes(router.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"router checkpoint {router}: unreadable"):
        evaluate(tmp_path / "eval", f"router_checkpoint={router}")
