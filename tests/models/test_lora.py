"""Low-rank expert adapters: peft's LoRA on the stacked expert tensors, computed on the routed
tokens only, merged for export and saved in peft's adapter format."""

import json

import pytest
import torch
from helpers import TINY_BASE, compose_train, steps
from safetensors.torch import load_file

from dmoe_train.cli.export import export
from dmoe_train.cli.train import train
from dmoe_train.models import load_model
from dmoe_train.models.lora import (
    ExpertLora,
    add_expert_lora,
    expert_low_rank,
    has_expert_lora,
)
from dmoe_train.routing import RoutingPolicy

IDS = torch.randint(3, 50, (2, 16), generator=torch.Generator().manual_seed(0))


def _adapted(rank: int = 4, targets=("gate_proj", "up_proj", "down_proj")):
    model = load_model(TINY_BASE, dtype=torch.float32)
    model.set_routing(RoutingPolicy("topp", block_size=8, top_p=0.6, min_experts=4))
    before = model(IDS).logits
    add_expert_lora(model, ExpertLora(rank=rank, targets=targets))
    unchanged = model(IDS).logits
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # as training moves them
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model, before, unchanged


def test_adapters_start_as_the_identity():
    _, before, unchanged = _adapted()
    assert torch.equal(before, unchanged)


@pytest.mark.parametrize("targets", [("gate_proj", "up_proj", "down_proj"), ("down_proj",)])
def test_routed_token_path_equals_pefts_dense_delta(targets):
    model, before, _ = _adapted(targets=targets)
    moe = model.model.layers[1].mlp
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(6, 128, generator=gen)
    ids = torch.randint(-1, 32, (6, 4), generator=gen)  # -1: empty slots
    weights = torch.rand(6, 4, generator=gen)
    experts, low_rank = expert_low_rank(moe.experts)
    assert sorted(low_rank) == sorted(targets)
    ours = experts(x, ids, weights, low_rank)
    dense = moe.experts(x, ids, weights)  # peft's forward: W + delta for every expert
    torch.testing.assert_close(ours, dense, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, experts(x, ids, weights), atol=1e-3)  # the adapters act
    assert not torch.allclose(model(IDS).logits, before, atol=1e-3)


def test_merge_for_export_gives_the_adapted_model(tmp_path):
    cfg = compose_train(tmp_path / "run", "module.trainable=router+lora", *steps(3))
    train(cfg)
    router = tmp_path / "run" / "checkpoints" / "router.safetensors"
    adapted = load_model(TINY_BASE, dtype=torch.float32)
    from dmoe_train.models.adapted_weights import load_adapted

    load_adapted(adapted, router)
    out = export(router, tmp_path / "exp", base=TINY_BASE, adapter_out=tmp_path / "adapter")
    merged = load_model(out, dtype=torch.float32)
    assert not has_expert_lora(merged)  # the base's names and layout: engines load it as is
    assert not any("lora" in k or "base_layer" in k for k in load_file(out / "model.safetensors"))
    # the base is bf16 on disk, so the merged experts are rounded to bf16 in the export
    torch.testing.assert_close(merged(IDS).logits, adapted(IDS).logits, rtol=0.05, atol=0.05)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 8 and sorted(config["target_parameters"]) == [
        f"mlp.experts.{p}" for p in ("down_proj", "gate_proj", "up_proj")
    ]
    keys = set(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert len(keys) == 3 * 3 * 2 and all(
        k.startswith("base_model.model.") and ".default." not in k for k in keys
    )  # peft's names


def test_bad_lora_settings_are_named():
    with pytest.raises(ValueError, match=r"^rank=0: must be an integer >= 1"):
        ExpertLora(rank=0)
    with pytest.raises(ValueError, match=r"^targets=\['q_proj'\]"):
        ExpertLora(targets=("q_proj",))
