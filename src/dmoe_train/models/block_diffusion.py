"""Masked diffusion: noising, the block-diffusion attention mask and the loss.

Block diffusion (how LLaDA2 is trained): the model sees [x_t ; x_0] with position ids repeated.
x_t attends its own block of x_t and strictly earlier blocks of x_0; x_0 attends its own and
earlier blocks of x_0 and never x_t. Logits are read from the x_t half.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

import torch
from torch import Tensor

from dmoe_train.objectives.masked_diffusion import mask_tokens
from dmoe_train.routing import Routing

# block_diffusion_flex: the same mask as flex_attention's BlockMask (no dense [2L, 2L] tensor)
AttentionMode = Literal["block_diffusion", "block_diffusion_flex", "full"]
ATTENTION_MODES = get_args(AttentionMode)


def block_diffusion_mask(n: int, block_size: int, device: torch.device | None = None) -> Tensor:
    """Boolean `[2n, 2n]` (True = attend) over [x_t ; x_0], blocks counted within each half."""
    block = torch.arange(n, device=device) // block_size
    same = block[:, None] == block[None, :]
    earlier = block[:, None] > block[None, :]
    top = torch.cat([same, earlier], dim=1)  # x_t rows: own block of x_t, earlier blocks of x_0
    bottom = torch.cat([torch.zeros_like(same), same | earlier], dim=1)  # x_0 rows
    return torch.cat([top, bottom], dim=0)


def block_diffusion_block_mask(n: int, block_size: int, device: torch.device | None = None):
    """`block_diffusion_mask` as flex_attention's `BlockMask`: per 128 x 128 tile, whether it is
    empty, full or partial (evaluated by the rule below), so O((2n / 128)^2) integers stand in
    for the dense [2n, 2n] mask, and empty tiles are never computed."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b: Tensor, h: Tensor, q: Tensor, kv: Tensor) -> Tensor:
        q_t, kv_t = q < n, kv < n  # which half: x_t or x_0
        q_block, kv_block = (q % n) // block_size, (kv % n) // block_size
        x_t_rows = q_t & ((kv_t & (kv_block == q_block)) | (~kv_t & (kv_block < q_block)))
        return x_t_rows | (~q_t & ~kv_t & (kv_block <= q_block))

    return create_block_mask(mask_mod, None, None, 2 * n, 2 * n, device=device or "cpu")


def as_additive(allowed: Tensor) -> Tensor:
    """Boolean keep-mask `[q, kv]` or `[B, q, kv]` -> additive float `[B or 1, 1, q, kv]`."""
    mask = torch.zeros(allowed.shape, device=allowed.device).masked_fill(~allowed, float("-inf"))
    return mask.unsqueeze(-3) if mask.dim() == 3 else mask[None, None]


def diffusion_inputs(
    xt: Tensor, x0: Tensor, mode: AttentionMode, block_size: int
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Model inputs (input_ids, additive attention mask, position ids) for one attention mode."""
    if mode == "full":
        return xt, None, None
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention={mode!r}: must be one of {ATTENTION_MODES}")
    b, n = xt.shape
    positions = torch.arange(n, device=xt.device).repeat(2).expand(b, 2 * n)
    if mode == "block_diffusion_flex":
        mask = block_diffusion_block_mask(n, block_size, xt.device)
    else:
        mask = as_additive(block_diffusion_mask(n, block_size, xt.device))
    return torch.cat([xt, x0], dim=1), mask, positions


@dataclass
class NoisedForward:
    """One noised forward: x_t-half logits and routing, the masked positions and their ratio."""

    logits: Tensor
    routing: list[Routing]
    masked: Tensor
    t: Tensor


def noised_forward(
    model: torch.nn.Module,
    x0: Tensor,
    response_mask: Tensor,
    mask_id: int,
    t_low: float,
    t_high: float,
    mode: AttentionMode,
    block_size: int,
    uniforms: Tensor,
) -> NoisedForward:
    """Noise `x0` (`mask_tokens`), run the model in `mode` and keep the x_t half of its outputs (in
    `block_diffusion` mode the routing block size must divide the sequence length)."""
    xt, masked, t = mask_tokens(x0, response_mask, mask_id, t_low, t_high, uniforms)
    input_ids, mask, positions = diffusion_inputs(xt, x0, mode, block_size)
    ratio = t[:, None].expand(input_ids.shape)  # the sample's noise level, for every position
    out = model(input_ids, attention_mask=mask, position_ids=positions, mask_ratio=ratio)
    n = x0.shape[1]
    routing = [
        replace(
            r,
            ids=r.ids[:, :n],
            weights=r.weights[:, :n],
            scores=r.scores[:, :n],
            coreset=None if r.coreset is None else r.coreset[:, : r.coreset.shape[1] // 2],
            logits=None if r.logits is None else r.logits[:, :n],
        )
        for r in out.routing
    ]
    return NoisedForward(out.logits[:, :n], routing, masked, t)
