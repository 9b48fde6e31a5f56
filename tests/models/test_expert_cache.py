"""Experts off the device (`generation.expert_cache`): the cache's bookkeeping by hand, and
decodes with at most C experts resident per layer equal to the all-resident decode."""

import pytest
import torch
from helpers import CONFIGS, TINY_BASE, compose_train, steps
from hydra import compose, initialize_config_dir
from safetensors.torch import save_file

from dmoe_train.cli.train import train
from dmoe_train.evaluation.run import run_eval
from dmoe_train.evaluation.sampler import decode_blocks
from dmoe_train.models import load_model, model_dir
from dmoe_train.models.expert_cache import (
    MemoryStore,
    ResidentExperts,
    SafetensorsFile,
    offload_experts,
    resident_caches,
)
from dmoe_train.routing import RULES, RoutingPolicy
from dmoe_train.studies import expert_cache_bench


def _store(experts: int) -> MemoryStore:
    """Expert e's weights are all e: what a slot holds says which expert it is."""
    full = torch.arange(experts, dtype=torch.float32)[:, None, None]
    return MemoryStore(
        (full.expand(experts, 3, 2), full.expand(experts, 3, 2), full.expand(-1, 2, 3))
    )


def test_the_least_recently_used_expert_leaves_first_and_hits_are_counted_by_block():
    cache = ResidentExperts(_store(5), 5, capacity=2, like=torch.zeros(1))
    cache.make_resident([0, 1])  # two loads
    cache.make_resident([1])  # used again in the same block: 0 is now the least recent
    cache.begin_block(1)
    cache.make_resident([2])  # evicts 0
    cache.make_resident([1])  # last used in block 0: a hit across blocks
    s = cache.stats
    assert (s.loads, s.hits_within_block, s.hits_across_blocks) == (3, 1, 1)
    assert set(cache.slot_of) == {1, 2} and s.peak_resident == 2
    for e, slot in cache.slot_of.items():
        assert all((b[slot] == e).all() for b in cache.buffers)
    assert s.bytes_loaded == 3 * cache.expert_bytes == 3 * 3 * 6 * 4


def test_a_request_keeps_its_own_experts_resident():
    cache = ResidentExperts(_store(5), 5, capacity=3, like=torch.zeros(1))
    cache.make_resident([0, 1, 2])
    cache.make_resident([3, 0])  # 0 is least recent but wanted: 1 goes
    assert set(cache.slot_of) == {0, 2, 3}


POLICIES = {
    "token": RoutingPolicy("token", block_size=8),
    "topp": RoutingPolicy("topp", block_size=8, top_p=0.6, min_experts=4),
    "dmoe": RoutingPolicy("topp", block_size=8, top_p=0.6, min_experts=4, **RULES["dmoe"]),
    "llada22": RoutingPolicy("capacity_max", block_size=8, capacity=8, **RULES["llada22"]),
}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 9, 8], [20, 21, 22, 23, 24, 25, 26, 27, 28]]


def _decode(model):
    cfg = model.config
    return decode_blocks(model, PROMPTS, 16, 8, 8, cfg.mask_token_id, cfg.eos_token_id, None, True)


@pytest.mark.parametrize(
    ("policy", "capacity", "store"),
    [(p, c, s) for p in POLICIES for c, s in ((3, "memory"), (8, "disk"), (32, "memory"))],
)
def test_decoding_with_few_experts_resident_gives_the_same_tokens(policy, capacity, store):
    reference = _decode(load_model(TINY_BASE, routing=POLICIES[policy]))
    model = load_model(TINY_BASE, routing=POLICIES[policy])
    offload_experts(model, capacity, store, TINY_BASE)
    cached = _decode(model)
    assert torch.equal(cached.tokens, reference.tokens)
    assert torch.equal(cached.unique_experts, reference.unique_experts)
    caches = resident_caches(model)
    assert len(caches) == 3 and all(c.stats.peak_resident <= capacity for c in caches)
    assert all(c.stats.loads >= 1 for c in caches)
    # the experts' own parameters are gone: only the caches hold expert weights
    assert all(layer.mlp.experts.gate_proj.numel() == 0 for layer in model.model.layers[1:])


def test_a_model_loads_with_its_experts_left_in_the_files(monkeypatch):
    read, real = [], model_dir.iter_tensors

    def recording(path, device, keep=lambda name: True):
        for name, tensor in real(path, device, keep):
            read.append(name)
            yield name, tensor

    monkeypatch.setattr(model_dir, "iter_tensors", recording)
    model = load_model(TINY_BASE, routing=POLICIES["topp"], expert_cache=8)
    assert read and not any(model_dir.is_routed_expert(n) for n in read)
    reference = load_model(TINY_BASE, routing=POLICIES["topp"])
    assert torch.equal(_decode(model).tokens, _decode(reference).tokens)


