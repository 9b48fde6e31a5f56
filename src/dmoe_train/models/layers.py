"""The layers our families share: RMSNorm, partial NeoX RoPE, bidirectional GQA attention over a
prefix's keys and values (a dense additive mask or flex_attention's BlockMask), SwiGLU, and the
masks a forward builds."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_mask, flex_attention

from dmoe_train.models.block_diffusion import as_additive
from dmoe_train.routing import from_blocks, to_blocks

KV = tuple[Tensor, Tensor]  # keys, values `[B, kv_heads, L, head_dim]` after RoPE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # computed in fp32: bf16 sums of squares lose the small components
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(position_ids: Tensor, rotary_dim: int, theta: float) -> tuple[Tensor, Tensor]:
    """cos/sin `[B, 1, L, rotary_dim]` (NeoX layout: the frequencies repeated over two halves)."""
    inv_freq = 1.0 / theta ** (
        torch.arange(0, rotary_dim, 2, device=position_ids.device, dtype=torch.float32) / rotary_dim
    )
    freqs = position_ids.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos(), emb.sin()


def apply_partial_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate the first `rotary_dim` dims of `x` `[B, heads, L, head_dim]`; the rest pass."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    half1, half2 = rot.chunk(2, dim=-1)
    rotated = rot * cos + torch.cat([-half2, half1], dim=-1) * sin
    return torch.cat([rotated.to(x.dtype), rest], dim=-1)


def attend(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cos: Tensor,
    sin: Tensor,
    mask: Tensor | None,
    past: KV | None,
    qk_norms: tuple[nn.Module, nn.Module] | None,
) -> tuple[Tensor, KV]:
    """Bidirectional GQA attention of heads `[B, L, heads, head_dim]` over `past` and themselves
    (per-head qk RMSNorm, then RoPE); returns `[B, L, heads * head_dim]` and the new keys/values."""
    b, n = q.shape[:2]
    if qk_norms is not None:
        q, k = qk_norms[0](q), qk_norms[1](k)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
    keys, values = (
        (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
    )
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, keys, values))
    if isinstance(mask, BlockMask) and q.device.type == "cpu" and grad:
        # flex_attention has no backward on the CPU: the dense mask it stands for, there
        mask = _dense_additive(mask, q.device)
    if isinstance(mask, BlockMask):  # block diffusion without a dense mask
        out = _flex_attention(q.is_cuda)(q, keys, values, block_mask=mask, enable_gqa=True)
    else:
        attn_mask = None if mask is None else mask.to(q.dtype)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=attn_mask, enable_gqa=True)
    return out.transpose(1, 2).reshape(b, n, -1), (k, v)


def _dense_additive(mask: BlockMask, device: torch.device) -> Tensor:
    q_len, kv_len = mask.seq_lengths
    return as_additive(create_mask(mask.mask_mod, None, None, q_len, kv_len, device=device)[0, 0])


@cache
def _flex_attention(cuda: bool) -> Callable[..., Tensor]:
    """flex_attention compiled where it has a fused kernel (CUDA, as torchtitan runs it); the
    CPU runs it eagerly (slower, but the same result)."""
    return torch.compile(flex_attention) if cuda else flex_attention


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def additive_mask(attention_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A `[B, L]` keep-mask (1 = token, 0 = padding) -> additive `[B, 1, 1, L]` over keys."""
    return torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~attention_mask.bool(), float("-inf")
    )[:, None, None, :]


def block_mask_fraction(masked: Tensor, block_size: int) -> Tensor:
    """Each position's block's masked fraction `[B, L]` (decoding's noise level r)."""
    return from_blocks(to_blocks(masked.float(), block_size).mean(-1), block_size, masked.shape[1])
