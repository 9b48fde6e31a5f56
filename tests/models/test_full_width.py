"""A LLaDA2.0-mini checkpoint at full width (2 layers, random bfloat16 weights), written from the
published facts by code independent of ours, loads and runs every routing rule."""

import pytest
import torch

from dmoe_train.models import load_model
from dmoe_train.routing import RULES, RoutingPolicy
from dmoe_train.studies.full_width_checkpoint import CONFIG, shapes, write_full_width


@pytest.mark.slow
def test_full_width_slice_loads_and_routes(tmp_path):
    weights = write_full_width(tmp_path / "mini", layers=2, shard_bytes=2**30)
    assert len(list((tmp_path / "mini").glob("model-0000*-of-00003.safetensors"))) == 3
    model = load_model(tmp_path / "mini", dtype=torch.bfloat16)
    n_params = sum(t.numel() for t in model.state_dict().values())
    assert n_params * 2 == weights  # every published tensor read, nothing left over
    assert n_params == sum(torch.Size(s).numel() for _, s in shapes(2))
    assert model.model.layers[1].mlp.experts.gate_proj.shape == (256, 512, 2048)
    ids = torch.randint(
        0, CONFIG["vocab_size"], (1, 64), generator=torch.Generator().manual_seed(0)
    )
    for policy in (
        RoutingPolicy("token"),
        RoutingPolicy("topp", block_size=32, top_p=0.6, min_experts=16, **RULES["dmoe"]),
        RoutingPolicy("capacity_max", block_size=32, capacity=48, **RULES["llada22"]),
    ):
        model.set_routing(policy)
        with torch.no_grad():
            out = model(ids)
        assert out.logits.shape == (1, 64, 157184) and torch.isfinite(out.logits).all()
        (routing,) = out.routing  # the one MoE layer
        if policy.name == "capacity_max":
            assert (routing.coreset.sum(-1) == 48).all()
