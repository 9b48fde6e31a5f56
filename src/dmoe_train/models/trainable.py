"""What trains: the one predicate that marks the trainable weights and filters what every
checkpoint of ours saves."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

from dmoe_train.models.lora import ExpertLora, is_lora_param
from dmoe_train.settings import refuse, settings_of

TrainableSet = Literal[
    "router", "router+shared", "router+dense", "router+lora", "router+lora+shared",
    "router+experts", "all",
]  # fmt: skip
TRAINABLE_SETS: tuple[str, ...] = get_args(TrainableSet)


ROUTER_SUFFIXES = (
    ".mlp.gate.weight", ".mlp.gate.expert_bias",  # our families
    ".router.proj.weight", ".router.scale", ".router.per_expert_scale",  # DiffusionGemma
)  # fmt: skip
ROUTED_EXPERT_SUFFIXES = (".experts.gate_up_proj", ".experts.down_proj")  # DiffusionGemma's
DENSE_MLP_SUFFIXES = (".mlp.gate_proj.weight", ".mlp.up_proj.weight", ".mlp.down_proj.weight")


def is_router_param(name: str) -> bool:
    """The router's tensors: what router fine-tuning trains and a router checkpoint holds."""
    return name.endswith(ROUTER_SUFFIXES)


def in_trainable_set(name: str, trainable: TrainableSet) -> bool:
    """Whether a weight trains under `trainable`: the router (the default), and besides it the
    shared experts (`+shared`), DiffusionGemma's dense MLP beside its experts (`+dense`, the
    shared expert's analogue), low-rank adapters on the routed experts (`+lora`, see
    `models.lora`) or the routed experts themselves (`+experts`); `all`: every weight (a full
    fine-tune)."""
    if trainable == "all" or is_router_param(name):
        return True
    parts = trainable.split("+")[1:]
    experts = ".mlp.experts." in name or name.endswith(ROUTED_EXPERT_SUFFIXES)
    return (
        ("shared" in parts and ".mlp.shared_experts." in name)
        or ("dense" in parts and name.endswith(DENSE_MLP_SUFFIXES) and "shared" not in name)
        or ("lora" in parts and is_lora_param(name))
        or ("experts" in parts and experts)
    )


@dataclass(frozen=True)
class TrainableWeights:
    """The trainable set; `train_expert_bias`: LLaDA2's balancing bias trains too (it is
    balancing state, not a weight: by default it does not); `lora`: the adapters of the `+lora`
    sets (rank, alpha, targets), None for the others."""

    trainable: TrainableSet = "router"
    train_expert_bias: bool = False
    lora: ExpertLora | Mapping | None = None

    def __post_init__(self) -> None:
        if self.trainable not in TRAINABLE_SETS:
            raise refuse("trainable", repr(self.trainable), f"must be one of {TRAINABLE_SETS}")
        adapters = "lora" in self.trainable.split("+")
        lora = self.lora if adapters else None
        if adapters and not isinstance(lora, ExpertLora):
            with settings_of("lora"):
                lora = ExpertLora(**(lora or {}))
        object.__setattr__(self, "lora", lora)

    def is_trainable(self, name: str) -> bool:
        """The one predicate for what trains and what every checkpoint of ours saves."""
        name = name.removeprefix("model.")
        if name.endswith("expert_bias"):
            return self.train_expert_bias and is_router_param(name)
        return in_trainable_set(name, self.trainable)
