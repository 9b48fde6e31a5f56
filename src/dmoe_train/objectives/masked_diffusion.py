"""Masked diffusion: per-sequence noise and the loss on masked positions."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor

from dmoe_train.settings import SettingError, refuse

LossWeighting = Literal["none", "inv_t"]


@dataclass(frozen=True)
class Noise:
    """Training noise: one mask ratio t ~ U[t_low, t_high] per sequence; `loss_weighting`
    `none`, or `inv_t` (LLaDA's 1/t ELBO weighting)."""

    t_low: float = 0.3
    t_high: float = 0.8
    loss_weighting: LossWeighting = "none"

    def __post_init__(self) -> None:
        if not 0.0 <= self.t_low <= self.t_high <= 1.0:
            raise SettingError(
                "t_low", f"={self.t_low}, t_high={self.t_high}: need 0 <= t_low <= t_high <= 1"
            )
        if self.loss_weighting not in get_args(LossWeighting):
            raise refuse("loss_weighting", repr(self.loss_weighting),
                         f"must be one of {get_args(LossWeighting)}")  # fmt: skip


def row_uniforms(keys: list[int], n: int, device: torch.device | str | None = None) -> Tensor:
    """`[B, 1 + n]` uniforms for noising, row i from a generator seeded by `keys[i]` alone: a
    sequence draws the same noise whatever batch, rank or world size it lands in."""
    rows = [torch.rand(1 + n, generator=torch.Generator().manual_seed(k)) for k in keys]
    return torch.stack(rows).to(device)


def mask_tokens(
    x0: Tensor, response: Tensor, mask_id: int, t_low: float, t_high: float, uniforms: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """One ratio t ~ U[t_low, t_high] per sequence; each response token is masked with prob. t.
    `uniforms` `[B, 1 + L]` in [0, 1): column 0 draws t, the rest the per-token coin flips.

    Returns (x_t, masked `[B, L]` bool, t `[B]`). Prompt tokens (`response` False) never change.
    """
    if uniforms.shape != (x0.shape[0], 1 + x0.shape[1]):
        raise ValueError(
            f"uniforms shape {tuple(uniforms.shape)}: need {(x0.shape[0], 1 + x0.shape[1])}"
        )
    t = t_low + (t_high - t_low) * uniforms[:, 0]
    masked = (uniforms[:, 1:] < t[:, None]) & response
    return x0.masked_fill(masked, mask_id), masked, t


def masked_diffusion_loss(
    logits: Tensor,
    x0: Tensor,
    masked: Tensor,
    t: Tensor,
    weighting: LossWeighting,
    count: Tensor | None = None,
) -> Tensor:
    """Cross-entropy on masked positions (no shift), normalised by their count (or `count`,
    e.g. the mean count over data-parallel ranks); `inv_t` weights each sequence's tokens by 1/t
    (LLaDA's ELBO weighting)."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")
    weight = masked.float()
    if weighting == "inv_t":
        weight = weight / t[:, None]
    elif weighting != "none":
        raise ValueError(f"loss weighting={weighting!r}: must be 'none' or 'inv_t'")
    return (ce * weight).sum() / (masked.sum() if count is None else count).clamp_min(1)
