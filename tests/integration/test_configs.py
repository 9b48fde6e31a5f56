"""Every experiment preset composes to what its header promises, and its router is valid."""

import pytest
from helpers import CONFIGS, TINY_BASE, compose_train
from hydra.utils import instantiate
from omegaconf import OmegaConf

TINY_TOPP = {
    "model.path": str(TINY_BASE),
    "router.name": "topp",
    "router.block_size": 8,
    "router.top_p": 0.95,
    "router.min_experts": 8,
    "regularizer.kind": "none",
    "module.distill_weight": 1.0,
    "module.optimizer.lr": 3.0e-4,
    "trainer.max_steps": 400,
    "trainer.val_check_interval": 100,
}
PROMISES = {
    "tiny_topp": TINY_TOPP,
    # tiny_topp without self-distillation, everything else the same
    "plain_finetune": TINY_TOPP | {"module.distill_weight": 0.0},
    "retrofit_ec": {
        "router.name": "expert_choice",
        "router.schedule": "linear_reverse",
        "router.k_min": 2,
        "router.k_max": 6,
        "router.capacity_factor": 2.0,
        "regularizer.kind": "none",
        "module.trainable": "router+experts",
        "module.z_loss_weight": 1.0e-3,
        "module.optimizer.lr": 3.0e-3,
        "trainer.max_steps": 6000,
    },
    "tiny256_topp": {
        "model.path": str(TINY_BASE.parent / "tiny256-llada2"),
        "data.source": "skills",
        "data.test_size": 1000,
        "router.name": "topp",
        "router.block_size": 32,
        "router.top_p": 0.7,
        "router.min_experts": 8,
        "regularizer.kind": "union",
        "regularizer.weight": 0.1,
        "module.optimizer.lr": 3.0e-3,
        "trainer.deterministic": False,
        "trainer.max_steps": 500,
        "generation.threshold": 0.95,
    },
    "tiny_gemma_topp": {
        "model.path": str(TINY_BASE.parent / "tiny-diffusion-gemma"),
        "data.source": "skills",
        "router.name": "topp",
        "router.block_size": 32,
        "router.top_p": 0.7,
        "router.min_experts": 8,
        "regularizer.kind": "union",
        "regularizer.weight": 0.1,
        "module.t_low": 0.001,
        "module.t_high": 1.0,
        "module.optimizer.lr": 3.0e-3,
        "trainer.max_steps": 500,
        "generation.steps": 48,
    },
    "llada2_mini_topp": {
        "model.dtype": "bfloat16",
        "router.rule": "dmoe-train",
        "router.block_size": 32,
        "router.top_p": 0.6,
        "router.min_experts": 16,
        "data.max_seq_len": 512,
        "trainer.accelerator": "gpu",
        "trainer.precision": "bf16-mixed",
        "module.optimizer.lr": 1.0e-4,
        "module.activation_checkpointing": True,
        "trainer.max_steps": 2000,
    },
}


def test_every_preset_is_checked():
    assert set(PROMISES) == {p.stem for p in (CONFIGS / "experiment").glob("*.yaml")}


@pytest.mark.parametrize("name", sorted(PROMISES))
def test_preset_composes_as_named(tmp_path, name):
    cfg = compose_train(tmp_path, f"experiment={name}", fast=False)
    policy = instantiate(cfg.router)
    for key, expected in PROMISES[name].items():
        if key == "router.rule":
            assert policy.rule == expected
        else:
            assert OmegaConf.select(cfg, key) == expected, key


def test_default_is_the_embedded_default(tmp_path):
    """`make train` (no experiment named) runs tiny_topp."""
    default = OmegaConf.to_container(compose_train(tmp_path, fast=False))
    named = compose_train(tmp_path, "experiment=tiny_topp", fast=False)
    named = OmegaConf.to_container(named)
    assert default == named
