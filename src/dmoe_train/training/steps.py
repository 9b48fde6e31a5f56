"""What one training step computes, by family: a noised forward of clean tokens (the same noise
for the trained model and the distillation teacher) and its loss terms. Our LMs: masked diffusion
in the block-diffusion layout (`objectives.masked_diffusion`); DiffusionGemma: uniform-state
diffusion of the answer's canvas under its prompt, with self-conditioning and the encoder's
autoregressive loss (`objectives.uniform_diffusion`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from torch import Tensor, nn

from dmoe_train.models.block_diffusion import noised_forward
from dmoe_train.models.families.diffusion_gemma import canvas_batch, canvas_forward
from dmoe_train.models.routing_control import is_canvas_model, policy_of
from dmoe_train.objectives.masked_diffusion import masked_diffusion_loss, row_uniforms
from dmoe_train.objectives.uniform_diffusion import (
    autoregressive_loss,
    canvas_loss,
    corrupt,
    keyed_uniforms,
    next_token_kept,
)
from dmoe_train.routing import Routing
from dmoe_train.training.settings import FineTuneSettings


@dataclass
class Forward:
    """A noised forward: the logits, the positions its diffusion loss counts (`masked`), each
    MoE layer's routing, and what its losses need beside them."""

    logits: Tensor
    masked: Tensor
    routing: list[Routing]
    extra: dict[str, Tensor]


class Step(Protocol):
    """One batch under one noise: `x0`, its clean tokens; `forward(call, x0)`, the noised
    forward of `x0` by `call` (the model, or the teacher's `functional_call`); `losses(out,
    count)`, the named loss terms (`lm_loss` the diffusion loss) of a forward, each sum over the
    positions it scores divided by `count(positions)` (their count averaged over ranks)."""

    x0: Tensor
    mask_id: int | None

    def forward(self, call: Callable[..., Any], x0: Tensor) -> Forward: ...

    def losses(self, out: Forward, count: Callable[[Tensor], Tensor]) -> dict[str, Tensor]: ...


class MaskedDiffusionStep:
    """Our LMs: each response token masked with probability t, [x_t ; x_0] under the
    block-diffusion mask, cross-entropy at the masked positions."""

    def __init__(
        self, model: nn.Module, batch: dict, keys: list[int], settings: FineTuneSettings
    ) -> None:
        self.x0, self.settings = batch["input_ids"], settings
        self.mask_id = model.config.mask_token_id
        noise = settings.noise
        self.noised = partial(
            noised_forward,
            response_mask=batch["response_mask"],
            mask_id=self.mask_id,
            t_low=noise.t_low,
            t_high=noise.t_high,
            mode=settings.step.attention,
            block_size=policy_of(model).block_size,
            uniforms=row_uniforms(keys, self.x0.shape[1], self.x0.device),
        )

    def forward(self, call: Callable[..., Any], x0: Tensor) -> Forward:
        out = self.noised(call, x0=x0)
        return Forward(out.logits, out.masked, out.routing, {"t": out.t})

    def losses(self, out: Forward, count: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        weighting = self.settings.noise.loss_weighting
        lm = masked_diffusion_loss(
            out.logits, self.x0, out.masked, out.extra["t"], weighting, count(out.masked)
        )
        return {"lm_loss": lm}


class CanvasStep:
    """DiffusionGemma: the prompt left-padded into the encoder, the answer's canvas corrupted by
    uniformly random tokens with probability t, cross-entropy at the corrupted positions, plus
    the encoder's autoregressive loss on the prompt (`module.encoder_loss_weight`)."""

    mask_id = None  # uniform-state diffusion has no mask token

    def __init__(
        self, model: nn.Module, batch: dict, keys: list[int], settings: FineTuneSettings
    ) -> None:
        self.model, self.settings = model, settings
        text = model.config.text_config
        # prompts padded to the sequence length: the same width on every rank and batch
        width = batch["input_ids"].shape[1]
        self.batch = canvas_batch(batch, model.config.canvas_length, text.pad_token_id, width)
        self.x0, self.vocab = self.batch.canvas, text.vocab_size
        self.uniforms = keyed_uniforms(keys, self.x0.shape[1], self.x0.device)

    def forward(self, call: Callable[..., Any], x0: Tensor) -> Forward:
        noise, canvas = self.settings.noise, self.settings.canvas
        x_t, corrupted, t, conditioned = corrupt(
            x0, self.batch.supervised, self.vocab, self.uniforms, (noise.t_low, noise.t_high),
            canvas.self_conditioning,
        )  # fmt: skip
        out = canvas_forward(self.model, self.batch, x_t, conditioned, call)
        return Forward(out.logits, corrupted, out.routing, {"encoder_logits": out.encoder_logits})

    def losses(self, out: Forward, count: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        keep = self.batch.keep
        encoder = autoregressive_loss(
            out.extra["encoder_logits"], self.batch.prompts, keep, count(next_token_kept(keep))
        )
        return {
            "lm_loss": canvas_loss(out.logits, self.x0, out.masked, count(out.masked)),
            "encoder_loss": self.settings.canvas.encoder_loss_weight * encoder,
        }


def step_of(model: nn.Module, batch: dict, keys: list[int], settings: FineTuneSettings) -> Step:
    """The family's step for one batch under the noise `keys` draw."""
    kind = CanvasStep if is_canvas_model(model) else MaskedDiffusionStep
    return kind(model, batch, keys, settings)


def block_size_of(model: nn.Module) -> int:
    return policy_of(model).block_size
