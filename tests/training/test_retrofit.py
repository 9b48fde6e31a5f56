"""Retrofitting the token-choice base to expert choice lowers expert choice's loss."""

import json

import pytest
from helpers import compose_train
from safetensors.torch import load_file

from dmoe_train.cli.train import train


@pytest.mark.slow
def test_retrofit_lowers_expert_choice_validation_loss(tmp_path):
    cfg = compose_train(
        tmp_path, "experiment=retrofit_ec", "trainer.max_steps=60", "trainer.val_check_interval=60"
    )
    summary = train(cfg)
    assert summary["policy"]["name"] == "expert_choice"
    assert summary["policy"]["schedule"] == "linear_reverse"
    assert summary["val_loss_after"] < summary["val_loss_before"] - 0.05
    assert summary["regularizer"]["kind"] == "none"
    manifest = json.loads((tmp_path / "checkpoints" / "router.json").read_text())
    assert manifest["routing"]["name"] == "expert_choice"
    # the recommended retrofit moves the routed experts with the router
    saved = load_file(tmp_path / "checkpoints" / "router.safetensors")
    assert any(".mlp.experts." in key for key in saved)
    assert not any("self_attn" in key or "shared_experts" in key for key in saved)
