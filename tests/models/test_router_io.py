import pytest
import torch

from dmoe_train.cli.export import export
from dmoe_train.models import build_model, is_router_param, load_model
from dmoe_train.models.adapted_weights import adapted_manifest, load_adapted, save_adapted
from dmoe_train.routing import RoutingPolicy

IDS = torch.randint(3, 100, (2, 16), generator=torch.Generator().manual_seed(0))


def _trained_router(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight"):
                p.add_(torch.randn_like(p))
    model.set_routing(RoutingPolicy("topp", block_size=8, top_p=0.5, min_experts=4))


def test_router_round_trip_export_and_refusal(tmp_path):
    base = build_model("tiny", seed=1)
    base.save_pretrained(tmp_path / "base")
    tuned = load_model(tmp_path / "base")
    _trained_router(tuned)
    router = {n: p for n, p in tuned.named_parameters() if is_router_param(n)}
    save_adapted(
        router, tmp_path / "ckpt", adapted_manifest(tuned, base_path=str(tmp_path / "base"))
    )
    saved = set(
        __import__("safetensors.torch").torch.load_file(tmp_path / "ckpt" / "router.safetensors")
    )
    assert saved == {
        f"model.layers.{i}.mlp.gate.{t}" for i in (1, 2, 3) for t in ("weight", "expert_bias")
    }

    fresh = load_model(tmp_path / "base")
    manifest = load_adapted(fresh, tmp_path / "ckpt" / "router.safetensors")
    assert manifest["routing"]["name"] == "topp" and fresh.config.routing.name == "topp"
    torch.testing.assert_close(fresh(IDS).logits, tuned(IDS).logits, rtol=0, atol=0)

    exported = export(tmp_path / "ckpt" / "router.safetensors", tmp_path / "exported")
    reloaded = load_model(exported)
    assert reloaded.config.routing == tuned.config.routing
    torch.testing.assert_close(reloaded(IDS).logits, tuned(IDS).logits, rtol=0, atol=0)

    other = build_model("tiny", seed=2)  # same shapes, another base
    with pytest.raises(ValueError, match="fingerprint"):
        load_adapted(other, tmp_path / "ckpt" / "router.safetensors")
    wider = build_model("tiny", num_experts=16, n_group=4)
    with pytest.raises(ValueError, match="fingerprint"):
        load_adapted(wider, tmp_path / "ckpt" / "router.safetensors")
