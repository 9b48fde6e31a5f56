"""LLaDA-MoE (LLaDA-MoE-7B-A1B), the base of the expert-choice study, from its published facts.

OLMoE-like: pre-norm decoder layers with bidirectional attention (separate q/k/v/o projections,
per-head q/k RMSNorm, RoPE), MoE MLPs with a softmax router (top-8 of 64, probabilities not
renormalised, optional expert bias and shared expert), dense layers where `moe_layer_freq[i] == 0`.
Everything but the attention projections and the names is shared with LLaDA2 (`common`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from torch import Tensor, nn

from dmoe_train.models.config import PublishedConfig
from dmoe_train.models.layers import KV, RMSNorm, SwiGLU, attend
from dmoe_train.models.lm import DecoderLayer, MoeDiffusionLM
from dmoe_train.models.moe import SparseMoe
from dmoe_train.routing import MoeSpec, RoutingPolicy

MODEL_TYPES = ("llada_moe", "lladamoe")


@dataclass
class LLaDAMoeConfig(PublishedConfig):
    """The published `config.json` fields we use (names as published), plus `routing`."""

    model_type = "llada_moe"

    vocab_size: int = 157184
    hidden_size: int = 2048
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    head_dim: int | None = None
    dense_intermediate_size: int = 8192
    expert_intermediate_size: int = 1024
    shared_expert_intermediate_size: int | None = None
    num_experts: int = 64
    num_experts_per_tok: int = 8
    moe_layer_freq: list[int] | None = None
    qk_layernorm: bool = True
    moe_router_score_function: str = "softmax"
    moe_router_enable_expert_bias: bool = False
    router_num_group: int | None = None
    router_topk_group: int | None = None
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool | None = None
    rope_theta: float = 50000.0
    partial_rotary_factor: float = 1.0
    rms_norm_eps: float = 1e-5
    eos_token_id: int = 156892
    pad_token_id: int = 156892
    mask_token_id: int = 156895
    tie_word_embeddings: bool = False
    routing: RoutingPolicy = field(default_factory=RoutingPolicy)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.resolve_common()
        if self.moe_layer_freq is None:
            self.moe_layer_freq = [1] * self.num_hidden_layers
        if len(self.moe_layer_freq) != self.num_hidden_layers:
            raise ValueError(
                f"moe_layer_freq has {len(self.moe_layer_freq)} entries, "
                f"num_hidden_layers={self.num_hidden_layers}"
            )
        for unsupported in ("attention_bias", "clip_qkv", "rope_scaling"):
            if self.extra.get(unsupported):
                raise ValueError(f"{unsupported}={self.extra[unsupported]}: not supported")
        self.routing.check_against(self.moe.num_experts, self.moe.top_k)

    @cached_property
    def moe(self) -> MoeSpec:
        return MoeSpec(
            num_experts=self.num_experts,
            top_k=self.num_experts_per_tok,
            expert_width=self.expert_intermediate_size,
            n_group=self.router_num_group or 1,
            topk_group=self.router_topk_group or 1,
            score_function=self.moe_router_score_function,
            renormalise=bool(self.norm_topk_prob),
            scaling=self.routed_scaling_factor,
            expert_bias=self.moe_router_enable_expert_bias,
            shared_width=self.shared_expert_intermediate_size or 0,
        )

    @property  # derived from its published fields (LLaDA2 publishes it)
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)


TINY = dict(
    vocab_size=128,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    dense_intermediate_size=256,
    expert_intermediate_size=64,
    num_experts=16,
    num_experts_per_tok=4,
    moe_layer_freq=[0, 1, 1, 1],
    rope_theta=10000.0,
    eos_token_id=0,
    pad_token_id=0,
    mask_token_id=1,
)


class Attention(nn.Module):
    def __init__(self, cfg: LLaDAMoeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(h, cfg.num_attention_heads * hd, bias=False)
        self.k_proj = nn.Linear(h, cfg.num_key_value_heads * hd, bias=False)
        self.v_proj = nn.Linear(h, cfg.num_key_value_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * hd, h, bias=False)
        if cfg.qk_layernorm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, past: KV | None = None
    ) -> tuple[Tensor, KV]:
        b, n, _ = x.shape
        projections = (self.q_proj, self.k_proj, self.v_proj)
        q, k, v = (p(x).view(b, n, -1, self.cfg.head_dim) for p in projections)
        norms = (self.q_norm, self.k_norm) if self.cfg.qk_layernorm else None
        out, kv = attend(q, k, v, cos, sin, mask, past, norms)
        return self.o_proj(out), kv


class LLaDAMoeModel(nn.Module):
    def __init__(self, cfg: LLaDAMoeConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(
                cfg,
                "self_attn",
                Attention(cfg),
                SparseMoe(cfg) if moe else SwiGLU(cfg.hidden_size, cfg.dense_intermediate_size),
            )
            for moe in cfg.moe_layer_freq
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LLaDAMoeModelLM(MoeDiffusionLM):
    config_class = LLaDAMoeConfig
    embedding_name = "embed_tokens"
    # the published router bias sits beside the gate; ours lives in the router module
    published_names = ((".mlp.gate.expert_bias", ".mlp.expert_bias"),)

    def __init__(self, config: LLaDAMoeConfig) -> None:
        super().__init__(config, LLaDAMoeModel(config))
