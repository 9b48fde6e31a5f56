"""The configs' `${project_root:}`, `${assets:}` and `${run_id:}` resolvers, registered on import:
whatever composes `configs/` (the entry points, the studies) imports this module first."""

from __future__ import annotations

from omegaconf import OmegaConf

from dmoe_train.locations import ASSETS, CONFIG_DIR, PROJECT_ROOT
from dmoe_train.training.run_dirs import run_id

__all__ = ["ASSETS", "CONFIG_DIR", "PROJECT_ROOT"]

OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
OmegaConf.register_new_resolver("run_id", run_id, replace=True)
OmegaConf.register_new_resolver("assets", lambda: str(ASSETS), replace=True)
