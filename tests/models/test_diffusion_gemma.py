"""DiffusionGemma, transformers' own model, under our routing: token routing equals transformers'
own model; block policies route the decoder's canvas by blocks, the encoder by tokens."""

import copy

import pytest
import torch
from peft.tuners.lora.layer import ParamWrapper
from torch.distributed.device_mesh import init_device_mesh
from transformers import DiffusionGemmaConfig, DiffusionGemmaForBlockDiffusion

from dmoe_train.data.tokenizer import char_tokenizer
from dmoe_train.models import load_model
from dmoe_train.models.families.diffusion_gemma import (
    PolicyRouter,
    canvas_batch,
    canvas_forward,
    install_routing,
    text_only_config,
)
from dmoe_train.models.lora import ExpertLora, RoutedRowsLora, add_expert_lora, merge_expert_lora
from dmoe_train.models.sharding import load_shards, shard_model
from dmoe_train.objectives.expert_metrics import unique_experts_per_block
from dmoe_train.routing import RULES, RoutingPolicy
from dmoe_train.settings import SettingError


def tiny_config(
    experts: int = 16, k: int = 4, canvas: int = 32, layers=None
) -> DiffusionGemmaConfig:
    layers = layers or ["sliding_attention", "full_attention"]
    return text_only_config(
        canvas, vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=len(layers),
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, global_head_dim=16,
        num_experts=experts, top_k_experts=k, moe_intermediate_size=32, sliding_window=16,
        layer_types=layers, pad_token_id=0, eos_token_id=1, bos_token_id=2,
    )  # fmt: skip


def random_model(config: DiffusionGemmaConfig, seed: int = 0) -> DiffusionGemmaForBlockDiffusion:
    """transformers' model with random weights, its router scales away from 1 (so the per-expert
    scale and the input scale matter)."""
    torch.manual_seed(seed)
    model = DiffusionGemmaForBlockDiffusion(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("router.scale", "per_expert_scale")):
                p.uniform_(0.5, 1.5)
    return model


def _inputs(config, seed: int = 1, prompt: int = 10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (2, prompt), generator=g)
    canvas = torch.randint(3, 128, (2, config.canvas_length), generator=g)
    return ids, canvas


@pytest.mark.parametrize(
    ("experts", "k", "canvas", "layers"),
    [
        (16, 4, 32, None),
        (8, 2, 64, ["full_attention", "sliding_attention", "full_attention"]),
        (32, 8, 16, ["sliding_attention", "sliding_attention", "full_attention"]),
        (128, 8, 64, None),
    ],
)
def test_token_routing_equals_transformers_own_model(experts, k, canvas, layers):
    config = tiny_config(experts, k, canvas, layers)
    reference = random_model(config)
    ours = copy.deepcopy(reference)
    install_routing(ours, RoutingPolicy("token", block_size=16))
    ids, canvas_ids = _inputs(config)
    with torch.no_grad():
        want = reference(input_ids=ids, decoder_input_ids=canvas_ids).logits
        got = ours(input_ids=ids, decoder_input_ids=canvas_ids).logits
    assert isinstance(ours, DiffusionGemmaForBlockDiffusion)
    assert all(isinstance(layer.router, PolicyRouter) for layer in ours.model.decoder.layers)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-5


