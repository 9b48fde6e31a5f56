"""The bad-input specification: every bad setting, file or fault fails early with one line
naming its key, path or row, exits non-zero and loses nothing, or does what it says it does.
docs/reliability.md lists what these tests guarantee, in one table."""

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import (
    TINY_BASE,
    cli_train,
    compose_generate,
    compose_train,
    hashes,
    router_of,
    run_cli,
    run_main,
    steps,
)
from hydra import compose, initialize_config_dir
from hydra.errors import InstantiationException
from safetensors.torch import load_file

from dmoe_train.cli import export as export_cli
from dmoe_train.cli.common import message_of
from dmoe_train.cli.generate import run_generate
from dmoe_train.cli.train import train
from dmoe_train.evaluation.run import format_table, run_eval
from dmoe_train.files import atomic_write
from dmoe_train.locations import CONFIG_DIR
from dmoe_train.models import is_router_param, load_model
from dmoe_train.models.adapted_weights import adapted_manifest, save_adapted
from dmoe_train.routing import RoutingPolicy


def test_block_size_must_divide_max_seq_len(tmp_path):
    with pytest.raises(ValueError, match=r"data.max_seq_len=16 .* router.block_size=5"):
        train(compose_train(tmp_path, "router.block_size=5"))


def test_sweep_value_that_is_not_a_number(tmp_path):
    with pytest.raises(ValueError, match=r"router.top_p='abc': must be a number"):
        train(compose_train(tmp_path, "router.top_p=abc"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["router.top_p=1.5"], r"router.top_p=1.5: must be in \(0, 1\]"),
        (["router=des_vote", "router.capacity=2"], r"router.capacity=2: must be in \[top_k=4"),
        (["router=des_vote", "router.capacity=33"], r"router.capacity=33: .* num_experts=32\]"),
    ],
)
def test_policy_ranges(tmp_path, overrides, message):
    with pytest.raises((InstantiationException, ValueError), match=message):
        train(compose_train(tmp_path, *overrides))


def test_t_range(tmp_path):
    with pytest.raises(Exception, match=r"t_low=0.9, t_high=0.5"):
        train(compose_train(tmp_path, "module.t_low=0.9", "module.t_high=0.5"))


def test_missing_model_path(tmp_path):
    with pytest.raises(Exception, match=r"/nowhere/model: no config.json"):
        train(compose_train(tmp_path, "model.path=/nowhere/model"))


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"data.source=.*missing.jsonl: no such file"),
        ("", r"data.source=.*: empty"),
        ('{"foo": 1}\n', r"needs columns question and answer .* it has \['foo'\]"),
    ],
)
def test_bad_data_files(tmp_path, content, message):
    path = tmp_path / "missing.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        train(compose_train(tmp_path / "run", f"data.source={path}"))


def test_unknown_config_key_is_refused(tmp_path):
    with pytest.raises(Exception, match="router.top_q"):
        compose_train(tmp_path, "router.top_q=0.5")


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = compose_train(
        tmp_path,
        *steps(10, checkpoint_every=2),
        "+callbacks.poison._target_=helpers.PoisonRouter",
        "+callbacks.poison.step=4",
    )
    with pytest.raises(FloatingPointError, match="non-finite loss nan at step 4"):
        train(cfg)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(t).all() for t in ckpt["state_dict"].values())
    manifest = json.loads((tmp_path / "checkpoints" / "router.json").read_text())
    assert manifest["step"] == 4


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    from dmoe_train.training.atomic_checkpoint_io import AtomicCheckpointIO

    io, path = AtomicCheckpointIO(), tmp_path / "last.ckpt"
    io.save_checkpoint({"step": 1}, path)

    def killed(*_):
        raise KeyboardInterrupt("killed between the temporary write and the rename")

    monkeypatch.setattr("os.replace", killed)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": 2}, path)
    assert io.load_checkpoint(path) == {"step": 1}


def test_run_info_saved_next_to_checkpoints(tmp_path):
    train(compose_train(tmp_path, "+trainer.fast_dev_run=true"))
    info = json.loads((tmp_path / "checkpoints" / "run_info.json").read_text())
    assert info["config"]["router"]["name"] == "topp" and info["versions"]["torch"].startswith("2.")
    assert info["git_commit"] is None or len(info["git_commit"]) == 40


