"""The training objects a resolved config describes (`dmoe-train` and the benchmarks build them
alike). The one place Hydra meets this layer: the LightningModule itself takes plain objects."""

from __future__ import annotations

import lightning as L
from hydra.utils import instantiate
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig

from dmoe_train.routing import RoutingPolicy
from dmoe_train.training.finetuner import RouterFineTuner


def load_routed_model(cfg: DictConfig, policy: RoutingPolicy, trainer: L.Trainer):
    """The config's model under `policy`; under FSDP on the meta device (every rank loads only
    its shards later). Objects go through partials: Hydra would turn a dataclass argument into a
    config node."""
    sharded = isinstance(trainer.strategy, ModelParallelStrategy)
    return instantiate(cfg.model, _partial_=True)(
        routing=policy, **({"device": "meta"} if sharded else {})
    )


def build_module(cfg: DictConfig, model) -> RouterFineTuner:
    """The config's LightningModule around `model`, with its regularizer."""
    regularizer = instantiate(cfg.regularizer)
    return instantiate(cfg.module, _partial_=True)(model=model, regularizer=regularizer)
