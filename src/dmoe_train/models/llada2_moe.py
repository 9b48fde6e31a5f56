"""LLaDA2 MoE (LLaDA2.0-mini / LLaDA2.1-mini), written from the architecture's published facts.

Pre-norm decoder layers with bidirectional GQA attention (fused QKV, per-head qk RMSNorm, partial
NeoX RoPE) and SwiGLU MLPs; the first `first_k_dense_replace` layers are dense, the rest are MoE
layers with a sigmoid router (expert bias, group-limited top-k) and a shared expert. Routing goes
through `dmoe_train.routing`, so a block-level policy from the config replaces per-token routing.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dmoe_train.moe import expert_mlp
from dmoe_train.routing import Routing, RoutingPolicy, route

KV = tuple[Tensor, Tensor]  # keys, values `[B, kv_heads, L, head_dim]` after RoPE


@dataclass
class LLaDA2MoeConfig:
    """The published `config.json` fields we use, plus `routing` (our block-routing settings).

    Keys of a published config that we do not use are kept in `extra` and written back.
    """

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
    pad_token_id: int = 156892
    eos_token_id: int = 156892
    mask_token_id: int = 156895
    tie_word_embeddings: bool = False
    routing: RoutingPolicy = field(default_factory=RoutingPolicy)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.routing, dict):
            self.routing = RoutingPolicy(**self.routing)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rotary_dim is None:
            self.rotary_dim = int(self.head_dim * self.partial_rotary_factor)
        if self.score_function != "sigmoid":
            raise ValueError(f"score_function={self.score_function!r}: LLaDA2 routes by 'sigmoid'")
        for unsupported in ("use_bias", "use_qkv_bias", "norm_head"):
            if self.extra.get(unsupported):
                raise ValueError(f"{unsupported}={self.extra[unsupported]}: not supported (false)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim={self.rotary_dim}: must be even and <= head_dim")
        if self.num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} does not divide num_experts")
        group_size = self.num_experts // self.n_group
        if self.topk_group * group_size < self.num_experts_per_tok:
            raise ValueError(
                f"topk_group={self.topk_group} groups of {group_size} hold fewer than "
                f"num_experts_per_tok={self.num_experts_per_tok} experts"
            )
        self.routing.check_against(self.num_experts, self.num_experts_per_tok)

    @classmethod
    def from_dict(cls, raw: dict) -> LLaDA2MoeConfig:
        known = {f.name for f in fields(cls)} - {"extra"}
        return cls(
            **{k: v for k, v in raw.items() if k in known},
            extra={k: v for k, v in raw.items() if k not in known},
        )

    @classmethod
    def from_json(cls, path: str | Path) -> LLaDA2MoeConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        out = {**self.extra, **asdict(self), "model_type": "llada2_moe"}
        del out["extra"]
        return out

    @property
    def moe_layers(self) -> range:
        return range(self.first_k_dense_replace, self.num_hidden_layers)


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


class Attention(nn.Module):
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
        """Attention of `x` over `past` (a prefix's keys and values) and itself; returns the
        output and the keys and values of `x` alone."""
        cfg = self.cfg
        b, n, _ = x.shape
        qkv = self.query_key_value(x).view(b, n, -1, cfg.head_dim)
        q, k, v = qkv.split(
            [cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_key_value_heads], dim=2
        )
        if cfg.use_qk_norm:
            q, k = self.query_layernorm(q), self.key_layernorm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        keys, values = (
            (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        )
        out = F.scaled_dot_product_attention(
            q, keys, values, attn_mask=None if mask is None else mask.to(q.dtype), enable_gqa=True
        )
        return self.dense(out.transpose(1, 2).reshape(b, n, -1)), (k, v)


class SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """`weight` `[E, H]` and `expert_bias` `[E]`; the bias only steers selection."""

    def __init__(self, cfg: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.hidden_size))
        self.expert_bias = (
            nn.Parameter(torch.zeros(cfg.num_experts), requires_grad=False)
            if cfg.moe_router_enable_expert_bias
            else None
        )

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """Sigmoid scores `[..., E]` from logits computed in fp32 (also under bf16 autocast), and
        a copy of the expert bias: under FSDP a parameter is whole only inside its forward."""
        with torch.autocast(x.device.type, enabled=False):
            scores = torch.sigmoid(F.linear(x.float(), self.weight.float()))
        bias = None if self.expert_bias is None else self.expert_bias.detach().clone()
        return scores, bias


class Experts(nn.Module):
    """Routed experts stacked `[E, ...]` (the merged layout); saved in the split layout."""

    def __init__(self, cfg: LLaDA2MoeConfig) -> None:
        super().__init__()
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(e, i, h))
        self.up_proj = nn.Parameter(torch.empty(e, i, h))
        self.down_proj = nn.Parameter(torch.empty(e, h, i))


class SparseMoe(nn.Module):
    def __init__(self, cfg: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Router(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = (
            SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.num_shared_experts)
            if cfg.num_shared_experts
            else None
        )

    def forward(self, x: Tensor, valid: Tensor | None) -> tuple[Tensor, Routing]:
        cfg = self.cfg
        scores, bias = self.gate(x)
        routing = route(
            cfg.routing,
            scores,
            bias,
            cfg.num_experts_per_tok,
            cfg.n_group,
            cfg.topk_group,
            valid,
        )
        ex = self.experts
        out = expert_mlp(
            x.flatten(0, 1),
            routing.ids.flatten(0, 1),
            routing.weights.flatten(0, 1) * cfg.routed_scaling_factor,
            ex.gate_proj,
            ex.up_proj,
            ex.down_proj,
        ).view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out, routing


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LLaDA2MoeConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = (
            SparseMoe(cfg)
            if layer_idx >= cfg.first_k_dense_replace
            else SwiGLU(cfg.hidden_size, cfg.intermediate_size)
        )

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        valid: Tensor | None,
        past: KV | None = None,
    ) -> tuple[Tensor, Routing | None, KV]:
        attended, kv = self.attention(self.input_layernorm(x), cos, sin, mask, past)
        x = x + attended
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, SparseMoe):
            out, routing = self.mlp(h, valid)
            return x + out, routing, kv
        return x + self.mlp(h), None, kv


class LLaDA2MoeModel(nn.Module):
    def __init__(self, cfg: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class LMOutput:
    logits: Tensor  # [B, L, vocab]
    routing: list[Routing]  # one per MoE layer, in layer order
    key_values: list[KV]  # per layer, the keys and values of the input positions (a cache entry)


def additive_mask(attention_mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """A `[B, L]` keep-mask (1 = token, 0 = padding) -> additive `[B, 1, 1, L]` over keys."""
    return torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(
        ~attention_mask.bool(), float("-inf")
    )[:, None, None, :]


class LLaDA2MoeModelLM(nn.Module):
    def __init__(self, config: LLaDA2MoeConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LLaDA2MoeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.word_embeddings.weight
        self.activation_checkpointing = False
        self.name_or_path: str | None = None  # the directory it was loaded from

    def set_routing(self, policy: RoutingPolicy) -> None:
        """Switch every MoE layer to `policy` (they share this config)."""
        policy.check_against(self.config.num_experts, self.config.num_experts_per_tok)
        self.config.routing = policy

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        valid: Tensor | None = None,
        past_key_values: list[KV] | None = None,
    ) -> LMOutput:
        """`attention_mask`: `[B, L]` padding mask (also the routing `valid` mask) or additive
        `[B, 1, q, kv]` (0 attend, -inf block; kv covers the past too). `valid` `[B, L]`:
        positions that vote in routing. `past_key_values`: a prefix's `key_values`, attended
        before the input (the input's routing blocks start at its first position)."""
        b, n = input_ids.shape
        if attention_mask is not None and attention_mask.dim() == 2:
            valid = attention_mask.bool() if valid is None else valid
            attention_mask = additive_mask(attention_mask)
        if position_ids is None:
            position_ids = torch.arange(n, device=input_ids.device).expand(b, n)
        cos, sin = rope_cos_sin(position_ids, self.config.rotary_dim, self.config.rope_theta)
        x = self.model.word_embeddings(input_ids)
        routing, key_values = [], []
        for i, layer in enumerate(self.model.layers):
            past = None if past_key_values is None else past_key_values[i]
            if self.activation_checkpointing and self.training:
                x, r, kv = checkpoint(
                    layer, x, cos, sin, attention_mask, valid, past, use_reentrant=False
                )
            else:
                x, r, kv = layer(x, cos, sin, attention_mask, valid, past)
            key_values.append(kv)
            if r is not None:
                routing.append(r)
        return LMOutput(self.lm_head(self.model.norm(x)), routing, key_values)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype | None = None,
        device: str | torch.device | None = None,
        routing: RoutingPolicy | None = None,
    ) -> LLaDA2MoeModelLM:
        from dmoe_train.models.checkpoint import load_pretrained

        return load_pretrained(cls, LLaDA2MoeConfig, path, dtype, device, routing)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 4 * 2**30) -> None:
        from dmoe_train.models.checkpoint import save_pretrained

        save_pretrained(self, path, max_shard_bytes)


def is_router_param(name: str) -> bool:
    """The router's tensors: what router fine-tuning trains and a router checkpoint holds."""
    return name.endswith((".mlp.gate.weight", ".mlp.gate.expert_bias"))


@torch.no_grad()
def init_weights(model: nn.Module, std: float = 0.02) -> None:
    """Random init for models trained from scratch (the tiny base); pretrained ones are loaded."""
    for name, p in model.named_parameters():
        if name.endswith("expert_bias"):
            p.zero_()
        elif p.dim() == 1:
            p.fill_(1.0)
        else:
            p.normal_(0.0, std)
            if name.endswith(("dense.weight", "down_proj.weight", "down_proj")):
                p.div_(math.sqrt(2 * len(getattr(model, "model", model).layers)))