# the noise every run printed before (Lightning's tip, transformers' model-type warning, a
# deprecation warning from Lightning, the progress bar's "Epoch 0/-2", the resume warning)
NOISE = ("Tip:", "model of type", "LeafSpec", "Epoch 0/-2", "not resumable")


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_killed_run_resumes_to_the_same_router(tmp_path, sig):
    from random import Random

    common = steps(12, checkpoint_every=4)
    step = Random(sig).randint(2, 10)
    assert cli_train(tmp_path / "full", *common).returncode == 0
    kill = [  # fires only in a run that did not resume: the relaunch passes the same overrides
        "+callbacks.kill._target_=helpers.KillAtStep",
        f"+callbacks.kill.step={step}",
        f"+callbacks.kill.signal={sig}",
    ]
    killed = cli_train(tmp_path / "run", *common, *kill)
    saved = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)
    if sig == "SIGKILL":  # only the steps since the last periodic save are lost
        assert killed.returncode == -9
        assert saved["global_step"] == step // 4 * 4
    else:  # saved on the way out: SIGTERM exits 0, Ctrl-C as Lightning does (1)
        assert killed.returncode == (0 if sig == "SIGTERM" else 1), killed.stderr[-2000:]
        said = "SIGTERM" if sig == "SIGTERM" else "interrupted (Ctrl-C)"
        assert f"{said} at step {step}: saved" in killed.stderr  # the log's console copy
        assert saved["global_step"] == step
    resumed = cli_train(tmp_path / "run", *common, *kill)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"at step {saved['global_step']}" in resumed.stderr  # "resumed from ... at step"
    assert not [n for n in NOISE if n in resumed.stderr + resumed.stdout], resumed.stderr[-3000:]
    a, b = router_of(tmp_path / "full"), router_of(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_runs_give_bit_identical_routers(tmp_path):

    for name in ("a", "b"):
        train(compose_train(tmp_path / name, *steps(6)))
    a, b = (router_of(tmp_path / n) for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_min_experts_below_top_k(tmp_path):
    with pytest.raises(
        ValueError, match=r"router.min_experts=2: must be in \[top_k=4, num_experts=32\]"
    ):
        train(compose_train(tmp_path, "router.min_experts=2"))


def test_unwritable_output_dir_fails_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=r"paths.output_dir=.*file/run: cannot write"):
        train(compose_train(blocker / "run"))


def test_tokenizer_without_the_models_mask_token(tmp_path):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(TINY_BASE, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "mask_token_id": 5}))
    with pytest.raises(
        ValueError, match=r"mask token id 1, the model's config.json mask_token_id=5"
    ):
        train(compose_train(tmp_path / "run", f"model.path={base}"))


@pytest.mark.slow
def test_cli_bad_input_is_one_message_and_exit_1(tmp_path):
    out = cli_train(tmp_path, "router.top_p=1.5")
    assert out.returncode == 1
    assert "router.top_p=1.5: must be in (0, 1]" in out.stderr
    assert "Traceback" not in out.stderr
    # and in the job log, which the run directory keeps
    assert "router.top_p=1.5: must be in (0, 1]" in (tmp_path / "train.log").read_text()


def test_bad_batches_can_be_skipped_up_to_a_bound(tmp_path, caplog):
    cfg = compose_train(
        tmp_path,
        *steps(6),
        "module.max_bad_batches=1",
        "+callbacks.poison._target_=helpers.PoisonOneBatch",
        "+callbacks.poison.step=3",
    )
    summary = train(cfg)
    assert summary["steps"] == 6 and summary["val_loss_after"] < summary["val_loss_token"] * 1.5
    assert "skipping batch with non-finite loss at step 3 (1 of at most 1)" in caplog.text


# --- helpers -------------------------------------------------------------------------------


