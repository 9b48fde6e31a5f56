"""What our MoE dLLM families share: norms, RoPE, attention core, SwiGLU, the MoE block (router,
stacked experts, shared expert) and the LM forward. A family file adds its config, its attention
projections and its checkpoint names; routing goes through `dmoe_train.routing`, so a block-level
policy in the config replaces per-token routing for every family alike.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from functools import cache
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.attention.flex_attention import BlockMask, create_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from dmoe_train.models.block_diffusion import as_additive
from dmoe_train.models.grouped_experts import LowRank, expert_mlp
from dmoe_train.models.lora import expert_low_rank
from dmoe_train.routing import (
    MoeSpec,
    Routing,
    RoutingPolicy,
    from_blocks,
    policy_from_engine_config,
    route,
    to_blocks,
)

KV = tuple[Tensor, Tensor]  # keys, values `[B, kv_heads, L, head_dim]` after RoPE


class PublishedConfig:
    """Base of the families' config dataclasses: the published `config.json` keys they use are
    fields (same names); the others are kept in `extra` and written back; `routing` is ours."""

    model_type: ClassVar[str]
    # what the shared blocks read, in every family under these names
    hidden_size: int
    vocab_size: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    mask_token_id: int
    rope_theta: float
    rotary_dim: int
    routing: RoutingPolicy
    moe: MoeSpec  # the family's MoE layer, built once from its published fields

    def resolve_common(self) -> None:
        """The first steps of every family's `__post_init__`."""
        if isinstance(self.routing, dict):
            self.routing = RoutingPolicy.from_record(self.routing)
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )

    @classmethod
    def from_dict(cls, raw: dict) -> Any:
        """Our `routing` key if present, else the block rule the engine keys ask for."""
        known = {f.name for f in fields(cls)} - {"extra"}
        ours = {k: v for k, v in raw.items() if k in known}
        if "routing" not in raw and (policy := policy_from_engine_config(raw)) is not None:
            ours["routing"] = policy
        return cls(**ours, extra={k: v for k, v in raw.items() if k not in known})

    @classmethod
    def from_json(cls, path: str | Path) -> Any:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_dict(self) -> dict:
        out = {"model_type": self.model_type, **self.extra, **asdict(self)}
        del out["extra"]
        return out


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

    def __init__(self, config: PublishedConfig) -> None:
        super().__init__()
        self.config = config
        moe, h = config.moe, config.hidden_size
        self.gate = Router(h, moe)
        self.experts = Experts(moe.num_experts, h, moe.expert_width)
        self.shared_experts = SwiGLU(h, moe.shared_width) if moe.shared_width else None
        self.resident = None  # `models.expert_cache.offload_experts`: experts off the device

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
        if self.resident is not None:
            out = self.resident.run(*args, routing.coreset).view_as(x)
        else:
            experts, low_rank = expert_low_rank(self.experts)  # peft's wrappers, if adapted
            out = experts(*args, low_rank).view_as(x)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out, routing


class DecoderLayer(nn.Module):
    """Pre-norm: x + attention(norm(x)), then x + mlp(norm(x)). The attention block is registered
    under the checkpoint's name for it (`attention` in LLaDA2, `self_attn` in LLaDA-MoE)."""

    def __init__(
        self, cfg: PublishedConfig, attention_name: str, attention: nn.Module, mlp: nn.Module
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attention_name = attention_name
        self.add_module(attention_name, attention)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor | None,
        valid: Tensor | None,
        ratio: Tensor | None,
        past: KV | None = None,
    ) -> tuple[Tensor, Routing | None, KV]:
        attention = getattr(self, self.attention_name)
        attended, kv = attention(self.input_layernorm(x), cos, sin, mask, past)
        x = x + attended
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, SparseMoe):
            out, routing = self.mlp(h, valid, ratio)
            return x + out, routing, kv
        return x + self.mlp(h), None, kv


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


