"""The configs' `${project_root:}`, `${assets:}` and `${run_id:}` resolvers, registered on import:
whatever composes `configs/` (the entry points, the studies) imports this module first;
`composed` composes them from code."""

from __future__ import annotations

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from dmoe_train.locations import ASSETS, CONFIG_DIR, PROJECT_ROOT
from dmoe_train.training.run_dirs import run_id

__all__ = ["ASSETS", "CONFIG_DIR", "PROJECT_ROOT"]

OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
OmegaConf.register_new_resolver("run_id", run_id, replace=True)
OmegaConf.register_new_resolver("assets", lambda: str(ASSETS), replace=True)


def composed(config: str, overrides: list[str]) -> DictConfig:
    """The package's config `config` (`train`, `eval`) composed with `overrides`, as its command
    line composes it."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config, overrides)
