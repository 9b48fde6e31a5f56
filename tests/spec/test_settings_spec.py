"""Bad settings: every refused setting names its key in one line, before the model loads, and a
refused run writes nothing. (docs/reliability.md lists the guarantees.)"""

import json
import shutil

import pytest
from helpers import (
    TINY_BASE,
    cli_train,
    compose_train,
    run_cli,
    run_main,
    steps,
)
from hydra.errors import InstantiationException

from dmoe_train.cli.common import message_of
from dmoe_train.cli.train import train


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


def test_negative_balance_weight(tmp_path):
    with pytest.raises(Exception, match=r"module.balance_weight=-0.1: must be >= 0"):
        train(compose_train(tmp_path, "module.balance_weight=-0.1"))


def test_missing_model_path(tmp_path):
    with pytest.raises(Exception, match=r"/nowhere/model: no config.json"):
        train(compose_train(tmp_path, "model.path=/nowhere/model"))


def test_unknown_config_key_is_refused(tmp_path):
    with pytest.raises(Exception, match="router.top_q"):
        compose_train(tmp_path, "router.top_q=0.5")


def test_min_experts_below_top_k(tmp_path):
    with pytest.raises(
        ValueError, match=r"router.min_experts=2: must be in \[top_k=4, num_experts=32\]"
    ):
        train(compose_train(tmp_path, "router.min_experts=2"))


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


def test_model_directory_without_a_tokenizer_says_so(tmp_path, no_model_load):
    base = tmp_path / "base"
    base.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(TINY_BASE / name, base)
    with pytest.raises(FileNotFoundError, match=rf"model path {base}: no tokenizer"):
        train(compose_train(tmp_path / "run", f"model.path={base}"))


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
            "error: data.train_skills=['add', 'multiply']: unknown ['multiply'] in suite=four; "
            "each must be one of ['add', 'sort', 'reverse', 'count']",
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


@pytest.mark.slow
def test_cli_bad_input_is_one_message_and_exit_1(tmp_path):
    out = cli_train(tmp_path, "router.top_p=1.5")
    assert out.returncode == 1
    assert "router.top_p=1.5: must be in (0, 1]" in out.stderr
    assert "Traceback" not in out.stderr
    # and in the job log, which the run directory keeps
    assert "router.top_p=1.5: must be in (0, 1]" in (tmp_path / "train.log").read_text()


@pytest.mark.slow
def test_a_bad_sweep_point_is_reported_and_the_others_run(tmp_path):
    sweep = tmp_path / "sweep"
    out = run_cli("-m", "router.top_p=1.5,0.9", *steps(2), f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert out.returncode == 1
    assert "router.top_p=1.5: must be in (0, 1]" in out.stderr
    assert json.loads((sweep / "1" / "summary.json").read_text())["policy"]["top_p"] == 0.9
    assert not (sweep / "0" / "summary.json").exists()
