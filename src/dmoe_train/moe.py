"""Expert compute: tokens sorted by expert, one grouped matmul per projection.

Weights are stacked per expert as in the merged checkpoint layout: `gate_proj`/`up_proj`
`[E, I, H]`, `down_proj` `[E, H, I]`. Only experts that received tokens are touched:
`grouped_mm` skips empty groups, and the fallback loops over non-empty experts only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def grouped_linear(x: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    """`x` `[N, K]` sorted by group, `weight` `[E, out, K]`, `counts` `[E]` rows per group."""
    if hasattr(F, "grouped_mm"):
        offs = counts.cumsum(0).to(torch.int32)
        return F.grouped_mm(x, weight.transpose(1, 2), offs=offs)
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out[start : start + n] = x[start : start + n] @ weight[e].T
            start += n
    return out


def expert_mlp(
    x: Tensor, ids: Tensor, weights: Tensor, gate_proj: Tensor, up_proj: Tensor, down_proj: Tensor
) -> Tensor:
    """Sum over each token's chosen experts of weight * SwiGLU expert(x).

    `x` `[N, H]`; `ids`/`weights` `[N, k]`, id -1 = empty slot (contributes nothing).
    """
    num_experts = gate_proj.shape[0]
    flat_ids = ids.reshape(-1)
    order = flat_ids.argsort(stable=True)
    order = order[flat_ids[order] >= 0]  # empty slots sort first; drop them
    token = order // ids.shape[1]
    counts = torch.bincount(flat_ids[order], minlength=num_experts)
    xs = x[token]
    hidden = F.silu(grouped_linear(xs, gate_proj, counts)) * grouped_linear(xs, up_proj, counts)
    ys = grouped_linear(hidden, down_proj, counts) * weights.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add_(0, token, ys)