POLICIES = [
    RoutingPolicy("topk_cap", block_size=16),
    RoutingPolicy("topp", block_size=16, top_p=0.5, min_experts=4),
    RoutingPolicy("topp", block_size=16, top_p=0.5, min_experts=4, **RULES["dmoe"]),
    RoutingPolicy("des_vote", block_size=16, capacity=6),
    RoutingPolicy("capacity_max", block_size=16, capacity=6, **RULES["llada22"]),
    RoutingPolicy("expert_choice", block_size=16),
    RoutingPolicy("topp", block_size=32, top_p=0.5, min_experts=4),  # the whole canvas
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: f"{p.describe()} block {p.block_size}")
def test_every_policy_routes_the_canvas_by_blocks_and_the_prompt_by_tokens(policy):
    config = tiny_config()
    model = random_model(config)
    routing = install_routing(model, policy)
    ids, canvas_ids = _inputs(config)
    with routing.recording() as records, torch.no_grad():
        model(input_ids=ids, decoder_input_ids=canvas_ids)
    sides = [side for side, _ in records]
    assert sides == ["encoder", "encoder", "decoder", "decoder"]
    for side, r in records:
        if side == "encoder":  # the prompt keeps the published routing
            assert r.coreset is None and r.ids.shape == (2, 10, 4) and (r.ids >= 0).all()
            continue
        assert r.ids.shape[:2] == (2, config.canvas_length)
        if r.coreset is not None:  # every token inside its block's coreset
            blocks = r.ids.unflatten(1, (-1, policy.block_size))
            for b in range(2):
                for j in range(blocks.shape[1]):
                    used = blocks[b, j][blocks[b, j] >= 0].unique()
                    assert r.coreset[b, j, used].all()
        per_block = unique_experts_per_block(r.ids, policy.block_size)
        assert (per_block <= 16).all()


def test_empty_slots_never_reach_the_experts_as_an_out_of_range_index():
    # transformers' grouped experts leave an out-of-range index's rows uninitialised (NaN * 0
    # = NaN): an empty slot repeats a chosen expert at weight 0, and the logits are the eager
    # implementation's, which skips out-of-range indices
    config = tiny_config()
    grouped = random_model(config)
    eager = copy.deepcopy(grouped)
    eager.set_experts_implementation("eager")
    policy = RoutingPolicy("expert_choice", block_size=16)  # tokens get 0 to many experts
    seen = []
    for layer in grouped.model.decoder.layers:
        layer.experts.register_forward_pre_hook(lambda m, args: seen.append(args[1:]))
    ids, canvas_ids = _inputs(config)
    logits = []
    for model in (grouped, eager):
        install_routing(model, policy)
        with torch.no_grad():
            logits.append(model(input_ids=ids, decoder_input_ids=canvas_ids).logits)
    index, weights = seen[0]
    assert int(index.max()) < config.text_config.num_experts and (weights == 0).any()
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)


def test_a_block_policy_touches_fewer_experts_per_block_than_token_routing():
    config = tiny_config(experts=32, k=4)
    model = random_model(config)
    ids, canvas_ids = _inputs(config)
    counts = {}
    for policy in (RoutingPolicy("token", block_size=16), POLICIES[1]):
        routing = install_routing(model, policy)
        with routing.recording() as records, torch.no_grad():
            model(input_ids=ids, decoder_input_ids=canvas_ids)
        decoder = [r for side, r in records if side == "decoder"]
        counts[policy.name] = torch.stack(
            [unique_experts_per_block(r.ids, 16).float().mean() for r in decoder]
        ).mean()
    assert counts["topp"] < counts["token"]


def test_the_training_forward_reads_no_prompt_padding_so_any_pad_width_computes_the_same():
    """Training pads prompts to the sequence length, decoding to the batch's longest prompt:
    with the encoder's pad entries masked out of the decoder's attention (as `generate` masks
    them), the pad width only shifts every position alike, which rotary attention ignores."""
    config = tiny_config(experts=16, k=4)
    model = random_model(config)
    install_routing(model, RoutingPolicy("topp", block_size=16, top_p=0.5, min_experts=4))
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(3))
    batch = {"input_ids": ids, "prompt_len": torch.tensor([7, 12])}
    x_t = torch.randint(
        3, 128, (2, config.canvas_length), generator=torch.Generator().manual_seed(5)
    )
    outs = []
    for width in (None, 40, 100):
        cb = canvas_batch(batch, config.canvas_length, 0, width)
        with torch.no_grad():
            outs.append(canvas_forward(model, cb, x_t, torch.zeros(2, dtype=torch.bool)))
    for out in outs[1:]:
        torch.testing.assert_close(out.logits, outs[0].logits, atol=1e-4, rtol=1e-4)
        for got, want in zip(out.routing, outs[0].routing, strict=True):
            assert torch.equal(got.ids, want.ids)


