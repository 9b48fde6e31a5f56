"""The config base of our families: the published `config.json` keys they use are fields, the
others are kept and written back; `routing` is ours."""

from __future__ import annotations

import json
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, ClassVar

from dmoe_train.routing import MoeSpec, RoutingPolicy, policy_from_engine_config


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
