"""Uniform-state diffusion, DiffusionGemma's published fine-tuning objective: a corruption level
t ~ U(t_low, t_high) per sequence, each supervised canvas position replaced by a uniformly random
vocabulary token with probability t, cross-entropy of the decoder at the replaced positions;
self-conditioning on for a share of the sequences (a first pass without it gives the logits the
second is conditioned on); and the encoder's autoregressive cross-entropy on the prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from dmoe_train.settings import refuse


@dataclass(frozen=True)
class CanvasObjective:
    """What the canvas objective adds to the noise (`masked_diffusion.Noise`: its t range):
    `self_conditioning`, the share of sequences trained with self-conditioning, and
    `encoder_loss_weight`, the prompt's autoregressive cross-entropy's weight."""

    self_conditioning: float = 0.5
    encoder_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.self_conditioning <= 1.0:
            raise refuse("self_conditioning", self.self_conditioning, "must be in [0, 1]")
        if not self.encoder_loss_weight >= 0:
            raise refuse("encoder_loss_weight", self.encoder_loss_weight, "must be >= 0")


def keyed_uniforms(keys: list[int], n: int, device: torch.device | str | None = None) -> Tensor:
    """`[B, 2 + 2n]` uniforms, row i from a generator seeded by `keys[i]` alone: column 0 draws
    t, column 1 the self-conditioning coin, the next n the per-position replacement coins, the
    last n the replacement tokens (scaled to the vocabulary by `corrupt`)."""
    rows = [torch.rand(2 + 2 * n, generator=torch.Generator().manual_seed(k)) for k in keys]
    return torch.stack(rows).to(device)


def corrupt(
    x0: Tensor,
    supervised: Tensor,
    vocab_size: int,
    uniforms: Tensor,
    t_range: tuple[float, float],
    self_conditioning: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Replace each supervised position of `x0` `[B, n]` by a uniformly random token with
    probability t ~ U(`t_range`); a sequence is self-conditioned with probability
    `self_conditioning`. Returns (x_t, corrupted `[B, n]`, t `[B]`, self-conditioned `[B]`). A
    replacement may draw the original token: it counts as corrupted (the model sees noise)."""
    b, n = x0.shape
    if uniforms.shape != (b, 2 + 2 * n):
        raise ValueError(f"uniforms shape {tuple(uniforms.shape)}: need {(b, 2 + 2 * n)}")
    t_low, t_high = t_range
    t = t_low + (t_high - t_low) * uniforms[:, 0]
    conditioned = uniforms[:, 1] < self_conditioning
    corrupted = (uniforms[:, 2 : 2 + n] < t[:, None]) & supervised
    random_ids = (uniforms[:, 2 + n :] * vocab_size).long().clamp_max(vocab_size - 1)
    return torch.where(corrupted, random_ids, x0), corrupted, t, conditioned


def canvas_loss(
    logits: Tensor, x0: Tensor, corrupted: Tensor, count: Tensor | None = None
) -> Tensor:
    """Cross-entropy of the decoder's logits `[B, n, V]` at the corrupted positions, over their
    count (or `count`: the mean count over data-parallel ranks)."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")
    total = (ce * corrupted.float()).sum()
    return total / (corrupted.sum() if count is None else count).clamp_min(1)


def next_token_kept(keep: Tensor) -> Tensor:
    """`[B, P-1]`: positions whose token and next token are both kept (not padding)."""
    return keep[:, 1:] & keep[:, :-1]


def autoregressive_loss(
    logits: Tensor, ids: Tensor, keep: Tensor, count: Tensor | None = None
) -> Tensor:
    """Next-token cross-entropy of the encoder's logits `[B, P, V]` over the prompt `ids`
    `[B, P]`, on the positions whose next token is kept (`keep`: not padding), over their count
    (or `count`: the mean count over data-parallel ranks)."""
    counted = next_token_kept(keep).float()
    ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")
    return (ce * counted).sum() / (counted.sum() if count is None else count).clamp_min(1)