def block_mask_fraction(masked: Tensor, block_size: int) -> Tensor:
    """Each position's block's masked fraction `[B, L]` (decoding's noise level r)."""
    return from_blocks(to_blocks(masked.float(), block_size).mean(-1), block_size, masked.shape[1])


class MoeDiffusionLM(nn.Module):
    """The LM shared by our families: `self.model` holds the embedding (`embedding_name`), the
    decoder `layers` and the final `norm`; `lm_head` maps to the vocabulary."""

    config_class: ClassVar[type]
    embedding_name: ClassVar[str]
    # (our name suffix, the published one) where a family's checkpoint names differ from ours
    published_names: ClassVar[tuple[tuple[str, str], ...]] = ()

    def __init__(self, config: PublishedConfig, model: nn.Module) -> None:
        super().__init__()
        self.config = config
        self.model = model
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.get_input_embeddings().weight
        self.activation_checkpointing = False
        self.name_or_path: str | None = None  # the directory it was loaded from

    def get_input_embeddings(self) -> nn.Embedding:
        return getattr(self.model, self.embedding_name)

    def set_routing(self, policy: RoutingPolicy) -> None:
        """Switch every MoE layer to `policy` (they share this config)."""
        policy.check_against(self.config.moe.num_experts, self.config.moe.top_k)
        self.config.routing = policy

    @contextmanager
    def routing_as(self, policy: RoutingPolicy) -> Iterator[None]:
        """Route by `policy` inside the block; the previous policy comes back on leaving it,
        on an error too."""
        previous = self.config.routing
        self.set_routing(policy)
        try:
            yield
        finally:
            self.config.routing = previous

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        valid: Tensor | None = None,
        past_key_values: list[KV] | None = None,
        mask_ratio: Tensor | None = None,
    ) -> LMOutput:
        """`attention_mask`: `[B, L]` padding mask (also the routing `valid` mask), additive
        `[B, 1, q, kv]` (0 attend, -inf block; kv covers the past too) or a flex_attention
        `BlockMask`. `valid` `[B, L]`:
        positions that vote in routing. `past_key_values`: a prefix's `key_values`, attended
        before the input (the input's routing blocks start at its first position).
        `mask_ratio` `[B, L]`: each position's noise level for expert choice's capacity schedule
        (training passes the sample's t; default: the block's masked fraction, as in decoding)."""
        b, n = input_ids.shape
        cfg = self.config
        if isinstance(attention_mask, Tensor) and attention_mask.dim() == 2:
            valid = attention_mask.bool() if valid is None else valid
            attention_mask = additive_mask(attention_mask)
        if position_ids is None:
            position_ids = torch.arange(n, device=input_ids.device).expand(b, n)
        if mask_ratio is None and cfg.routing.name == "expert_choice":
            mask_ratio = block_mask_fraction(input_ids == cfg.mask_token_id, cfg.routing.block_size)
        cos, sin = rope_cos_sin(position_ids, cfg.rotary_dim, cfg.rope_theta)
        x = self.get_input_embeddings()(input_ids)
        routing, key_values = [], []
        for i, layer in enumerate(self.model.layers):
            past = None if past_key_values is None else past_key_values[i]
            args = (x, cos, sin, attention_mask, valid, mask_ratio, past)
            if self.activation_checkpointing and self.training:
                x, r, kv = checkpoint(layer, *args, use_reentrant=False)
            else:
                x, r, kv = layer(*args)
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
        expert_cache: int | None = None,
    ) -> Any:
        from dmoe_train.models.model_dir import load_pretrained

        return load_pretrained(cls, path, dtype, device, routing, expert_cache)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 4 * 2**30) -> None:
        from dmoe_train.models.model_dir import save_pretrained

        save_pretrained(self, path, max_shard_bytes)


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
            if name.endswith(("dense.weight", "o_proj.weight", "down_proj.weight", "down_proj")):
                p.div_(math.sqrt(2 * len(getattr(model, "model", model).layers)))
