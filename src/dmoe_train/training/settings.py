"""The fine-tuning run's settings as typed groups, each validated where it is built: the
`module.*` keys of the config, flat there (`module.distill_weight`), each the field of one group
here under the same name."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, get_args

from dmoe_train.models import TrainableWeights
from dmoe_train.models.block_diffusion import AttentionMode
from dmoe_train.objectives.curriculum import Curriculum
from dmoe_train.objectives.distillation import Distillation
from dmoe_train.objectives.masked_diffusion import Noise
from dmoe_train.objectives.uniform_diffusion import CanvasObjective
from dmoe_train.settings import SettingError, refuse


@dataclass(frozen=True)
class StepSettings:
    """How a step runs: `attention` of the noised forward (`block_diffusion`: LLaDA2's
    block-causal mask; `_flex`: flex_attention; `full`), the router `z_loss_weight`, the
    load-balancing `balance_weight` (bases trained from scratch), how many
    batches with a non-finite loss to skip before the run stops, activation checkpointing, and
    the seed that keys every sample's noise."""

    attention: AttentionMode = "block_diffusion"
    z_loss_weight: float = 0.0
    balance_weight: float = 0.0
    max_bad_batches: int = 0
    activation_checkpointing: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.attention not in get_args(AttentionMode):
            raise refuse("attention", repr(self.attention), f"one of {get_args(AttentionMode)}")
        if not self.z_loss_weight >= 0:
            raise refuse("z_loss_weight", self.z_loss_weight, "must be >= 0")
        if not self.balance_weight >= 0:
            raise refuse("balance_weight", self.balance_weight, "must be >= 0")
        if not isinstance(self.max_bad_batches, int) or self.max_bad_batches < 0:
            raise refuse("max_bad_batches", self.max_bad_batches, "must be an integer >= 0")


@dataclass(frozen=True)
class FineTuneSettings:
    """What the LightningModule is told beside its model, optimizer and regularizer."""

    noise: Noise = Noise()
    canvas: CanvasObjective = CanvasObjective()  # DiffusionGemma's objective beside the noise
    distillation: Distillation = Distillation()
    curriculum: Curriculum = Curriculum()
    weights: TrainableWeights = TrainableWeights()
    step: StepSettings = StepSettings()

    @classmethod
    def from_flat(cls, **flat: Any) -> FineTuneSettings:
        """The groups from flat keys, each the field of one group; an unknown key or a bad
        value raises naming it."""
        groups = {f.name: type(f.default) for f in fields(cls)}
        known = {g.name for group in groups.values() for g in fields(group)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise SettingError(unknown[0], ": unknown (not a setting of the fine-tuner)")
        return cls(
            **{
                name: group(
                    **{k: v for k, v in flat.items() if k in {g.name for g in fields(group)}}
                )
                for name, group in groups.items()
            }
        )


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


@dataclass(frozen=True)
class Schedule:
    """The `trainer` settings Lightning would take (or refuse) only once the model is loaded:
    checked before anything loads. `max_steps` 0 is refused: `dmoe-eval` measures without
    training."""

    max_steps: int
    accumulate_grad_batches: int = 1
    log_every_n_steps: int = 50
    val_check_interval: int | float = 1.0

    def __post_init__(self) -> None:
        for key in ("max_steps", "accumulate_grad_batches", "log_every_n_steps"):
            if not _positive_int(getattr(self, key)):
                requirement = "must be an integer >= 1"
                if key == "max_steps":
                    requirement += " (dmoe-eval measures without training)"
                raise refuse(key, getattr(self, key), requirement)
        v = self.val_check_interval
        if not (_positive_int(v) or (isinstance(v, float) and 0 < v <= 1)):
            raise refuse(
                "val_check_interval", v, "must be an integer >= 1 (steps) or a fraction in (0, 1]"
            )


@dataclass(frozen=True)
class Checkpointing:
    """`callbacks.model_checkpoint.every_n_train_steps`: 0 saves only at the end."""

    every_n_train_steps: int = 0

    def __post_init__(self) -> None:
        v = self.every_n_train_steps
        if not (_positive_int(v) or v == 0):
            raise refuse("every_n_train_steps", v, "must be an integer >= 1 (0: no periodic saves)")


@dataclass(frozen=True)
class OptimizerSettings:
    """`module.optimizer`'s learning rate and weight decay (whatever the optimizer class)."""

    lr: float
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if not (isinstance(self.lr, int | float) and self.lr > 0):
            raise refuse("lr", self.lr, "must be a number > 0")
        if not (isinstance(self.weight_decay, int | float) and self.weight_decay >= 0):
            raise refuse("weight_decay", self.weight_decay, "must be a number >= 0")