def _perturbed_router(base: Path, out: Path, dtype: torch.dtype | None = None) -> Path:
    """A router checkpoint of `base` whose gates moved far from the base's (as training moves
    them), saved in fp32 under top-p routing."""
    model = load_model(base, dtype=dtype)
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for name, p in model.named_parameters():
        if is_router_param(name):
            moved = p.detach().float()
            if name.endswith("gate.weight"):
                moved = moved + torch.randn(moved.shape, generator=gen)
            tensors[name] = moved
    model.set_routing(RoutingPolicy("topp", block_size=8, top_p=0.5, min_experts=4))
    return save_adapted(tensors, out, adapted_manifest(model, base_path=str(base)))


def _eval(out: Path, *overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "eval",
            [f"paths.output_dir={out}", "generation.max_samples=32", *overrides],
        )
    return run_eval(cfg)


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


SUMS = [{"question": f"{a}+{b}=", "answer": str(a + b)} for a in range(10) for b in range(8)]


@pytest.fixture
def no_model_load(monkeypatch):
    """Fails the test if the model is built: the error must come before it."""

    def loaded(*_, **__):
        raise AssertionError("the model was loaded before the bad setting was refused")

    monkeypatch.setattr("dmoe_train.cli.train.load_routed_model", loaded)


# --- writes never clobber ------------------------------------------------------------------


def test_export_refuses_a_directory_holding_another_model(tmp_path):
    router = _perturbed_router(TINY_BASE, tmp_path / "ckpt")
    other = tmp_path / "other"
    shutil.copytree(TINY_BASE, other)
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    with pytest.raises(ValueError, match=r"--out .*other: not empty and not an earlier dmoe"):
        export_cli.export(router, other)
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before


def test_export_refuses_the_bases_own_directory(tmp_path):
    base = tmp_path / "base"
    shutil.copytree(TINY_BASE, base)
    router = _perturbed_router(base, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in base.iterdir()}
    for out in (base, tmp_path):  # the base itself, or a folder that holds it
        with pytest.raises(ValueError, match=r"holds the base model"):
            export_cli.export(router, out)
    assert {p.name: p.read_bytes() for p in base.iterdir()} == before


def test_export_replaces_an_earlier_export_whole(tmp_path):
    router = _perturbed_router(TINY_BASE, tmp_path / "ckpt")
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
    router = _perturbed_router(base, tmp_path / "ckpt", dtype=torch.bfloat16)
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


def _interrupted(run: Path, *overrides: str) -> list[str]:
    """Overrides of a run interrupted (SIGTERM) at step 2 of 6, and run to there."""
    common = [*steps(6, checkpoint_every=2), "+callbacks.stop._target_=helpers.InterruptAtStep"]
    common.append("+callbacks.stop.step=2")
    assert train(compose_train(run, *common, *overrides)) == {"interrupted_at_step": 2}
    return common


def test_relaunch_under_another_configuration_stops_and_names_the_keys(tmp_path):
    common = _interrupted(tmp_path)
    kept = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    changed = r"regularizer.weight: 0.03 -> 0.5; router.top_p: 0.99 -> 0.5; relaunch with its own"
    with pytest.raises(ValueError, match=rf"started with another configuration: {changed}"):
        train(compose_train(tmp_path, *common, "router.top_p=0.5", "regularizer.weight=0.5"))
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == kept
    # resume_with_changes resumes anyway, and run_info.json records the change
    summary = train(compose_train(tmp_path, *common, "router.top_p=0.5", "resume_with_changes=1"))
    assert summary["steps"] == 6 and summary["policy"]["top_p"] == 0.5
    info = json.loads((tmp_path / "checkpoints" / "run_info.json").read_text())
    assert info["config"]["router"]["top_p"] == 0.99  # what it started with
    assert info["resumes"] == [{"changed": {"router.top_p": [0.99, 0.5]}}]


def test_relaunch_cannot_change_what_the_checkpoint_restores(tmp_path):
    common = _interrupted(tmp_path)
    with pytest.raises(ValueError, match=r"\['module.optimizer.lr'\] cannot change on resume"):
        train(compose_train(tmp_path, *common, "module.optimizer.lr=0.01", "resume_with_changes=1"))


