"""The one MoE block of our families: router, routed experts, optional shared expert, as the
config's `moe` describes them, routing by the config's current `routing`. How the experts are
computed is the block's `compute`: every expert resident (`AllResident`, the default), or a
resident cache of them (`models.expert_cache`)."""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dmoe_train.models.grouped_experts import LowRank, expert_mlp
from dmoe_train.models.layers import SwiGLU
from dmoe_train.models.lora import expert_low_rank
from dmoe_train.routing import MoeSpec, Routing, route


class ExpertCompute(Protocol):
    """What computes a MoE block's routed experts: `x` `[N, H]`, `ids`/`weights` `[N, slots]`,
    the block policy's `coreset` (None under per-token rules) -> `[N, H]`."""

    def run(self, x: Tensor, ids: Tensor, weights: Tensor, coreset: Tensor | None) -> Tensor: ...


class AllResident:
    """Every expert in the block's own parameters (peft's adapters added where they wrap them:
    the block's `experts` are read at each call, as peft may have wrapped them since)."""

    def __init__(self, block: nn.Module) -> None:
        self.block = block

    def run(self, x: Tensor, ids: Tensor, weights: Tensor, coreset: Tensor | None) -> Tensor:
        experts, low_rank = expert_low_rank(self.block.experts)  # peft's wrappers, if adapted
        return experts(x, ids, weights, low_rank)


class Router(nn.Module):
    """`weight` `[E, H]` and an optional `expert_bias` `[E]` that only steers selection."""

    def __init__(self, hidden: int, moe: MoeSpec) -> None:
        super().__init__()
        self.score_function = moe.score_function
        self.weight = nn.Parameter(torch.empty(moe.num_experts, hidden))
        self.expert_bias = (
            nn.Parameter(torch.zeros(moe.num_experts), requires_grad=False)
            if moe.expert_bias
            else None
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        """fp32 logits (also under bf16 autocast), their scores `[..., E]`, and a copy of the
        expert bias: under FSDP a parameter is whole only inside its module's forward."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid() if self.score_function == "sigmoid" else logits.softmax(-1)
        bias = None if self.expert_bias is None else self.expert_bias.detach().clone()
        return logits, scores, bias


class Experts(nn.Module):
    """Routed experts stacked `[E, ...]` (the merged layout); saved in the split layout. Their
    compute is this module's forward, so hooks on it (accelerate's offload) see every use."""

    def __init__(self, num_experts: int, hidden: int, intermediate: int) -> None:
        super().__init__()
        e, h, i = num_experts, hidden, intermediate
        self.gate_proj = nn.Parameter(torch.empty(e, i, h))
        self.up_proj = nn.Parameter(torch.empty(e, i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))

    def forward(
        self, x: Tensor, ids: Tensor, weights: Tensor, low_rank: dict[str, LowRank] | None = None
    ) -> Tensor:
        """`x` `[N, H]`, `ids`/`weights` `[N, slots]` -> the weighted expert outputs `[N, H]`;
        `low_rank`: peft's adapters of the projections (`models.lora`)."""
        return expert_mlp(x, ids, weights, self.gate_proj, self.up_proj, self.down_proj, low_rank)


class SparseMoe(nn.Module):
    """The one MoE block of every family: router, routed experts, optional shared expert, as
    the config's `moe` describes them; it routes by the config's current `routing`."""

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        moe, h = config.moe, config.hidden_size
        self.gate = Router(h, moe)
        self.experts = Experts(moe.num_experts, h, moe.expert_width)
        self.shared_experts = SwiGLU(h, moe.shared_width) if moe.shared_width else None
        self.compute: ExpertCompute = AllResident(self)

    def use_compute(self, compute: ExpertCompute) -> None:
        """Compute the routed experts with `compute` from now on (`models.expert_cache`)."""
        self.compute = compute

    def forward(
        self, x: Tensor, valid: Tensor | None, ratio: Tensor | None
    ) -> tuple[Tensor, Routing]:
        moe = self.config.moe
        logits, scores, bias = self.gate(x)
        routing = route(
            self.config.routing, scores, moe=moe, expert_bias=bias, valid=valid, ratio=ratio
        )
        routing.logits = logits
        args = (
            x.flatten(0, 1),
            routing.ids.flatten(0, 1),
            routing.weights.flatten(0, 1) * moe.scaling,
        )
        out = self.compute.run(*args, routing.coreset).view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out, routing
