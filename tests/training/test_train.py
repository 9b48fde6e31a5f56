import json
import re
import struct

import pytest
import torch
from helpers import TINY_BASE, compose_train, router_of, run_cli, steps
from hydra.utils import instantiate
from safetensors.torch import load_file

from dmoe_train.cli.train import train
from dmoe_train.models import load_model
from dmoe_train.models.adapted_weights import load_adapted

MOE_LAYERS = (1, 2, 3)
GATES = {f"model.model.layers.{i}.mlp.gate.weight" for i in MOE_LAYERS}
PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@pytest.mark.parametrize(
    ("router", "regularizer"),
    [
        ("token", "none"),
        ("topk_cap", "none"),
        ("des_vote", "union"),
        ("capacity_max", "union"),
        ("topp", "union"),
        ("topp", "entropy"),
        ("topp", "none"),
    ],
)
def test_fast_dev_run(tmp_path, router, regularizer):
    cfg = compose_train(
        tmp_path, f"router={router}", f"regularizer={regularizer}", "+trainer.fast_dev_run=true"
    )
    summary = train(cfg)
    assert summary["steps"] == 1
    token, before = summary["unique_experts_token"], summary["unique_experts_before"]
    assert 4 <= token <= 32  # the tiny base: top-4 of 32 experts per token
    if router == "token":  # the same routing: the same validation numbers, up to the rare
        # near-tie a threaded CPU reduction breaks the other way (seen once in CI-like runs)
        assert before == pytest.approx(token, rel=1e-2)
        assert summary["val_loss_before"] == pytest.approx(summary["val_loss_token"], rel=1e-3)
    elif router == "topk_cap":
        assert before < token
    elif router in ("des_vote", "capacity_max"):
        assert before <= 8  # the capacity
    else:  # top_p 0.95 keeps most of the union of the votes, never more
        assert 8 <= before <= token
    assert summary["val_loss_after"] < 5.0  # ln(128) = 4.85: better than uniform
    written = json.loads((tmp_path / "summary.json").read_text())
    assert written["router_checkpoint"].endswith("router.safetensors")
    assert set(load_file(written["router_checkpoint"])) == {k.removeprefix("model.") for k in GATES}


