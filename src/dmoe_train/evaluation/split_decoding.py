"""Quality measures of a model on a DataModule's splits."""

from __future__ import annotations

import logging
import re
import statistics
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import Tensor

from dmoe_train.data.module import DiffusionDataModule
from dmoe_train.data.skills import final_answer
from dmoe_train.evaluation.sampler import BlockDecode, decode_blocks
from dmoe_train.memory import peak_memory_bytes, resident_bytes
from dmoe_train.models.adapted_weights import changes_routed_experts, read_manifest
from dmoe_train.models.block_diffusion import noised_forward
from dmoe_train.models.expert_cache import CacheStats, offload_experts, resident_caches
from dmoe_train.models.moe import SparseMoe
from dmoe_train.objectives.expert_metrics import load_balance_cv
from dmoe_train.objectives.masked_diffusion import masked_diffusion_loss
from dmoe_train.settings import preset, refuse, settings_of

log = logging.getLogger(__name__)
ExpertStore = Literal["memory", "disk"]
# the fewest decoded samples whose exact match is worth a comparison (docs/evaluation.md)
MIN_SAMPLES = 30


def content_positions(x0: torch.Tensor, response_mask: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Response positions up to and including the first eos: the answer, not its padding."""
    eos = (x0 == eos_id) & response_mask
    return response_mask & (eos.long().cumsum(1) - eos.long() == 0)


@torch.no_grad()
def masked_token_metrics(
    model: torch.nn.Module,
    data: DiffusionDataModule,
    block_size: int,
    t_low: float = 0.3,
    t_high: float = 0.8,
    seed: int = 0,
) -> dict[str, float]:
    """On the validation split, noised by a seeded generator (the same noise for every model):
    `loss`, the masked-diffusion cross-entropy per masked token, and `accuracy`, the argmax
    accuracy on masked answer tokens (up to the first eos), t ~ U[t_low, t_high]."""
    cfg = model.config
    gen = torch.Generator().manual_seed(seed)
    loss_sum = correct = total = masked = 0.0
    for batch in data.val_dataloader():
        x0 = batch["input_ids"]
        out = noised_forward(
            model, x0, batch["response_mask"], cfg.mask_token_id, t_low, t_high,
            "block_diffusion", block_size, torch.rand(x0.shape[0], 1 + x0.shape[1], generator=gen),
        )  # fmt: skip
        count = out.masked.sum()
        loss_sum += float(masked_diffusion_loss(out.logits, x0, out.masked, out.t, "none") * count)
        masked += int(count)
        scored = out.masked & content_positions(x0, batch["response_mask"], cfg.eos_token_id)
        correct += int((out.logits.argmax(-1) == x0)[scored].sum())
        total += int(scored.sum())
    return {"loss": loss_sum / max(masked, 1), "accuracy": correct / max(total, 1)}


def answer_correct(generated: str, reference: str) -> bool:
    """GSM8K style (reference has `#### n`): the last number generated equals n; else exact."""
    if "####" in reference:
        want = reference.split("####")[-1].strip().replace(",", "")
        numbers = re.findall(r"-?\d[\d,]*(?:\.\d+)?", generated)
        return bool(numbers) and numbers[-1].replace(",", "").rstrip(".") == want
    return generated.strip() == reference.strip()


@dataclass(frozen=True)
class GenerationSettings:
    """How a split is decoded: blocks of `block_length` masks, at most `steps` forwards per block,
    up to `gen_length` new tokens (None: up to the data's `max_seq_len`), parallel commits above
    confidence `threshold` (None: `steps` even commits), the exact prefix `cache`, the first
    `max_samples` prompts; `expert_cache` routed experts resident per MoE layer
    (`models.expert_cache`, or `all`), the rest waiting in `expert_store` (host `memory`, or the
    model directory's safetensors on `disk`). The values live in `configs/generation/`
    (`GenerationSettings.preset`)."""

    block_length: int
    steps: int
    gen_length: int | None
    threshold: float | None
    cache: bool
    max_samples: int
    expert_cache: int | str
    expert_store: ExpertStore

    def __post_init__(self) -> None:
        if self.expert_cache != "all" and (
            isinstance(self.expert_cache, bool)
            or not isinstance(self.expert_cache, int)
            or self.expert_cache < 1
        ):
            raise refuse("expert_cache", repr(self.expert_cache), "an expert count >= 1 or 'all'")
        if self.expert_store not in get_args(ExpertStore):
            raise refuse("expert_store", repr(self.expert_store), "memory or disk")

    @classmethod
    def preset(cls, name: str, **overrides: object) -> GenerationSettings:
        """The preset `configs/generation/<name>.yaml` with `overrides`."""
        with settings_of("generation"):
            return cls(**{**preset("generation", name), **overrides})


def check_expert_store(settings: GenerationSettings, router_file: str | Path | None) -> None:
    """The disk store reads the model directory's routed experts: refused, before the checkpoint
    loads, when adapted weights changed them (`router+experts`, adapters)."""
    if router_file is None or experts_in_files(settings) is None:
        return
    if changes_routed_experts(read_manifest(router_file)):
        raise ValueError(
            f"generation.expert_store=disk reads the base's routed experts from its files, but "
            f"router_checkpoint={router_file} changed them (routed-expert weights or adapters): "
            "use generation.expert_store=memory, or dmoe-export it and evaluate the export"
        )


def apply_expert_cache(model: torch.nn.Module, settings: GenerationSettings) -> None:
    """Keep only `settings.expert_cache` routed experts per layer resident (none: all are)."""
    if settings.expert_cache == "all":
        return
    if resident_caches(model):  # loaded with its experts left in the files
        return
    path = model.name_or_path
    offload_experts(model, settings.expert_cache, settings.expert_store, path and Path(path))


def experts_in_files(settings: GenerationSettings) -> int | None:
    """The `load_model(expert_cache=...)` of these settings: with the disk store the routed
    experts are never loaded whole (a base larger than memory loads), else None."""
    if settings.expert_cache == "all" or settings.expert_store != "disk":
        return None
    return settings.expert_cache


class MoeTimer:
    """Wall time spent inside MoE layers (forward hooks; synchronises CUDA around them)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.seconds, self.calls, self._start = 0.0, 0, 0.0
        self.handles = []
        for module in model.modules():
            if isinstance(module, SparseMoe):
                self.handles.append(module.register_forward_pre_hook(self._begin))
                self.handles.append(module.register_forward_hook(self._end))

    def _sync(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def _begin(self, *_: object) -> None:
        self._sync()
        self._start = time.perf_counter()

    def _end(self, *_: object) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._start
        self.calls += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def batch_prompts(batch: dict) -> list[list[int]]:
    """The prompt token ids of a data-module batch."""
    pairs = zip(batch["input_ids"], batch["prompt_len"], strict=True)
    return [ids[:n].tolist() for ids, n in pairs]


def decode_prompts(
    model: torch.nn.Module, prompts: list[list[int]], gen_length: int, settings: GenerationSettings
) -> BlockDecode:
    """`decode_blocks` under `settings`, with the model's mask and eos tokens."""
    cfg = model.config
    return decode_blocks(
        model, prompts, gen_length, settings.block_length, settings.steps,
        cfg.mask_token_id, cfg.eos_token_id, settings.threshold, settings.cache,
    )  # fmt: skip


@dataclass
class _Tally:
    """What the decoded batches of a split add up to."""

    unique: list[Tensor] = field(default_factory=list)  # [B, layers] per batch
    unique_masked: list[Tensor] = field(default_factory=list)
    correct: list[bool] = field(default_factory=list)  # per sample, in test order
    skills: list[str] = field(default_factory=list)
    final: list[bool] = field(default_factory=list)  # skills: the answer's last field right
    samples: int = 0
    tokens_out: int = 0
    seconds: float = 0.0
    load: Tensor | int = 0  # [layers, E]
    routed: int = 0
    forwards: int = 0  # denoising forwards of the decoded batches
    # unique experts per MoE layer (mean over layers), summed over every sample's own forwards
    experts_over_forwards: float = 0.0
    blocks: int = 0

    def add(
        self, out: BlockDecode, correct: list[bool], skills: list[str], gen_length: int
    ) -> None:
        self.unique.append(out.per_sample(out.unique_experts))  # mean over its forwards
        self.unique_masked.append(out.per_sample(out.unique_experts_masked))
        self.correct += correct
        self.skills += skills
        self.samples += out.tokens.shape[0]
        self.tokens_out += out.tokens.shape[0] * gen_length
        self.seconds += out.seconds
        self.load, self.routed = self.load + out.expert_load, self.routed + out.tokens_routed
        self.forwards, self.blocks = self.forwards + out.counted.shape[0], self.blocks + out.blocks
        per_forward = out.unique_experts.float().mean(-1)  # [forwards, B]
        self.experts_over_forwards += float((per_forward * out.counted).sum())


@torch.no_grad()
def decode_split(
    model: torch.nn.Module, data: DiffusionDataModule, settings: GenerationSettings, split: str
) -> dict:
    """Decode a split and measure experts per block, accuracy, expert bytes and latency."""
    loader = data.test_dataloader() if split == "test" else data.val_dataloader()
    tally, timer = _Tally(), MoeTimer(model)
    for cache in resident_caches(model):  # this decode's own loads and hits
        cache.stats = CacheStats()
    for batch in loader:
        prompts = batch_prompts(batch)[: settings.max_samples - tally.samples]
        if not prompts:
            break
        gen_length = settings.gen_length or data.max_seq_len - min(len(p) for p in prompts)
        out = decode_prompts(model, prompts, gen_length, settings)
        texts = data.tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
        answers = list(zip(texts, batch["answer"], strict=False))
        correct = [answer_correct(t, a) for t, a in answers]
        tally.add(out, correct, batch.get("skill", [])[: len(prompts)], gen_length)
        if "skill" in batch:
            tally.final += [final_answer(t.strip()) == final_answer(a.strip()) for t, a in answers]
    timer.remove()
    return _metrics(model, settings, tally, timer)


def warn_if_few(data: DiffusionDataModule, split: str, settings: GenerationSettings) -> None:
    """Exact match over fewer than `MIN_SAMPLES` decoded samples moves by whole points per
    sample: said once, with the count, before the decode."""
    n = min(len(data.splits[split]), settings.max_samples)
    if n < MIN_SAMPLES:
        log.warning(
            "exact match on %d samples of the %s split (fewer than %d): one sample moves it by "
            "%.0f points, too coarse to compare routings; give more (data.test_fraction, "
            "data.test_source, generation.max_samples)",
            n, split, MIN_SAMPLES, 100 / max(n, 1),
        )  # fmt: skip


def first_prompts(
    data: DiffusionDataModule, split: str, n: int, settings: GenerationSettings
) -> tuple[list[list[int]], int]:
    """The first `n` prompts of a split and the generation length `decode_split` gives
    them (a fixed workload for timing)."""
    loader = data.test_dataloader() if split == "test" else data.val_dataloader()
    prompts = []
    for batch in loader:
        prompts += batch_prompts(batch)[: n - len(prompts)]
        if len(prompts) == n:
            break
    return prompts, settings.gen_length or data.max_seq_len - min(len(p) for p in prompts)


def time_decode(
    model: torch.nn.Module, prompts: list[list[int]], gen_length: int, settings: GenerationSettings
) -> float:
    """Wall seconds of one greedy decode of `prompts` (CUDA synchronised)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    began = time.perf_counter()
    decode_prompts(model, prompts, gen_length, settings)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - began


def interleaved_latency(
    runs: dict[str, tuple[torch.nn.Module, GenerationSettings]],
    reference: str,
    prompts: list[list[int]],
    gen_length: int,
    rounds: int,
) -> dict[str, dict[str, float]]:
    """Decode latency of every run on the same prompts, taken in rounds: each round times one
    decode under every run in turn (after a warm-up round). A run's latency is its median over
    rounds; its ratio to `reference` is the median of the per-round ratios, so drifts in the
    machine's speed between rounds cancel."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    for r in range(rounds + 1):
        for name, (model, settings) in runs.items():
            seconds = time_decode(model, prompts, gen_length, settings)
            if r:  # round 0 warms up
                times[name].append(seconds)
    tokens = len(prompts) * gen_length
    ref = times[reference]
    return {
        name: {
            "latency_ms_per_token": statistics.median(t) / tokens * 1e3,
            "latency_vs_" + reference: statistics.median(
                a / b for a, b in zip(t, ref, strict=True)
            ),
        }
        for name, t in times.items()
    }


def by_skill(skills: list[str], hits: list[bool]) -> dict[str, float]:
    """The share of `hits` per skill (`skills[i]` is sample i's), skills in name order."""
    per_skill: dict[str, list[bool]] = {}
    for skill, ok in zip(skills, hits, strict=True):
        per_skill.setdefault(skill, []).append(ok)
    return {skill: sum(h) / len(h) for skill, h in sorted(per_skill.items())}


@dataclass(frozen=True)
class CacheMeasures:
    """Under `generation.expert_cache`: expert bytes loaded (all MoE layers) per decoded block
    and per generated token, loads per block and layer, the share of expert uses served from
    the cache within a block's denoising forwards and across blocks, the peak resident bytes."""

    expert_cache: int
    expert_bytes_loaded_per_block: float
    expert_bytes_loaded_per_token: float
    expert_loads_per_block_per_layer: float
    cache_hits_within_block: float
    cache_hits_across_blocks: float
    peak_resident_expert_bytes: int


@dataclass(frozen=True)
class MemoryMeasures:
    """The process's peak memory (RSS; the CUDA allocator's peak on a GPU), and the expert
    cache's measures when one is on."""

    peak_rss_bytes: int
    cuda_peak_bytes: int | None = None
    cache: CacheMeasures | None = None

    def to_dict(self) -> dict:
        out = {"peak_rss_bytes": self.peak_rss_bytes}
        if self.cuda_peak_bytes is not None:
            out["cuda_peak_bytes"] = self.cuda_peak_bytes
        return out | (asdict(self.cache) if self.cache else {})


@dataclass(frozen=True)
class DecodeMetrics:
    """What decoding a split measured (`metrics.json` is `to_dict()`): exact match (per sample,
    per skill; on the skills tasks the final answer's too), unique experts per block (mean over
    MoE layers, forwards and samples; per layer; masked positions only), expert bytes per block
    and per generated token, load balance, experts and expert FLOPs per token, speed, memory,
    and what was decoded how."""

    policy: dict
    samples: int
    accuracy: float
    correct: list[int]  # per sample: intervals, paired comparisons
    accuracy_by_skill: dict[str, float] | None
    # the skills tasks: whether the answer's last field (its result) is right, as benchmarks
    # that score a final answer after a chain count
    final_answer_correct: list[int] | None
    final_answer_by_skill: dict[str, float] | None
    unique_experts_per_block: float
    unique_experts_per_block_per_layer: list[float]
    unique_experts_per_block_masked: float
    expert_bytes_per_block: float
    # what a user pays per MoE layer without a cache: every forward loads its block's unique
    # experts, and a block takes several forwards for its tokens
    expert_bytes_per_generated_token: float
    load_balance_cv: float  # of the decoded blocks, per MoE layer: 0 = balanced
    experts_per_token: float
    expert_flops_per_token: float  # per MoE layer
    # the accuracy pass's own wall time, first calls included (latency_*: timed properly)
    seconds_per_token: float
    seconds_per_moe_layer: float
    forwards_per_block: float
    tokens_per_second: float
    memory: MemoryMeasures
    device: str
    dtype: str
    settings: dict

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "memory":
                out |= value.to_dict()
            elif value is not None:
                out[f.name] = value
        return out


def _metrics(
    model: torch.nn.Module, settings: GenerationSettings, tally: _Tally, timer: MoeTimer
) -> DecodeMetrics:
    cfg = model.config
    per_layer = torch.cat(tally.unique).mean(0)
    param = next(model.parameters())
    expert_params = 3 * cfg.hidden_size * cfg.moe.expert_width
    expert_bytes = expert_params * param.element_size()
    load, routed = tally.load, tally.routed
    decoded = routed > 0  # else no forward ran: nothing to count
    experts_per_token = float(load.sum()) / routed / load.shape[0] if decoded else float("nan")
    return DecodeMetrics(
        policy=cfg.routing.to_dict(),
        samples=tally.samples,
        accuracy=sum(tally.correct) / max(tally.samples, 1),
        correct=[int(c) for c in tally.correct],
        accuracy_by_skill=by_skill(tally.skills, tally.correct) if tally.skills else None,
        final_answer_correct=[int(c) for c in tally.final] if tally.final else None,
        final_answer_by_skill=by_skill(tally.skills, tally.final) if tally.final else None,
        unique_experts_per_block=float(per_layer.mean()),
        unique_experts_per_block_per_layer=per_layer.tolist(),
        unique_experts_per_block_masked=float(torch.cat(tally.unique_masked).mean()),
        expert_bytes_per_block=float(per_layer.mean()) * expert_bytes,
        expert_bytes_per_generated_token=tally.experts_over_forwards
        * expert_bytes
        / max(tally.tokens_out, 1),
        load_balance_cv=float(load_balance_cv(load).mean()) if decoded else float("nan"),
        experts_per_token=experts_per_token,
        expert_flops_per_token=experts_per_token * 2 * expert_params,
        seconds_per_token=tally.seconds / max(tally.tokens_out, 1),
        seconds_per_moe_layer=timer.seconds / max(timer.calls, 1),
        forwards_per_block=tally.forwards / max(tally.blocks, 1),
        tokens_per_second=tally.tokens_out / max(tally.seconds, 1e-9),
        memory=cache_metrics(model, tally.blocks, tally.tokens_out),
        device=str(param.device),
        dtype=str(param.dtype).removeprefix("torch."),
        settings=asdict(settings),
    )


def cache_metrics(model: torch.nn.Module, blocks: int, tokens: int) -> MemoryMeasures:
    """The process's peak memory and, under `generation.expert_cache`, the caches' measures
    over `blocks` decoded blocks and `tokens` generated tokens."""
    device = next(model.parameters()).device
    peak_rss = resident_bytes("VmHWM")
    cuda_peak = peak_memory_bytes(device) if device.type == "cuda" else None
    caches = resident_caches(model)
    if not caches:
        return MemoryMeasures(peak_rss, cuda_peak)
    stats = [c.stats for c in caches]
    loaded = sum(s.bytes_loaded for s in stats)
    uses = sum(s.loads + s.hits_within_block + s.hits_across_blocks for s in stats)
    cache = CacheMeasures(
        expert_cache=caches[0].capacity,
        expert_bytes_loaded_per_block=loaded / max(blocks, 1),
        expert_bytes_loaded_per_token=loaded / max(tokens, 1),
        expert_loads_per_block_per_layer=sum(s.loads for s in stats) / max(blocks, 1) / len(stats),
        cache_hits_within_block=sum(s.hits_within_block for s in stats) / max(uses, 1),
        cache_hits_across_blocks=sum(s.hits_across_blocks for s in stats) / max(uses, 1),
        peak_resident_expert_bytes=sum(c.stats.peak_resident * c.expert_bytes for c in caches),
    )
    return MemoryMeasures(peak_rss, cuda_peak, cache)