def test_a_finished_run_is_not_reentered(tmp_path):
    train(compose_train(tmp_path, *steps(2)))
    files = {p: p.read_bytes() for p in tmp_path.rglob("*.json") if p.is_file()}
    files[tmp_path / "checkpoints" / "router.safetensors"] = b""
    router = (tmp_path / "checkpoints" / "router.safetensors").read_bytes()
    with pytest.raises(ValueError, match=r"holds a finished run \(summary.json\)"):
        train(compose_train(tmp_path, *steps(2), "router.top_p=0.5"))
    assert (tmp_path / "checkpoints" / "router.safetensors").read_bytes() == router
    assert all(p.read_bytes() == b for p, b in files.items() if p.suffix == ".json")


# --- own data is checked before training ---------------------------------------------------


def test_own_data_cut_by_the_presets_max_seq_len_is_refused(tmp_path, no_model_load):
    rows = [{"question": f"say {i} in words please:", "answer": "a long answer " * 3} for i in SUMS]
    data = _jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(
        ValueError,
        match=r"data.max_seq_len=16: 72 of 72 train samples lose response tokens to it "
        r"\(the longest needs \d+",
    ):
        train(compose_train(tmp_path / "run", f"data.source={data}"))


def test_own_data_gets_a_seeded_test_split_for_evaluation(tmp_path):
    data = _jsonl(tmp_path / "sums.jsonl", SUMS)
    summary = train(
        compose_train(tmp_path / "run", f"data.source={data}", *steps(2), "evaluate_after=true")
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["samples"] == 4 and summary["steps"] == 2  # test_fraction 0.05 of 80 rows
    evaluated = _eval(tmp_path / "eval", f"data.source={data}")
    assert evaluated["samples"] == 4 and 0 <= evaluated["accuracy"] <= 1


def test_own_test_source_is_used_as_the_test_split(tmp_path):
    train_rows, test_rows = SUMS[:60], SUMS[60:]
    data, held = _jsonl(tmp_path / "t.jsonl", train_rows), _jsonl(tmp_path / "h.jsonl", test_rows)
    metrics = _eval(tmp_path / "eval", f"data.source={data}", f"+data.test_source={held}")
    assert metrics["samples"] == len(test_rows)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (
            lambda d: (d / "a.jsonl").write_text('{"question": "1+1=", "answer": "2"}\n{oops\n'),
            r"a.jsonl:2: Expecting property name",
        ),
        (
            lambda d: _jsonl(d / "a.jsonl", [*SUMS[:3], {"question": "2+2="}]),
            r"a.jsonl:4: field 'answer' is missing",
        ),
        (
            lambda d: (_jsonl(d / "a.jsonl", SUMS), (d / "notes.txt").write_text("hi")),
            r"not data files \(.jsonl, .json or .parquet\): \['notes.txt'\]",
        ),
    ],
    ids=["malformed-line", "missing-field", "stray-file"],
)
def test_bad_data_rows_and_files_are_named(tmp_path, write, message, no_model_load):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder)
    with pytest.raises(ValueError, match=message):
        train(compose_train(tmp_path / "run", f"data.source={folder}"))


# --- every setting validated where it is built, before the model loads ---------------------


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("module.optimizer.lr=-0.001", r"module.optimizer.lr=-0.001: must be a number > 0"),
        ("data.batch_size=0", r"data.batch_size=0: must be an integer >= 1"),
        ("data.eval_batch_size=-1", r"data.eval_batch_size=-1: must be an integer >= 1"),
        ("trainer.max_steps=0", r"trainer.max_steps=0: must be an integer >= 1 \(dmoe-eval"),
        ("trainer.val_check_interval=0", r"trainer.val_check_interval=0: must be an integer"),
        ("trainer.accumulate_grad_batches=0", r"trainer.accumulate_grad_batches=0: must be"),
        (
            "callbacks.model_checkpoint.every_n_train_steps=-5",
            r"every_n_train_steps=-5: must be an integer >= 1 \(0: no periodic saves\)",
        ),
        (
            "data.source=/nowhere.jsonl,+data.val_fraction=0.9",
            r"data.val_fraction=0.9: must be in \(0, 0.5\)",
        ),
    ],
)
def test_settings_are_refused_before_the_model_loads(tmp_path, override, message, no_model_load):
    with pytest.raises(ValueError, match=message):
        train(compose_train(tmp_path, *override.split(",")))


