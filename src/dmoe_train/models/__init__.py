"""Model families and their loading entry points."""

from __future__ import annotations

from pathlib import Path

import torch

from dmoe_train.models.llada2_moe import (
    PRESETS,
    LLaDA2MoeConfig,
    LLaDA2MoeModelLM,
    init_weights,
    is_router_param,
)
from dmoe_train.routing import RoutingPolicy

__all__ = [
    "LLaDA2MoeConfig",
    "LLaDA2MoeModelLM",
    "build_model",
    "is_router_param",
    "load_model",
]


def load_model(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    routing: RoutingPolicy | None = None,
) -> LLaDA2MoeModelLM:
    """Load a model directory (published layout); `routing` overrides its config's policy."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return LLaDA2MoeModelLM.from_pretrained(path, dtype=dtype, device=device, routing=routing)


def build_model(preset: str, seed: int = 0, **overrides) -> LLaDA2MoeModelLM:
    """A randomly initialised model from a named preset (`tiny`, `llada2_mini`) plus overrides."""
    if preset not in PRESETS:
        raise ValueError(f"model preset={preset!r}: must be one of {sorted(PRESETS)}")
    torch.manual_seed(seed)
    model = LLaDA2MoeModelLM(LLaDA2MoeConfig(**{**PRESETS[preset], **overrides}))
    init_weights(model)
    return model
