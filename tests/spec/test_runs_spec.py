"""Runs that fail or stop: nothing written is lost, a relaunch resumes to the same weights, a full
disk says so. (docs/reliability.md lists the guarantees.)"""

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import (
    cli_train,
    compose_train,
    router_of,
    steps,
)
from spec_helpers import NOISE, export_a_lora_run, interrupted_run

from dmoe_train.cli.train import train
from dmoe_train.files import atomic_write


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


KILLED_RUN = steps(12, checkpoint_every=4)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """The run every killed one must resume to."""
    out = tmp_path_factory.mktemp("full")
    assert cli_train(out, *KILLED_RUN).returncode == 0
    return out


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGKILL"])
def test_killed_run_resumes_to_the_same_router(tmp_path, uninterrupted, sig):
    from random import Random

    common = KILLED_RUN
    step = Random(sig).randint(2, 10)
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
    a, b = router_of(uninterrupted), router_of(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_runs_give_bit_identical_routers(tmp_path):

    for name in ("a", "b"):
        train(compose_train(tmp_path / name, *steps(6)))
    a, b = (router_of(tmp_path / n) for n in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_unwritable_output_dir_fails_at_start(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match=r"paths.output_dir=.*file/run: cannot write"):
        train(compose_train(blocker / "run"))


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


def test_relaunch_under_another_configuration_stops_and_names_the_keys(tmp_path):
    common = interrupted_run(tmp_path)
    kept = (tmp_path / "checkpoints" / "last.ckpt").read_bytes()
    changed = r"module.distill_weight: 1.0 -> 0.5; router.top_p: 0.95 -> 0.5; relaunch with its own"
    with pytest.raises(ValueError, match=rf"started with another configuration: {changed}"):
        train(compose_train(tmp_path, *common, "router.top_p=0.5", "module.distill_weight=0.5"))
    assert (tmp_path / "checkpoints" / "last.ckpt").read_bytes() == kept
    # resume_with_changes resumes anyway, and run_info.json records the change
    summary = train(compose_train(tmp_path, *common, "router.top_p=0.5", "resume_with_changes=1"))
    assert summary["steps"] == 6 and summary["policy"]["top_p"] == 0.5
    info = json.loads((tmp_path / "checkpoints" / "run_info.json").read_text())
    assert info["config"]["router"]["top_p"] == 0.95  # what it started with
    assert info["resumes"] == [{"changed": {"router.top_p": [0.95, 0.5]}}]


def test_relaunch_cannot_change_what_the_checkpoint_restores(tmp_path):
    common = interrupted_run(tmp_path)
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


def test_truncated_lightning_checkpoint_names_its_path(tmp_path, no_model_load):
    last = tmp_path / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ValueError, match=rf"checkpoint {last}: truncated"):
        train(compose_train(tmp_path))


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


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_file_written_has_the_users_permissions(tmp_path, umask):
    previous = os.umask(umask)
    try:
        export_a_lora_run(tmp_path)
    finally:
        os.umask(previous)
    wanted = oct(0o666 & ~umask)
    written = [p for d in ("run", "exp", "adapter") for p in (tmp_path / d).rglob("*")]
    modes = {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in written}
    assert {p: m for p, m in modes.items() if (tmp_path / p).is_file() and m != wanted} == {}
