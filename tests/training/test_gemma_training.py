"""Router fine-tuning of DiffusionGemma through the same LightningModule: its own objective,
its adapted weights exactly the trained set, an export transformers loads unchanged."""

import json

import pytest
import torch
from helpers import compose_train, router_of, steps, tiny_gemma_dir
from peft import PeftModel
from transformers import DiffusionGemmaForBlockDiffusion

from dmoe_train.cli import export as export_cli
from dmoe_train.cli.train import train
from dmoe_train.models import load_model
from dmoe_train.models.families.diffusion_gemma import ROUTING_KEY

GEMMA = [
    "experiment=tiny_gemma_topp", "data.train_size=64", "data.val_size=16", "data.test_size=16",
    "data.batch_size=8", "data.eval_batch_size=16", "router.top_p=0.5", "router.min_experts=4",
]  # fmt: skip


@pytest.fixture(scope="module")
def gemma_base(tmp_path_factory):
    return tiny_gemma_dir(tmp_path_factory.mktemp("gemma") / "base")


ROUTER = {"router.proj.weight", "router.scale", "router.per_expert_scale"}
ADAPTERS = {f"experts.{w}lora_{m}.default.weight" for w in ("", "base_layer.") for m in "AB"}


@pytest.mark.parametrize(
    ("trainable", "suffixes"),
    [
        ("router", ROUTER),
        ("router+dense", ROUTER | {"mlp.gate_proj.weight", "mlp.up_proj.weight",
                                   "mlp.down_proj.weight"}),
        ("router+lora", ROUTER | ADAPTERS),
    ],
)  # fmt: skip
def test_a_run_trains_exactly_its_set_with_the_canvas_objective(
    tmp_path, gemma_base, trainable, suffixes
):
    summary = train(
        compose_train(
            tmp_path,
            *GEMMA,
            f"model.path={gemma_base}",
            f"module.trainable={trainable}",
            *steps(2),
            fast=False,
        )  # fmt: skip
    )
    assert (
        summary["steps"] == 2 and summary["unique_experts_before"] < summary["unique_experts_token"]
    )
    # the encoder keeps token routing: untrained, its loss is the base's whatever the policy;
    # trained, the shared router (and adapters) move it
    assert summary["encoder_loss_before"] == summary["encoder_loss_token"]
    assert summary["encoder_loss_after"] != summary["encoder_loss_before"]
    saved = router_of(tmp_path)
    want = {f"model.encoder.language_model.layers.{i}.{s}" for i in range(2) for s in suffixes}
    assert set(saved) == want  # one copy of each shared weight, nothing else
    assert all(t.dtype == torch.float32 for t in saved.values())


def test_the_export_loads_in_transformers_unchanged_and_routes_by_its_rule(tmp_path, gemma_base):
    train(
        compose_train(tmp_path / "run", *GEMMA, f"model.path={gemma_base}", *steps(2), fast=False)
    )
    router = tmp_path / "run" / "checkpoints" / "router.safetensors"
    out = export_cli.export(router, tmp_path / "exp")
    plain = DiffusionGemmaForBlockDiffusion.from_pretrained(out)  # transformers alone
    adapted = router_of(tmp_path / "run")
    for name, tensor in adapted.items():
        assert torch.equal(plain.state_dict()[name].float(), tensor), name
    recorded = json.loads((out / "config.json").read_text())[ROUTING_KEY]
    assert recorded["name"] == "topp" and recorded["top_p"] == 0.5
    assert load_model(out).canvas_routing.policy.top_p == 0.5  # ours routes by it again


def test_adapters_export_merged_and_as_peft_directory_that_peft_loads(tmp_path, gemma_base):
    run = tmp_path / "run"
    overrides = (*GEMMA, f"model.path={gemma_base}", "module.trainable=router+lora")
    train(compose_train(run, *overrides, "module.optimizer.lr=0.05", *steps(2), fast=False))
    router = run / "checkpoints" / "router.safetensors"
    out = export_cli.export(router, tmp_path / "exp", adapter_out=tmp_path / "adapter")
    merged = DiffusionGemmaForBlockDiffusion.from_pretrained(out).eval()
    base = DiffusionGemmaForBlockDiffusion.from_pretrained(gemma_base).eval()
    name = "model.decoder.layers.0.experts.gate_up_proj"
    assert not torch.equal(merged.state_dict()[name], base.state_dict()[name])  # adapted
    # the router trained beside the adapters, so peft's adapters go on the base with that router
    routers = {k: v for k, v in router_of(run).items() if "lora" not in k}
    assert routers and not base.load_state_dict(routers, strict=False).unexpected_keys
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    ids, canvas = torch.randint(3, 40, (2, 12)), torch.randint(3, 40, (2, 64))
    with torch.no_grad():
        want = adapted(input_ids=ids, decoder_input_ids=canvas).logits
        got = merged(input_ids=ids, decoder_input_ids=canvas).logits
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


def test_resume_equals_uninterrupted_run(tmp_path, gemma_base):
    # adapters and router, self-conditioning's coin and the corruption keyed per sample: a run
    # stopped after step 3 and resumed ends bit for bit where the uninterrupted one does
    common = [*GEMMA, f"model.path={gemma_base}", "module.trainable=router+lora",
              *steps(6, checkpoint_every=3)]  # fmt: skip
    full = train(compose_train(tmp_path / "full", *common, fast=False))
    interrupt = ["+callbacks.stop._target_=helpers.InterruptAtStep", "+callbacks.stop.step=3"]
    stopped = compose_train(tmp_path / "resumed", *common, *interrupt, fast=False)
    assert train(stopped) == {"interrupted_at_step": 3}
    resumed = train(compose_train(tmp_path / "resumed", *common, *interrupt, fast=False))
    assert resumed["steps"] == 6
    a, b = router_of(tmp_path / "full"), router_of(tmp_path / "resumed")
    assert a.keys() == b.keys() and any("lora_B" in k for k in a)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert resumed["val_loss_after"] == full["val_loss_after"]
