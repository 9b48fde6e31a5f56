"""One MoE layer as routing and the MoE block see it: each family's config builds it once
(`config.moe`) from its published fields, whatever they are called there."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

ScoreFunction = Literal["sigmoid", "softmax"]


@dataclass(frozen=True)
class MoeSpec:
    """`num_experts` routed experts of width `expert_width`, `top_k` per token, chosen within
    the `topk_group` best of `n_group` groups; `score_function` of the router's logits,
    `renormalise`: the chosen weights sum to 1 (norm_topk_prob), then are scaled by `scaling`
    (routed_scaling_factor); `expert_bias`: a selection-only bias per expert (LLaDA2);
    `per_expert_scale`: a learned scale per expert multiplies the renormalised weights
    (DiffusionGemma); `shared_width`: the shared expert's width (0: none)."""

    num_experts: int
    top_k: int
    expert_width: int
    n_group: int = 1
    topk_group: int = 1
    score_function: ScoreFunction = "sigmoid"
    renormalise: bool = True
    scaling: float = 1.0
    expert_bias: bool = False
    per_expert_scale: bool = False
    shared_width: int = 0

    def __post_init__(self) -> None:
        if self.score_function not in get_args(ScoreFunction):
            raise ValueError(
                f"score_function={self.score_function!r}: must be one of {get_args(ScoreFunction)}"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(
                f"num_experts_per_tok={self.top_k}: must be in [1, num_experts={self.num_experts}]"
            )
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} does not divide num_experts")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(
                f"topk_group={self.topk_group}: must be in [1, n_group={self.n_group}]"
            )
