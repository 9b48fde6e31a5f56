"""Decoding a split with DiffusionGemma: transformers' own `generate` (the entropy-bound sampler,
the temperature schedule, its stopping criteria, canvases in sequence) under the model's routing,
every decoder forward's routing recorded: unique experts per block of the canvas and per canvas
(per denoising forward, mean over MoE layers), forwards per canvas, tokens committed per
forward, expert bytes per generated token, exact match."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor
from transformers import DiffusionGemmaForBlockDiffusion
from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
    EntropyBoundSamplerConfig,
)

from dmoe_train.data.module import DiffusionDataModule
from dmoe_train.evaluation.split_decoding import answer_correct, by_skill
from dmoe_train.models.families.diffusion_gemma import canvas_batch
from dmoe_train.objectives.expert_metrics import unique_experts_per_block
from dmoe_train.settings import refuse


@dataclass(frozen=True)
class CanvasDecoding:
    """DiffusionGemma's decoding (`configs/generation/tiny_gemma.yaml`): at most `steps`
    denoising forwards per canvas, the entropy bound, the temperature from `t_max` to `t_min`,
    the stopping criteria's thresholds, `max_new_tokens` (None: one canvas), the first
    `max_samples` prompts; `block_length`: the canvas block the measures count in."""

    block_length: int
    steps: int
    entropy_bound: float
    t_max: float
    t_min: float
    stability_threshold: int
    confidence_threshold: float
    max_new_tokens: int | None
    max_samples: int

    def __post_init__(self) -> None:
        for key in ("block_length", "steps", "max_samples"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise refuse(key, getattr(self, key), "must be an integer >= 1")
        if not self.entropy_bound > 0:
            raise refuse("entropy_bound", self.entropy_bound, "must be > 0")

    def generate_kwargs(self, canvas_length: int) -> dict:
        return dict(
            max_new_tokens=self.max_new_tokens or canvas_length,
            max_denoising_steps=self.steps,
            sampler_config=EntropyBoundSamplerConfig(entropy_bound=self.entropy_bound),
            t_max=self.t_max,
            t_min=self.t_min,
            stability_threshold=self.stability_threshold,
            confidence_threshold=self.confidence_threshold,
        )


@dataclass
class CanvasGeneration:
    """What `generate_canvases` decoded: the new tokens `[B, N]`, per decoder forward and MoE
    layer the unique experts per block (mean over the canvas's blocks) and per canvas `[B]`,
    the decoder forwards and each forward's tokens committed."""

    tokens: Tensor
    per_block: list[Tensor]
    per_canvas: list[Tensor]
    forwards: int
    tokens_per_forward: list[float]


@torch.no_grad()
def generate_canvases(
    model: DiffusionGemmaForBlockDiffusion,
    prompts: Tensor,
    keep: Tensor,
    settings: CanvasDecoding,
    max_new_tokens: int | None = None,
) -> CanvasGeneration:
    """`model.generate` on left-padded `prompts` (`keep` marks the real tokens), every decoder
    forward's experts counted; `max_new_tokens` overrides the settings' (None: theirs)."""
    text, canvas = model.config.text_config, model.config.canvas_length
    kwargs = settings.generate_kwargs(canvas)
    if max_new_tokens is not None:
        kwargs["max_new_tokens"] = max_new_tokens
    with model.canvas_routing.recording() as records:
        out = model.generate(input_ids=prompts, attention_mask=keep.long(), **kwargs)
    decoder = [r for side, r in records if side == "decoder"]
    return CanvasGeneration(
        tokens=out.sequences[:, prompts.shape[1] :],
        per_block=[
            unique_experts_per_block(r.ids, settings.block_length).float().mean(1) for r in decoder
        ],
        per_canvas=[unique_experts_per_block(r.ids, r.ids.shape[1]).float()[:, 0] for r in decoder],
        forwards=len(decoder) // text.num_hidden_layers,
        tokens_per_forward=[float(x) for x in out.tokens_per_forward],
    )


@torch.no_grad()
def decode_canvas_split(
    model: DiffusionGemmaForBlockDiffusion,
    data: DiffusionDataModule,
    settings: CanvasDecoding,
    split: str,
    seed: int = 0,
) -> dict:
    """Decode `split`'s prompts with `model.generate` (seeded: the sampler draws), counting the
    experts of every decoder forward. A batch decodes on until its slowest canvas is done: its
    forwards count for every canvas of the batch, as LLaDA's `forwards_per_block` counts them."""
    loader = data.test_dataloader() if split == "test" else data.val_dataloader()
    text, canvas = model.config.text_config, model.config.canvas_length
    expert_bytes = 3 * text.hidden_size * text.moe_intermediate_size
    expert_bytes *= next(model.parameters()).element_size()
    correct, skills, tokens_per_forward = [], [], []
    per_block, per_canvas = [], []  # [B] per decoder forward and layer
    forwards = canvases = tokens = 0
    loaded = 0.0  # unique experts per canvas, summed over each sample's forwards (mean of layers)
    began = time.perf_counter()
    torch.manual_seed(seed)
    for batch in loader:
        room = settings.max_samples - len(correct)
        if room <= 0:
            break
        batch = {k: v[:room] for k, v in batch.items()}
        cb = canvas_batch(batch, canvas, text.pad_token_id)
        gen = generate_canvases(model, cb.prompts, cb.keep, settings)
        forwards += gen.forwards
        canvases += -(-gen.tokens.shape[1] // canvas)
        tokens += gen.tokens.numel()
        tokens_per_forward += gen.tokens_per_forward
        per_block += gen.per_block
        per_canvas += gen.per_canvas
        loaded += float(sum(c.sum() for c in gen.per_canvas)) / text.num_hidden_layers
        texts = data.tokenizer.batch_decode(gen.tokens, skip_special_tokens=True)
        correct += [answer_correct(t, a) for t, a in zip(texts, batch["answer"], strict=True)]
        skills += batch.get("skill", [])
    return {
        "policy": model.canvas_routing.policy.to_dict(),
        "samples": len(correct),
        "accuracy": sum(correct) / max(len(correct), 1),
        "correct": [int(c) for c in correct],
        **({"accuracy_by_skill": by_skill(skills, correct)} if skills else {}),
        "unique_experts_per_block": float(torch.cat(per_block).mean()),
        "unique_experts_per_canvas": float(torch.cat(per_canvas).mean()),
        "forwards_per_canvas": forwards / max(canvases, 1),
        "tokens_per_forward": sum(tokens_per_forward) / max(len(tokens_per_forward), 1),
        # per MoE layer, what a decode pays with no cache: every forward loads its canvas's
        # unique experts
        "expert_bytes_per_generated_token": loaded * expert_bytes / max(tokens, 1),
        "seconds": time.perf_counter() - began,
        "settings": asdict(settings),
    }