def test_truncated_router_file_names_its_path(tmp_path):
    router = _perturbed_router(TINY_BASE, tmp_path / "ckpt")
    router.write_bytes(router.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"router checkpoint {router}: unreadable"):
        _eval(tmp_path / "eval", f"router_checkpoint={router}")


def test_truncated_lightning_checkpoint_names_its_path(tmp_path, no_model_load):
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match=rf"checkpoint {last}: truncated"):
        train(compose_train(tmp_path))


def test_model_directory_without_a_tokenizer_says_so(tmp_path, no_model_load):
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(TINY_BASE / name, base)
    with pytest.raises(FileNotFoundError, match=rf"model path {base}: no tokenizer"):
        train(compose_train(tmp_path / "run", f"model.path={base}"))


def test_full_disk_while_saving_says_so_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """An injected fault: ENOSPC under torch's own error, as a full disk raises it (the test
    below writes to a real, full tmpfs)."""
    import dmoe_train.training.atomic_checkpoint_io as checkpoint_io

    real_save, saves = torch.save, []

    def save(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 2:
            try:
                raise OSError(errno.ENOSPC, "No space left on device")
            except OSError as err:
                raise RuntimeError("PytorchStreamWriter failed writing file data/0") from err
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpoint_io.torch, "save", save)
    last = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(OSError, match=rf"no space left on device writing {last} \(the previous"):
        train(compose_train(tmp_path, *steps(6, checkpoint_every=2)))
    assert torch.load(last, weights_only=False)["global_step"] == 2
    assert not list(last.parent.glob(".*.tmp"))


def test_full_tmpfs_keeps_the_previous_file(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)])
    if mounted.returncode:
        pytest.skip("no permission to mount a tmpfs (the injected-fault test above covers it)")
    try:
        path = mount / "last.ckpt"
        atomic_write(path, lambda p: torch.save({"step": 1}, p))
        with pytest.raises(OSError, match=r"no space left on device .* previous last.ckpt") as err:
            atomic_write(path, lambda p: torch.save({"w": torch.zeros(64 * 1024)}, p))
        assert err.value.errno == errno.ENOSPC
        assert torch.load(path) == {"step": 1} and [p.name for p in mount.iterdir()] == [path.name]
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=True)


# --- the retained share is against the base ------------------------------------------------


def test_eval_reference_is_the_base_not_the_adapted_router(tmp_path):
    router = _perturbed_router(TINY_BASE, tmp_path / "ckpt")
    adapted = _eval(tmp_path / "adapted", f"router_checkpoint={router}")
    base = _eval(tmp_path / "base", "router=token", "reference_token=false")
    as_token = _eval(
        tmp_path / "as_token", f"router_checkpoint={router}", "router=token", "reference_token=0"
    )
    # the adapted router under token routing is another model: the test tells the two apart
    assert as_token["unique_experts_per_block"] != base["unique_experts_per_block"]
    assert adapted["accuracy_token"] == base["accuracy"]
    assert adapted["unique_experts_token"] == base["unique_experts_per_block"]
    assert adapted["accuracy_retained"] == pytest.approx(adapted["accuracy"] / base["accuracy"])


def test_training_summary_reference_is_the_base_under_init_router(tmp_path):
    router = _perturbed_router(TINY_BASE, tmp_path / "ckpt")
    plain = train(compose_train(tmp_path / "plain", *steps(1)))
    started = train(compose_train(tmp_path / "init", *steps(1), f"init_router={router}"))
    assert started["val_loss_token"] == plain["val_loss_token"]
    assert started["unique_experts_token"] == plain["unique_experts_token"]
    assert started["val_loss_before"] != plain["val_loss_before"]  # it did start from the router


