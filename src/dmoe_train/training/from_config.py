"""The training objects a resolved config describes (`dmoe-train` and the benchmarks build them
alike). The one place Hydra meets this layer: the LightningModule itself takes typed groups."""

from __future__ import annotations

from typing import Any

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig

from dmoe_train.objectives.regularizers import CoresetRegularizer
from dmoe_train.routing import RoutingPolicy
from dmoe_train.settings import settings_of
from dmoe_train.training.finetuner import RouterFineTuner
from dmoe_train.training.settings import FineTuneSettings


def load_routed_model(cfg: DictConfig, policy: RoutingPolicy, trainer: L.Trainer):
    """The config's model under `policy`; under FSDP on the meta device (every rank loads only
    its shards later). Objects go through partials: Hydra would turn a dataclass argument into a
    config node. The policy's settings that depend on the model are checked here."""
    sharded = isinstance(trainer.strategy, ModelParallelStrategy)
    with settings_of("router"):
        return instantiate(cfg.model, _partial_=True)(
            routing=policy, **({"device": "meta"} if sharded else {})
        )


def fine_tuner(
    model: Any,
    regularizer: CoresetRegularizer | None = None,
    optimizer: Any = None,
    scheduler: Any = None,
    **flat: Any,
) -> RouterFineTuner:
    """The `module` group's target: its flat keys as the typed groups of `FineTuneSettings`."""
    settings = FineTuneSettings.from_flat(**flat)
    extra = {"optimizer": optimizer} if optimizer is not None else {}
    return RouterFineTuner(model, settings, regularizer, scheduler=scheduler, **extra)


def build_module(cfg: DictConfig, model) -> RouterFineTuner:
    """The config's LightningModule around `model`, with its regularizer; a bad setting names
    its key (`module.distill_weight=...`)."""
    with settings_of("regularizer"):
        regularizer = instantiate(cfg.regularizer)
    with settings_of("module"):
        return instantiate(cfg.module, _partial_=True)(model=model, regularizer=regularizer)
