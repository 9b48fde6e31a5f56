"""Expert compute: tokens sorted by expert, one grouped matmul per projection.

Weights are stacked per expert as in the merged checkpoint layout: `gate_proj`/`up_proj`
`[E, I, H]`, `down_proj` `[E, H, I]`. Only experts that received tokens are touched:
`grouped_mm` skips empty groups, and the loop over non-empty experts replaces it where it is
missing, where its kernel does not run (`grouped_mm_runs`: CUDA wants bfloat16 on SM80+) or
where deterministic algorithms are on (its deterministic CPU path does a full matmul per group,
~60x slower). Outputs are combined without atomic accumulation, so the result is
bit-reproducible.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def grouped_mm_runs(
    device_type: str, dtype: torch.dtype, capability: tuple[int, int] | None
) -> bool:
    """Where `torch.nn.functional.grouped_mm`'s kernel runs: on the CPU for any float dtype; on
    CUDA only for bfloat16 on SM80 and newer (its documented constraint, which the meta kernel
    enforces too). Elsewhere `grouped_linear` loops over the non-empty experts instead, in the
    caller's dtype (exact, not a cast)."""
    if device_type == "cpu":
        return dtype.is_floating_point
    return device_type == "cuda" and dtype == torch.bfloat16 and (capability or (0, 0)) >= (8, 0)


def _use_grouped_mm(x: Tensor, weight: Tensor) -> bool:
    if not hasattr(F, "grouped_mm") or torch.are_deterministic_algorithms_enabled():
        return False
    # 16-byte aligned rows in and out (its backward needs both: a rank-2 adapter's are not)
    if x.dtype != weight.dtype or any((n * x.element_size()) % 16 for n in weight.shape[1:]):
        return False
    cuda = x.device.type == "cuda"
    capability = torch.cuda.get_device_capability(x.device) if cuda else None
    return grouped_mm_runs(x.device.type, x.dtype, capability)


def grouped_linear(x: Tensor, weight: Tensor, counts: Tensor) -> Tensor:
    """`x` `[N, K]` sorted by group, `weight` `[E, out, K]`, `counts` `[E]` rows per group."""
    if _use_grouped_mm(x, weight):
        offs = counts.cumsum(0).to(torch.int32)
        return F.grouped_mm(x, weight.transpose(1, 2), offs=offs)
    out = x.new_empty(x.shape[0], weight.shape[1])
    start = 0
    for e, n in enumerate(counts.tolist()):
        if n:
            out[start : start + n] = x[start : start + n] @ weight[e].T
            start += n
    return out


LowRank = tuple[Tensor, Tensor, float]  # (lhs [E, out, r], rhs [E, r, in], scaling)


def adapted_linear(x: Tensor, weight: Tensor, counts: Tensor, low_rank: LowRank | None) -> Tensor:
    """`grouped_linear` through `weight + scaling * lhs @ rhs` per expert, never forming that
    sum: the rank-r path runs on the routed rows only."""
    out = grouped_linear(x, weight, counts)
    if low_rank is None:
        return out
    lhs, rhs, scaling = low_rank
    # zero rank rows up to 16 bytes, so that the grouped matmul (and its backward) takes a
    # rank-1 or -2 adapter too; the zeros add nothing. peft's factors are views of its
    # [r * E, ...] layout: the padding makes them dense as well
    pad = -rhs.shape[1] % (16 // x.element_size())
    rhs = F.pad(rhs.to(x.dtype), (0, 0, 0, pad)).contiguous()
    lhs = F.pad(lhs.to(x.dtype), (0, pad)).contiguous()
    inner = grouped_linear(x, rhs, counts)
    return out + scaling * grouped_linear(inner, lhs, counts)


def expert_mlp(
    x: Tensor,
    ids: Tensor,
    weights: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
    low_rank: dict[str, LowRank] | None = None,
) -> Tensor:
    """Sum over each token's chosen experts of weight * SwiGLU expert(x).

    `x` `[N, H]`; `ids`/`weights` `[N, k]`, id -1 = empty slot (contributes nothing);
    `low_rank`: adapters per projection name (`adapted_linear`). Computed in the experts' dtype
    (fp32 master weights when they train beside a bf16 base), returned in the caller's.
    """
    rows = expert_rows(x, ids, weights, gate_proj, up_proj, down_proj, low_rank)
    return rows.view(*ids.shape, -1).sum(1)


def expert_rows(
    x: Tensor,
    ids: Tensor,
    weights: Tensor,
    gate_proj: Tensor,
    up_proj: Tensor,
    down_proj: Tensor,
    low_rank: dict[str, LowRank] | None = None,
) -> Tensor:
    """`expert_mlp` before its sum over slots: `[N * k, H]`, row `n * k + s` the weighted output
    of token n's slot s (zero for an empty slot). Rows computed in parts (experts resident a few
    at a time) add up to exactly these."""
    low_rank = low_rank or {}

    def swiglu(xs: Tensor, counts: Tensor) -> Tensor:
        gate = adapted_linear(xs, gate_proj, counts, low_rank.get("gate_proj"))
        hidden = F.silu(gate) * adapted_linear(xs, up_proj, counts, low_rank.get("up_proj"))
        return adapted_linear(hidden, down_proj, counts, low_rank.get("down_proj"))

    return routed_rows(x, ids, weights, gate_proj, swiglu)


def stacked_expert_mlp(
    x: Tensor,
    ids: Tensor,
    weights: Tensor,
    gate_up_proj: Tensor,
    down_proj: Tensor,
    act: Callable[[Tensor], Tensor],
    low_rank: dict[str, LowRank] | None = None,
) -> Tensor:
    """`expert_mlp` for experts that stack gate and up in one `gate_up_proj` `[E, 2I, H]` and
    gate by `act` (DiffusionGemma's layout)."""
    low_rank = low_rank or {}

    def gated(xs: Tensor, counts: Tensor) -> Tensor:
        gate_up = adapted_linear(xs, gate_up_proj, counts, low_rank.get("gate_up_proj"))
        gate, up = gate_up.chunk(2, dim=-1)
        return adapted_linear(act(gate) * up, down_proj, counts, low_rank.get("down_proj"))

    return routed_rows(x, ids, weights, gate_up_proj, gated).view(*ids.shape, -1).sum(1)


def routed_rows(
    x: Tensor, ids: Tensor, weights: Tensor, first: Tensor, mlp: Callable[[Tensor, Tensor], Tensor]
) -> Tensor:
    """Every (token, slot) row through its expert: the rows sorted by expert, `mlp(rows,
    counts)` on them (`first`: the experts' first stacked weight, for their count and dtype),
    weighted, back in token order `[N * k, H]`."""
    n, k = ids.shape
    flat_ids = ids.reshape(-1)
    order = flat_ids.argsort(stable=True)
    order = order[flat_ids[order] >= 0]  # empty slots sort first; drop them
    counts = torch.bincount(flat_ids[order], minlength=first.shape[0])
    # one row per (token, slot), sorted by expert; every index is unique, so the gradients of
    # these gathers and of index_copy below need no accumulation
    xs = x.repeat_interleave(k, dim=0).index_select(0, order).to(first.dtype)
    ys = mlp(xs, counts) * weights.reshape(-1)[order, None].to(xs.dtype)
    return x.new_zeros(n * k, x.shape[1]).index_copy(0, order, ys.to(x.dtype))
