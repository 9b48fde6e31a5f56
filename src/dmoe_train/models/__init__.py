"""Model families and their loading entry points."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dmoe_train.models.families.diffusion_gemma import MODEL_TYPE as GEMMA
from dmoe_train.models.families.diffusion_gemma import load_diffusion_gemma
from dmoe_train.models.families.llada2 import PRESETS as LLADA2_PRESETS
from dmoe_train.models.families.llada2 import LLaDA2MoeConfig, LLaDA2MoeModelLM
from dmoe_train.models.families.llada_moe import MODEL_TYPES as LLADA_MOE_TYPES
from dmoe_train.models.families.llada_moe import TINY as TINY_LLADA_MOE
from dmoe_train.models.families.llada_moe import LLaDAMoeConfig, LLaDAMoeModelLM
from dmoe_train.models.lm import MoeDiffusionLM, init_weights
from dmoe_train.models.model_dir import require_model_dir
from dmoe_train.models.trainable import (
    TRAINABLE_SETS,
    TrainableSet,
    TrainableWeights,
    in_trainable_set,
    is_router_param,
)
from dmoe_train.routing import RoutingPolicy

__all__ = [
    "GEMMA",
    "model_type",
    "FAMILIES",
    "TRAINABLE_SETS",
    "TrainableSet",
    "TrainableWeights",
    "in_trainable_set",
    "LLaDA2MoeConfig",
    "LLaDA2MoeModelLM",
    "LLaDAMoeConfig",
    "LLaDAMoeModelLM",
    "MoeDiffusionLM",
    "build_model",
    "is_router_param",
    "load_model",
]

FAMILIES: dict[str, type[MoeDiffusionLM]] = {
    "llada2_moe": LLaDA2MoeModelLM,
    **dict.fromkeys(LLADA_MOE_TYPES, LLaDAMoeModelLM),
}
# preset name -> (family, config overrides)
PRESETS: dict[str, tuple[type[MoeDiffusionLM], dict]] = {
    **{name: (LLaDA2MoeModelLM, cfg) for name, cfg in LLADA2_PRESETS.items()},
    "tiny_lladamoe": (LLaDAMoeModelLM, TINY_LLADA_MOE),
    "llada_moe_7b": (LLaDAMoeModelLM, {}),
}


def model_type(path: Path) -> str:
    """The family a model directory's `config.json` names by its `model_type`."""
    found = json.loads((require_model_dir(path) / "config.json").read_text()).get(
        "model_type", "llada2_moe"
    )
    if found not in (*FAMILIES, GEMMA):
        raise ValueError(
            f"model path {path}: config.json model_type={found!r}, "
            f"supported: {sorted((*FAMILIES, GEMMA))}"
        )
    return found


def load_model(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    routing: RoutingPolicy | None = None,
    expert_cache: int | None = None,
) -> MoeDiffusionLM:
    """Load a model directory (published layout, family from its config.json); `routing`
    overrides its config's policy; `device="meta"`: without weights, for a sharded load;
    `expert_cache`: the routed experts stay in the files, that many per layer resident. A
    DiffusionGemma directory is transformers' own model with our routing installed
    (`families.diffusion_gemma`)."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    kind = model_type(Path(path))
    if kind == GEMMA:
        if expert_cache is not None:
            raise ValueError(f"model path {path}: no expert cache for DiffusionGemma yet")
        return load_diffusion_gemma(path, dtype=dtype, device=device, routing=routing)
    family = FAMILIES[kind]
    return family.from_pretrained(
        path, dtype=dtype, device=device, routing=routing, expert_cache=expert_cache
    )


def build_model(preset: str, seed: int = 0, **overrides) -> MoeDiffusionLM:
    """A randomly initialised model from a named preset (`tiny`, `llada2_mini`, `tiny_lladamoe`,
    `llada_moe_7b`) plus config overrides."""
    if preset not in PRESETS:
        raise ValueError(f"model preset={preset!r}: must be one of {sorted(PRESETS)}")
    family, config = PRESETS[preset]
    torch.manual_seed(seed)
    model = family(family.config_class(**{**config, **overrides}))
    init_weights(model)
    return model