# --- smaller -------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_bad_sweep_point_is_reported_and_the_others_run(tmp_path):
    sweep = tmp_path / "sweep"
    out = run_cli("-m", "router.top_p=1.5,0.9", *steps(2), f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 1
    assert "router.top_p=1.5: must be in (0, 1]" in out.stderr
    assert json.loads((sweep / "1" / "summary.json").read_text())["policy"]["top_p"] == 0.9
    assert not (sweep / "0" / "summary.json").exists()


# --- dmoe-generate writes only what it owns -------------------------------------------------


def test_generate_refuses_a_directory_it_did_not_write(tmp_path, monkeypatch):
    run = tmp_path / "run"  # a training run's directory
    train(compose_train(run, *steps(1)))
    before = hashes(run)
    monkeypatch.setattr("dmoe_train.cli.generate.instantiate", _no_load)
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
    monkeypatch.setattr("dmoe_train.cli.generate.instantiate", _no_load)
    changed = r"\(data.seed: 0 -> 1; max_rows: 32 -> 16; seed: 0 -> 1\)"
    with pytest.raises(ValueError, match=rf"out_dir={out} holds dmoe-generate output .* {changed}"):
        run_generate(compose_generate(out, "seed=1", "max_rows=16"))
    assert hashes(out) == before


# --- own data in the format the base knows --------------------------------------------------


def test_question_answer_rows_read_as_the_plain_text_a_base_without_template_knows(
    tmp_path, tokenizer_dir, caplog
):
    from dmoe_train.data.module import data_module

    caplog.set_level(logging.INFO)
    qa = _jsonl(tmp_path / "qa.jsonl", SUMS)
    plain = [{"prompt": r["question"], "response": r["answer"]} for r in SUMS]
    pr = _jsonl(tmp_path / "pr.jsonl", plain)
    modules = [data_module(str(tokenizer_dir), source=str(f)) for f in (qa, pr)]
    for dm in modules:
        dm.setup()
    a, b = (dm.splits["train"][:]["input_ids"] for dm in modules)
    assert torch.equal(a, b)  # the same tokens: no chat wrapping, no newline the base never saw
    assert f"source={qa}: question -> prompt, answer -> response; the base has no chat " in (
        caplog.text
    )


@pytest.mark.parametrize("field", ["question", "answer"])
def test_an_empty_field_is_refused_naming_file_and_row(tmp_path, field, no_model_load):
    rows = [*SUMS[:5], {**SUMS[5], field: "  "}, *SUMS[6:]]
    data = _jsonl(tmp_path / "sums.jsonl", rows)
    with pytest.raises(ValueError, match=rf"sums.jsonl:6: field '{field}' is empty"):
        train(compose_train(tmp_path / "run", f"data.source={data}"))


def test_a_reference_that_scored_zero_leaves_the_retained_share_undefined(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    words = [{"question": r["question"], "answer": "a word"} for r in SUMS]  # never right
    data = _jsonl(tmp_path / "words.jsonl", words)
    metrics = _eval(tmp_path / "eval", f"data.source={data}")
    assert metrics["accuracy_token"] == 0 and metrics["accuracy_retained"] is None
    assert "| undefined (reference 0) |" in caplog.text
    # 4 test rows (5% of 80): said, with the count
    assert "exact match on 4 samples of the test split (fewer than 30)" in caplog.text


# --- files readable as the rest of the output -----------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_written_has_the_users_permissions(tmp_path, umask):
    previous = os.umask(umask)
    try:
        _export_a_lora_run(tmp_path)
    finally:
        os.umask(previous)
    wanted = oct(0o666 & ~umask)
    written = [p for d in ("run", "exp", "adapter") for p in (tmp_path / d).rglob("*")]
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written}
    assert {p: m for p, m in modes.items() if (tmp_path / p).is_file() and m != wanted} == {}


def _export_a_lora_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    train(compose_train(run, *steps(2), "module.trainable=router+lora", "module.lora.rank=2"))
    router = run / "checkpoints" / "router.safetensors"
    export_cli.export(router, tmp_path / "exp", adapter_out=tmp_path / "adapter")


# --- refusals name what the user gave, in one line ------------------------------------------


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


def test_disk_store_with_a_checkpoint_that_changed_the_experts(tmp_path, monkeypatch):
    router = _perturbed_router(TINY_BASE, tmp_path / "ckpt")
    model = load_model(TINY_BASE)
    experts = {n: p.detach() for n, p in model.named_parameters() if ".mlp.experts." in n}
    manifest = json.loads(router.with_name("router.json").read_text())
    save_adapted({**load_file(router), **experts}, tmp_path / "ckpt", manifest)
    monkeypatch.setattr("dmoe_train.evaluation.run.instantiate", _data_only)
    with pytest.raises(ValueError) as refused:
        _eval(
            tmp_path / "eval", f"router_checkpoint={router}", "generation.expert_cache=8",
            "generation.expert_store=disk",
        )  # fmt: skip
    message = str(refused.value)
    assert message.startswith("generation.expert_store=disk reads the base's routed experts")
    assert f"router_checkpoint={router} changed them" in message
    assert "\n" not in message and len(message) < len(str(router)) + 250  # no shape dump


def test_an_empty_skill_list_is_called_empty(tmp_path, no_model_load):
    with pytest.raises(ValueError) as refused:
        train(compose_train(tmp_path, "data=skills", "data.train_skills=[]"))
    assert message_of(refused.value) == (
        "data.train_skills=[]: empty; name at least one of ['add', 'sort', 'reverse', 'count']"
    )


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["router.top_p=1.5"], "error: router.top_p=1.5: must be in (0, 1]"),
        (
            ["data=skills", "data.train_skills=[add,multiply]"],
            "error: data.train_skills=['add', 'multiply']: unknown ['multiply']; each must be "
            "one of ['add', 'sort', 'reverse', 'count']",
        ),
        (
            ["data.train_skills=[add]"],
            "error: data.train_skills: not a setting of the data preset in use; data=skills has "
            "it (add that to the command)",
        ),
    ],
    ids=["instantiated-policy", "instantiated-data", "another-presets-key"],
)
def test_a_refusal_is_one_line_even_inside_hydra(tmp_path, capfd, args, line):
    from dmoe_train.cli import train as train_cli

    run = tmp_path / "run"
    assert run_main(train_cli.main, f"hydra.run.dir={run}", *args) == 1
    errors = [e for e in capfd.readouterr().err.splitlines() if "error" in e.lower()]
    assert [e[e.index("error: ") :] for e in errors] == [line]
    assert not (run / "checkpoints").exists()


