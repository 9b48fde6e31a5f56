"""Differentiable coreset-size regularizers on a block's soft routing.

A token's soft activation probability of expert e is p_te = 1 - (1 - pi_te)^k, the chance that k
draws from its soft routing distribution pi_t = softmax(router logits) hit e: it relaxes the hard
top-k (about k experts per token), stays below 1 and has a gradient everywhere (a clamp at 1 would
not). Both regularizers return a size in experts (mean over MoE layers, samples and blocks); the
training loss adds weight * size / E. Beside them, ST-MoE's router z-loss and Switch
Transformer's load-balancing loss (for bases trained from scratch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch
from torch import Tensor

from dmoe_train.routing import Routing, to_blocks
from dmoe_train.settings import refuse

RegularizerKind = Literal["none", "union", "perplexity"]
# earlier names of a kind: `entropy` returned (and returns) the perplexity, exp(entropy)
ALIASES = {"entropy": "perplexity"}
EPS = 1e-6


def log_miss(logits: Tensor, top_k: int) -> Tensor:
    """log(1 - p_te) `[..., E]` from the router's own logits, whatever its score function (a
    sigmoid router's scores could give them back, a softmax router's cannot). Kept in log space:
    p_te itself rounds to 1 in fp32 for confident tokens, and log(1 - 1) has no gradient."""
    pi = logits.float().softmax(-1).clamp(max=1.0 - EPS)
    return top_k * torch.log1p(-pi)


def expected_union(log_miss_blocks: Tensor) -> Tensor:
    """Expected experts a block activates, sum_e 1 - prod_t (1 - p_te), from log(1 - p_te)
    `[..., T, E]` -> `[...]`."""
    return -torch.expm1(log_miss_blocks.sum(-2)).sum(-1)


def perplexity(p_blocks: Tensor) -> Tensor:
    """exp(entropy) of the block's aggregated expert distribution; `[..., T, E]` -> `[...]`."""
    agg = p_blocks.sum(-2)
    dist = agg / agg.sum(-1, keepdim=True).clamp_min(EPS)
    return torch.exp(-(dist * dist.clamp_min(EPS).log()).sum(-1))


@dataclass(frozen=True)
class CoresetRegularizer:
    kind: RegularizerKind = "union"
    weight: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", ALIASES.get(self.kind, self.kind))
        if self.kind not in get_args(RegularizerKind):
            raise refuse("kind", repr(self.kind), f"must be one of {get_args(RegularizerKind)}")
        if not self.weight >= 0:
            raise refuse("weight", self.weight, "must be >= 0")

    def size(self, routing: list[Routing], block_size: int, top_k: int) -> Tensor:
        """The soft coreset size, in experts (0 for `none`)."""
        if self.kind == "none":
            return routing[0].logits.new_zeros(())
        sizes = []
        for r in routing:
            blocks = to_blocks(log_miss(r.logits, top_k), block_size, 0.0)  # padding: p = 0
            size = (
                expected_union(blocks) if self.kind == "union" else perplexity(-torch.expm1(blocks))
            )
            sizes.append(size.mean())
        return torch.stack(sizes).mean()


def router_z_loss(routing: list[Routing]) -> Tensor:
    """ST-MoE's z-loss: the mean squared log-sum-exp of the router logits, over tokens and MoE
    layers; keeps logits small, so softmax scores stay smooth while the router is retrained."""
    return torch.stack([r.logits.logsumexp(-1).pow(2).mean() for r in routing]).mean()


def load_balance_loss(routing: list[Routing], num_experts: int) -> Tensor:
    """Switch Transformer's auxiliary loss E * sum_e f_e * P_e (f_e: the share of the top-k
    choices that go to expert e, P_e: e's mean router probability), mean over MoE layers; 1 when
    balanced. A softmax router trained from scratch without it collapses onto a few experts."""
    losses = []
    for r in routing:
        probs = r.logits.float().softmax(-1).flatten(0, -2).mean(0)
        ids = r.ids[r.ids >= 0]  # -1: an empty slot
        share = torch.bincount(ids, minlength=num_experts).float() / max(ids.numel(), 1)
        losses.append(num_experts * (share * probs).sum())
    return torch.stack(losses).mean()
