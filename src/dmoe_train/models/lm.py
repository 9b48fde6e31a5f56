"""The LM our families share: decoder layers (pre-norm attention and MLP, the MLP a MoE block
from `first_k_dense_replace` on) and the forward with its routing switches. A family file adds
its config, its attention projections and its checkpoint names."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dmoe_train.models.config import PublishedConfig
from dmoe_train.models.layers import KV, RMSNorm, additive_mask, block_mask_fraction, rope_cos_sin
from dmoe_train.models.model_dir import load_pretrained, save_pretrained
from dmoe_train.models.moe import SparseMoe
from dmoe_train.routing import Routing, RoutingPolicy


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
        return load_pretrained(cls, path, dtype, device, routing, expert_cache)

    def save_pretrained(self, path: str | Path, max_shard_bytes: int = 4 * 2**30) -> None:
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