def test_a_refused_module_setting_writes_nothing_into_the_run(tmp_path):
    overrides = ("module.trainable=router+lora", "module.lora.rank=0")
    with pytest.raises(ValueError, match=r"module.lora.rank=0: must be an integer >= 1"):
        train(compose_train(tmp_path / "run", *overrides))
    assert not (tmp_path / "run").exists()


# --- dmoe-eval says what it measured against and where it wrote -----------------------------


def test_eval_says_where_metrics_went_and_shows_the_cache(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    metrics = _eval(tmp_path / "eval", "generation.expert_cache=8", "reference_token=false")
    assert f"metrics: {tmp_path / 'eval' / 'metrics.json'}" in caplog.text
    head, _, row = format_table([metrics]).splitlines()
    cells = dict(zip(head.split(" | "), row.split(" | "), strict=True))
    assert cells["expert cache"] == "8" and float(cells["MB loaded/block"]) > 0


def test_eval_of_an_export_measures_against_its_base(tmp_path):
    router = _perturbed_router(TINY_BASE, tmp_path / "ckpt")
    exported = export_cli.export(router, tmp_path / "exp")
    base = _eval(tmp_path / "base", "router=token", "reference_token=false")
    metrics = _eval(tmp_path / "of_export", f"model.path={exported}")
    assert metrics["reference"].startswith(f"{TINY_BASE} under token routing (the base")
    assert metrics["accuracy_token"] == base["accuracy"]
    # the base no longer at hand: the export's own token routing, and said so
    record = json.loads((exported / "dmoe_export.json").read_text())
    record["base"] = str(tmp_path / "moved")
    (exported / "dmoe_export.json").write_text(json.dumps(record))
    alone = _eval(tmp_path / "alone", f"model.path={exported}")
    assert alone["reference"].startswith(f"the export {exported} itself under token routing")
    assert "is not at hand" in alone["reference"]


def _no_load(*_, **__):
    raise AssertionError("data or model loaded before the output directory was checked")


def _data_only(node, *args, **kwargs):
    """`instantiate` that builds the data module and refuses the model."""
    from hydra.utils import instantiate

    if "load_model" in str(node.get("_target_", "")):
        raise AssertionError("the model was loaded before the bad setting was refused")
    return instantiate(node, *args, **kwargs)