def test_load_model_picks_the_family_and_routes_by_the_policy(tmp_path):
    config = tiny_config()
    random_model(config).save_pretrained(tmp_path / "gemma")
    char_tokenizer().save_pretrained(tmp_path / "gemma")
    policy = RoutingPolicy("topp", block_size=16, top_p=0.5, min_experts=4)
    model = load_model(tmp_path / "gemma", routing=policy)
    assert type(model) is DiffusionGemmaForBlockDiffusion and model.canvas_routing.policy == policy
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "gemma").eval()
    install_routing(model, RoutingPolicy("token", block_size=16))
    ids, canvas_ids = _inputs(config)
    with torch.no_grad():
        want = reference(input_ids=ids, decoder_input_ids=canvas_ids).logits
        got = model(input_ids=ids, decoder_input_ids=canvas_ids).logits
    assert torch.equal(got, want)


def _sharded_logits(rank: int, path: str, init_file: str, out: str) -> None:
    """A one-rank mesh: the meta model sharded as trainer=fsdp shards it and loaded shard by
    shard; its logits on the test inputs."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=0,
                                         world_size=1)  # fmt: skip
    try:
        model = load_model(path, device="meta", routing=RoutingPolicy("token", block_size=16))
        shard_model(model, init_device_mesh("cpu", (1,)))
        load_shards(model, path, torch.device("cpu"))
        ids, canvas_ids = _inputs(model.config)
        with torch.no_grad():
            torch.save(model.eval()(input_ids=ids, decoder_input_ids=canvas_ids).logits, out)
    finally:
        torch.distributed.destroy_process_group()


def test_the_sharded_load_of_the_meta_model_is_the_model(tmp_path):
    # the encoder's and the decoder's layers stay tied on the meta device and in one FSDP unit,
    # the computed buffers (rotary frequencies, embedding scale) survive materialisation
    model = random_model(tiny_config())
    model.save_pretrained(tmp_path / "gemma")
    empty = load_model(tmp_path / "gemma", device="meta")
    weight = empty.model.encoder.language_model.layers[0].router.proj.weight
    assert weight.is_meta and weight is empty.model.decoder.layers[0].router.proj.weight
    args = (str(tmp_path / "gemma"), str(tmp_path / "init"), str(tmp_path / "logits.pt"))
    torch.multiprocessing.spawn(_sharded_logits, args=args, nprocs=1)
    ids, canvas_ids = _inputs(model.config)
    with torch.no_grad():
        want = model(input_ids=ids, decoder_input_ids=canvas_ids).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), want, rtol=1e-5, atol=1e-5)


def test_adapters_run_on_the_routed_rows_as_peft_computes_them_and_merge_into_both_sides():
    config = tiny_config(experts=16, k=4)
    model = random_model(config)
    install_routing(model, POLICIES[1])
    add_expert_lora(model, ExpertLora(rank=4))
    decoder, encoder = model.model.decoder.layers, model.model.encoder.language_model.layers
    assert all(d.experts is e.experts for d, e in zip(decoder, encoder, strict=True))
    assert all(isinstance(d.experts, RoutedRowsLora) for d in decoder)
    with torch.no_grad():  # B != 0: the adapters change the model
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.normal_(0, 0.1)
    ids, canvas_ids = _inputs(config)
    with torch.no_grad():
        ours = model(input_ids=ids, decoder_input_ids=canvas_ids).logits
        for layer in decoder:  # peft's own forward: the dense delta added to every expert
            layer.experts.__class__ = ParamWrapper
        peft = model(input_ids=ids, decoder_input_ids=canvas_ids).logits
        merge_expert_lora(model)
        merged = model(input_ids=ids, decoder_input_ids=canvas_ids).logits
    assert ((ours - peft).abs().max() / peft.abs().max()).item() <= 1e-5
    assert ((merged - peft).abs().max() / peft.abs().max()).item() <= 1e-5
    assert not any(".lora_" in n for n in model.state_dict())


def test_adapters_refuse_half_of_a_stacked_projection():
    model = random_model(tiny_config())
    with pytest.raises(SettingError, match=r"targets=\['gate_proj'\].*gate_up_proj"):
        add_expert_lora(model, ExpertLora(targets=("gate_proj",)))