@pytest.mark.parametrize(
    "objective",
    [
        [],
        # the teacher must stay the base's router across the resume, the curriculum its step's
        ["module.distill_weight=0.5", "module.curriculum_start=1.0", "router.top_p=0.6"],
    ],
    ids=["plain", "distill+curriculum"],
)
def test_resume_equals_uninterrupted_run(tmp_path, objective, caplog):
    caplog.set_level("INFO", logger="dmoe_train")
    common = [*steps(12, checkpoint_every=3), "trainer.val_check_interval=6", *objective]
    full = train(compose_train(tmp_path / "full", *common))
    # cut before the first periodic save, then between two, then run to the end
    interrupt = ["+callbacks.stop._target_=helpers.InterruptAtStep", "+callbacks.stop.step=[2,8]"]

    def run():
        return compose_train(tmp_path / "resumed", *common, *interrupt)

    checkpoints = tmp_path / "resumed" / "checkpoints"
    assert train(run()) == {"interrupted_at_step": 2}
    ckpt = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert set(ckpt["state_dict"]) == GATES  # only the router: never the frozen base
    assert ckpt["global_step"] == 2  # saved on the way out, before any periodic save
    assert train(run()) == {"interrupted_at_step": 8}
    # the resumed run's periodic saves went to the one last.ckpt a relaunch reads, not to a
    # last-v1.ckpt beside it (a kill between them would have resumed from step 2)
    assert [p.name for p in checkpoints.glob("*.ckpt")] == ["last.ckpt"]
    resumed = train(run())
    assert re.findall(r"resumed from \S+ at step (\d+)", caplog.text) == ["2", "8"]
    assert resumed["steps"] == 12
    a, b = router_of(tmp_path / "full"), router_of(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed["val_loss_after"] == full["val_loss_after"]


def test_init_router_and_resume_are_exclusive(tmp_path):
    cfg = compose_train(
        tmp_path, "ckpt_path=/nowhere/last.ckpt", "init_router=/nowhere/router.safetensors"
    )
    with pytest.raises(ValueError, match="init_router"):
        train(cfg)


@pytest.mark.slow
def test_cli_prints_composed_config():
    out = run_cli("--cfg", "job", "router=des_vote").stdout
    assert "name: des_vote" in out and "_target_: dmoe_train.training.from_config.fine_tuner" in out


@pytest.mark.parametrize("logger", ["csv", "tensorboard", "wandb"])
def test_logger_configs_write_offline(tmp_path, logger, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_train(tmp_path, f"logger={logger}")
    (log,) = [instantiate(c) for c in cfg.logger.values()]
    log.log_metrics({"train/loss": 0.125}, step=1)
    log.finalize("success")
    if logger == "wandb":  # its writer is another process: wait for the run to close
        log.experiment.finish()
    written = b"".join(p.read_bytes() for p in tmp_path.rglob("*") if p.is_file())
    # the tag and the value: as text (CSV, wandb's offline run) or float32 (TensorBoard events)
    value = struct.pack("<f", 0.125) if logger == "tensorboard" else b"0.125"
    assert b"train/loss" in written and value in written


@pytest.mark.slow
def test_regularizer_lowers_unique_experts(tmp_path):
    common = [*steps(40), "module.optimizer.lr=1e-3"]
    plain = train(compose_train(tmp_path / "none", *common, "regularizer=none"))
    union = train(
        compose_train(tmp_path / "union", *common, "regularizer=union", "regularizer.weight=0.3")
    )
    assert union["unique_experts_before"] == plain["unique_experts_before"]  # same start
    assert union["unique_experts_after"] < plain["unique_experts_after"] - 0.5


def test_flex_attention_trains_as_the_dense_mask(tmp_path):
    """module.attention=block_diffusion_flex: validation through flex_attention, training
    through its dense fallback on the CPU; the same run as the dense mask, to float rounding."""
    runs = {
        mode: train(compose_train(tmp_path / mode, *steps(3), f"module.attention={mode}"))
        for mode in ("block_diffusion", "block_diffusion_flex")
    }
    dense, flex = runs["block_diffusion"], runs["block_diffusion_flex"]
    for key in ("val_loss_token", "val_loss_before", "val_loss_after", "unique_experts_after"):
        assert flex[key] == pytest.approx(dense[key], rel=1e-4), key


@pytest.mark.parametrize("trainable", ["router+experts", "all"])
def test_trainable_set_trains_and_saves_exactly_its_weights(tmp_path, trainable):
    base = load_model(TINY_BASE, dtype=torch.float32)
    names = {n for n, _ in base.named_parameters()}
    experts = {f"model.layers.{i}.mlp.experts.{w}" for i in MOE_LAYERS for w in PROJECTIONS}
    expected = {k.removeprefix("model.") for k in GATES} | experts
    if trainable == "all":  # everything but LLaDA2's balancing state
        expected = {n for n in names if not n.endswith("expert_bias")}
    cfg = compose_train(tmp_path, f"module.trainable={trainable}", *steps(3))
    train(cfg)
    saved = router_of(tmp_path)
    assert set(saved) == expected
    start = dict(base.named_parameters())
    assert all(not torch.equal(saved[n], start[n]) for n in experts)  # the experts moved
    tuned = load_model(TINY_BASE, dtype=torch.float32)
    load_adapted(tuned, tmp_path / "checkpoints" / "router.safetensors")
    for n, p in tuned.named_parameters():  # the checkpoint is the whole difference
        assert torch.equal(p, saved[n] if n in saved else start[n]), n


def test_an_unknown_trainable_set_is_named(tmp_path):
    with pytest.raises(ValueError, match="module.trainable='experts'"):
        train(compose_train(tmp_path, "module.trainable=experts", *steps(1)))


SHARED = {
    f"model.layers.{i}.mlp.shared_experts.{w}.weight" for i in MOE_LAYERS for w in PROJECTIONS
}
# peft nests one ParamWrapper per adapted projection: the innermost adapts gate_proj
LORA = {
    f"model.layers.{i}.mlp.experts.{'base_layer.' * depth}lora_{ab}.default.weight"
    for i in MOE_LAYERS
    for depth in range(3)
    for ab in "AB"
}


@pytest.mark.parametrize(
    ("trainable", "extra"),
    [("router+shared", SHARED), ("router+lora", LORA), ("router+lora+shared", SHARED | LORA)],
)
def test_adapter_sets_train_and_save_exactly_their_weights(tmp_path, trainable, extra):
    cfg = compose_train(tmp_path, f"module.trainable={trainable}", "module.lora.rank=2", *steps(3))
    summary = train(cfg)
    saved = router_of(tmp_path)
    assert set(saved) == {k.removeprefix("model.") for k in GATES} | extra
    base = dict(load_model(TINY_BASE, dtype=torch.float32).named_parameters())
    for name in extra:  # each moved: adapters from B = 0, shared experts from the base's
        start = torch.zeros_like(saved[name]) if "lora_B" in name else base.get(name)
        if start is not None:
            assert not torch.equal(saved[name], start), name
    if "lora" in trainable:
        gate_a = "model.layers.1.mlp.experts.base_layer.base_layer.lora_A.default.weight"
        assert saved[gate_a].shape == (2 * 32, 128)  # gate_proj's A in peft's [r * E, in]
        manifest = json.loads((tmp_path / "checkpoints" / "router.json").read_text())
        assert manifest["lora"] == {"rank": 2, "alpha": 16.0, "targets": list(PROJECTIONS)}
    # the checkpoint alone (adapters re-created from its manifest) gives the trained model
    tuned = load_model(TINY_BASE, dtype=torch.float32)
    load_adapted(tuned, tmp_path / "checkpoints" / "router.safetensors")
    assert all(torch.equal(p, saved[n]) for n, p in tuned.named_parameters() if n in saved)
    assert summary["val_loss_after"] != summary["val_loss_before"]
