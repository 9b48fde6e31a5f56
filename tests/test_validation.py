"""Bad input fails early with a message naming the setting and its value."""

import json

import pytest
import torch
from helpers import TINY_BASE, cli_train, compose_train, router_of, steps
from hydra.errors import InstantiationException

from dmoe_train.cli.train import train


def test_block_size_must_divide_max_seq_len(tmp_path):
    with pytest.raises(ValueError, match=r"data.max_seq_len=16 .* router.block_size=5"):
        train(compose_train(tmp_path, "router.block_size=5"))


def test_sweep_value_that_is_not_a_number(tmp_path):
    with pytest.raises(InstantiationException, match=r"router.top_p='abc': must be a number"):
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
    from dmoe_train.checkpoint_io import AtomicCheckpointIO

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


@pytest.mark.slow
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGKILL"])
def test_killed_run_resumes_to_the_same_router(tmp_path, sig):
    from random import Random

    common = steps(12, checkpoint_every=4)
    step = Random(sig).randint(2, 10)
    assert cli_train(tmp_path / "full", *common).returncode == 0
    killed = cli_train(
        tmp_path / "run",
        *common,
        "+callbacks.kill._target_=helpers.KillAtStep",
        f"+callbacks.kill.step={step}",
        f"+callbacks.kill.signal={sig}",
    )
    if sig == "SIGTERM":  # saved on the way out, and a clean exit
        assert killed.returncode == 0, killed.stderr[-2000:]
        assert f"SIGTERM at step {step}" in killed.stderr  # the log's console copy
        saved = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)
        assert saved["global_step"] == step
    else:  # only the steps since the last periodic save are lost
        assert killed.returncode == -9
        saved = torch.load(tmp_path / "run/checkpoints/last.ckpt", weights_only=False)
        assert saved["global_step"] == step // 4 * 4
    resumed = cli_train(tmp_path / "run", *common)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
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
