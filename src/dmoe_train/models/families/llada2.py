"""LLaDA2 MoE (LLaDA2.0-mini / LLaDA2.1-mini), written from the architecture's published facts.

Pre-norm decoder layers with bidirectional GQA attention (fused QKV, per-head qk RMSNorm, partial
NeoX RoPE) and SwiGLU MLPs; the first `first_k_dense_replace` layers are dense, the rest are MoE
layers with a sigmoid router (expert bias, group-limited top-k) and a shared expert. Routing goes
through `dmoe_train.routing`, so a block-level policy from the config replaces per-token routing.
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


@dataclass
class LLaDA2MoeConfig(PublishedConfig):
    """The published `config.json` fields we use, plus `routing` (our block-routing settings)."""

    model_type = "llada2_moe"

    vocab_size: int = 157184
    hidden_size: int = 2048
    intermediate_size: int = 5120
    num_hidden_layers: int = 20
    num_attention_heads: int = 16
    num_key_value_heads: int = 4
    head_dim: int | None = None
    partial_rotary_factor: float = 0.5
    rotary_dim: int | None = None
    rope_theta: float = 600000.0
    rms_norm_eps: float = 1e-6
    use_qk_norm: bool = True
    first_k_dense_replace: int = 1
    num_experts: int = 256
    num_experts_per_tok: int = 8
    num_shared_experts: int = 1
    moe_intermediate_size: int = 512
    n_group: int = 8
    topk_group: int = 4
    routed_scaling_factor: float = 2.5
    score_function: str = "sigmoid"
    moe_router_enable_expert_bias: bool = True
    norm_topk_prob: bool = True
    pad_token_id: int = 156892
    eos_token_id: int = 156892
    mask_token_id: int = 156895
    tie_word_embeddings: bool = False
    routing: RoutingPolicy = field(default_factory=RoutingPolicy)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.resolve_common()
        if self.rotary_dim is None:
            self.rotary_dim = int(self.head_dim * self.partial_rotary_factor)
        if self.score_function != "sigmoid":
            raise ValueError(f"score_function={self.score_function!r}: LLaDA2 routes by 'sigmoid'")
        for unsupported in ("use_bias", "use_qkv_bias", "norm_head"):
            if self.extra.get(unsupported):
                raise ValueError(f"{unsupported}={self.extra[unsupported]}: not supported (false)")
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim={self.rotary_dim}: must be even and <= head_dim")
        group_size = self.num_experts // self.moe.n_group
        if self.topk_group * group_size < self.num_experts_per_tok:
            raise ValueError(
                f"topk_group={self.topk_group} groups of {group_size} hold fewer than "
                f"num_experts_per_tok={self.num_experts_per_tok} experts"
            )
        self.routing.check_against(self.moe.num_experts, self.moe.top_k)

    @cached_property
    def moe(self) -> MoeSpec:
        return MoeSpec(
            num_experts=self.num_experts,
            top_k=self.num_experts_per_tok,
            expert_width=self.moe_intermediate_size,
            n_group=self.n_group,
            topk_group=self.topk_group,
            score_function=self.score_function,
            renormalise=bool(self.norm_topk_prob),
            scaling=self.routed_scaling_factor,
            expert_bias=self.moe_router_enable_expert_bias,
            shared_width=self.moe_intermediate_size * self.num_shared_experts,
        )


PRESETS: dict[str, dict] = {
    "llada2_mini": {},
    "tiny": dict(
        vocab_size=128,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_theta=10000.0,
        num_experts=32,
        num_experts_per_tok=4,
        moe_intermediate_size=64,
        n_group=4,
        topk_group=2,
        pad_token_id=0,
        eos_token_id=0,
        mask_token_id=1,
    ),
}
# LLaDA2.0-mini's routing regime (256 experts, top-8, 4 of 8 groups, one shared expert, first
# layer dense, scaling 2.5) at the tiny base's width: `studies.make_base --base tiny256` trains
# it, `experiment=tiny256_topp` fine-tunes its routers
PRESETS["tiny256"] = {
    **PRESETS["tiny"],
    "num_hidden_layers": 5,
    "num_experts": 256,
    "num_experts_per_tok": 8,
    "moe_intermediate_size": 16,
    "n_group": 8,
    "topk_group": 4,
}


class Attention(nn.Module):
    """Fused QKV projection (rows: query heads, then key heads, then value heads) and `dense`."""

    def __init__(self, cfg: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        qkv_rows = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, qkv_rows, bias=False)
        self.dense = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=False)
        if cfg.use_qk_norm:
            self.query_layernorm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.key_layernorm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, past: KV | None = None
    ) -> tuple[Tensor, KV]:
        cfg = self.cfg
        b, n, _ = x.shape
        qkv = self.query_key_value(x).view(b, n, -1, cfg.head_dim)
        q, k, v = qkv.split(
            [cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_key_value_heads], dim=2
        )
        norms = (self.query_layernorm, self.key_layernorm) if cfg.use_qk_norm else None
        out, kv = attend(q, k, v, cos, sin, mask, past, norms)
        return self.dense(out), kv


class LLaDA2MoeModel(nn.Module):
    def __init__(self, cfg: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(
                cfg,
                "attention",
                Attention(cfg),
                SparseMoe(cfg)
                if i >= cfg.first_k_dense_replace
                else SwiGLU(cfg.hidden_size, cfg.intermediate_size),
            )
            for i in range(cfg.num_hidden_layers)
        )
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LLaDA2MoeModelLM(MoeDiffusionLM):
    config_class = LLaDA2MoeConfig
    embedding_name = "word_embeddings"

    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__(config, LLaDA2MoeModel(config))