def test_the_disk_reader_gives_a_tensor_or_one_row_of_it_as_safetensors_stored_it(tmp_path):
    stacked = torch.randn(5, 3, 4).to(torch.bfloat16)
    save_file({"stacked": stacked, "ids": torch.arange(7)}, tmp_path / "w.safetensors")
    f = SafetensorsFile(tmp_path / "w.safetensors")
    assert sorted(f.keys()) == ["ids", "stacked"]
    assert torch.equal(f.read("ids"), torch.arange(7))
    for row in range(5):
        assert torch.equal(f.read("stacked", row=row), stacked[row])
    with pytest.raises(IndexError, match="stacked has 5 rows, asked for row 5"):
        f.read("stacked", row=5)
    path = tmp_path / "w.safetensors"
    last = max(f.header, key=lambda n: f.header[n]["data_offsets"][1])
    size = f.header[last]["data_offsets"][1] - f.header[last]["data_offsets"][0]
    path.write_bytes(path.read_bytes()[:-8])  # a truncated file: the last tensor's tail is gone
    with pytest.raises(OSError, match=f"{last}: read {size - 8} of {size} bytes"):
        SafetensorsFile(path).read(last)


def _eval(out, *overrides):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose(
            "eval",
            [f"paths.output_dir={out}", "generation.max_samples=16", "data.train_size=16",
             "data.val_size=16", "reference_token=false", *overrides],
        )  # fmt: skip
    return run_eval(cfg)


def test_a_trained_router_decodes_the_same_with_its_coreset_resident(tmp_path):
    train(compose_train(tmp_path / "run", *steps(10), "router=topp", "router.top_p=0.6"))
    router = f"router_checkpoint={tmp_path / 'run' / 'checkpoints' / 'router.safetensors'}"
    full = _eval(tmp_path / "all", router)
    cached = _eval(tmp_path / "c8", router, "generation.expert_cache=8")
    disk = _eval(
        tmp_path / "d8", router, "generation.expert_cache=8", "generation.expert_store=disk"
    )
    assert cached["correct"] == full["correct"] == disk["correct"]
    assert disk["expert_bytes_loaded_per_block"] == cached["expert_bytes_loaded_per_block"]
    assert cached["unique_experts_per_block"] == full["unique_experts_per_block"]
    assert "expert_bytes_loaded_per_block" not in full and full["peak_rss_bytes"] > 0
    expert_bytes = 3 * 128 * 64 * 4  # the tiny base: hidden 128, expert width 64, in fp32
    assert 0 < cached["peak_resident_expert_bytes"] <= 3 * 8 * expert_bytes
    assert cached["expert_bytes_loaded_per_block"] > 0 and cached["forwards_per_block"] >= 1
    assert 0 <= cached["cache_hits_within_block"] + cached["cache_hits_across_blocks"] <= 1


@pytest.mark.parametrize(
    ("setting", "value"),
    [("expert_cache", 0), ("expert_cache", "some"), ("expert_cache", True), ("expert_store", "s3")],
)
def test_a_bad_cache_setting_is_refused_by_name(tmp_path, monkeypatch, setting, value):
    monkeypatch.setattr("dmoe_train.evaluation.run.instantiate", None)  # before any model load
    with pytest.raises(ValueError, match=f"generation.{setting}={value!r}"):
        _eval(tmp_path, f"generation.{setting}={value}")


def test_the_cache_bench_measures_every_rule_at_a_size(monkeypatch):
    pools = expert_cache_bench.CACHE_POLICIES.items()
    fit = {k: p for k, p in pools if p.name != "capacity_max" or p.capacity <= 32}
    monkeypatch.setattr(expert_cache_bench, "CACHE_POLICIES", fit)  # the tiny base has 32
    rows = expert_cache_bench.cache_case(TINY_BASE, "8", steps=8)
    assert [r["routing"] for r in rows] == list(fit) and len(fit) == 4
    for r in rows:
        assert r["loaded_MB_per_block"] > 0 and 0 <= r["hits_within_block"] <= 1
        assert r["forwards_per_block"] >= 1 and r["peak_GiB"] >= r["loaded_peak_GiB"] > 0
    loaded = [{**r, "expert_cache": "all", "peak_GiB": 2 * r["peak_GiB"]} for r in rows]
    loaded[0]["tokens"] = "other"
    ratio = expert_cache_bench.ratios(rows + loaded)
    assert len(ratio) == len(rows) and all(r["peak_memory_vs_all_loaded"] == 0.5 for r in ratio)
    assert [r["same_tokens"] for r in ratio] == [False] + [True] * (len(rows) - 1)
    versus = expert_cache_bench.against_token(rows, weights_gib=1.0)
    token = rows[0]
    assert [r["routing"] for r in versus] == [r["routing"] for r in rows[1:]]
    for r, v in zip(rows[1:], versus, strict=True):
        assert v["loaded_vs_token"] == round(
            r["loaded_MB_per_block"] / token["loaded_MB_per_block"], 3
        )
        assert v["peak_vs_all_weights"] == round(r["peak_GiB"], 3)
    result = {"layers": 2, "weights_GiB": 1.0, "prompts": 1, "blocks": 2, "steps_per_block": 8}
    md = expert_cache_bench.report(result | {"rows": rows})
    assert "every expert loaded does not fit" in md and "loaded_vs_token" in md
