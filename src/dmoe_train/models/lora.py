"""Low-rank adapters on the routed experts, built by `peft` (LoRA on parameters).

peft wraps the stacked expert tensors (`Experts.gate_proj` `[E, I, H]`, ...; transformers'
experts stack gate and up in one `gate_up_proj` `[E, 2I, H]`) with nested `ParamWrapper`s and
stores its factors in its own layout (`lora_A` `[r * E, in]`, `lora_B` `[out, r * E]`); saved
adapters are peft's. Its forward would add the dense delta of every expert to the weight (on
LLaDA2.0-mini 3 x 256 x 512 x 2048 values per MoE layer, 1.6 GB in bf16, kept for backward in
every layer); `SparseMoe` and `RoutedRowsLora` instead read the factors (`expert_low_rank`) and
add `scaling * (x A_e^T) B_e^T` for the tokens routed to expert e only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal, get_args

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model
from peft.tuners.lora.layer import ParamWrapper
from torch import Tensor, nn

from dmoe_train.models.grouped_experts import LowRank, stacked_expert_mlp
from dmoe_train.settings import refuse

ExpertProjection = Literal["gate_proj", "up_proj", "down_proj"]
PROJECTIONS: tuple[str, ...] = get_args(ExpertProjection)
ADAPTER = "default"  # peft's adapter name
# transformers' experts (DiffusionGemma's): the layer's `experts`, gate and up in one tensor
STACKED = {"gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


@dataclass(frozen=True)
class ExpertLora:
    """Adapters: rank, alpha (scaling alpha / rank) and which expert projections adapt."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[ExpertProjection, ...] = PROJECTIONS

    def __post_init__(self) -> None:
        object.__setattr__(self, "targets", tuple(self.targets))
        if not isinstance(self.rank, int) or self.rank < 1:
            raise refuse("rank", self.rank, "must be an integer >= 1")
        if not self.alpha > 0:
            raise refuse("alpha", self.alpha, "must be > 0")
        if not self.targets or set(self.targets) - set(PROJECTIONS):
            raise refuse("targets", list(self.targets), f"a subset of {PROJECTIONS}")

    def peft_config(self, stacked: bool = False) -> LoraConfig:
        """peft's config for our experts (`mlp.experts.<projection>`) or, `stacked`,
        transformers' (`experts.gate_up_proj`, `experts.down_proj`)."""
        targets = [f"mlp.experts.{t}" for t in self.targets]
        if stacked:
            if ("gate_proj" in self.targets) != ("up_proj" in self.targets):
                raise refuse(
                    "targets", list(self.targets), "gate_proj and up_proj are one tensor here "
                    "(experts.gate_up_proj): adapt both or neither",
                )  # fmt: skip
            targets = sorted({f"experts.{STACKED[t]}" for t in self.targets})
        return LoraConfig(
            r=self.rank, lora_alpha=self.alpha, target_modules=[], target_parameters=targets
        )

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}


def add_expert_lora(model: nn.Module, spec: ExpertLora) -> None:
    """Wrap every MoE layer's routed experts with peft's LoRA (B = 0: the model is unchanged).
    Layers whose experts are one set of tied tensors (DiffusionGemma's encoder and decoder) share
    one set of adapters, so that what a merge folds in is what every side computed with."""
    stacked = any(n.endswith("experts.gate_up_proj") for n, _ in model.named_parameters())
    share_tied_experts(model)
    inject_adapter_in_model(spec.peft_config(stacked), model, adapter_name=ADAPTER)
    share_tied_experts(model)
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, ParamWrapper) and hasattr(_base(experts), "gate_up_proj"):
            experts.__class__ = RoutedRowsLora


class RoutedRowsLora(ParamWrapper):
    """peft's wrapper of transformers' stacked experts (`forward(hidden, top_k_index,
    top_k_weights)`, an empty slot at weight 0), computing the adapters on the routed rows
    only, as `SparseMoe` does for ours."""

    def forward(self, hidden: Tensor, top_k_index: Tensor, top_k_weights: Tensor) -> Tensor:
        experts, low_rank = expert_low_rank(self)
        ids = top_k_index.masked_fill(top_k_weights == 0, -1)
        out = stacked_expert_mlp(
            hidden, ids, top_k_weights, experts.gate_up_proj, experts.down_proj, experts.act_fn,
            low_rank,
        )  # fmt: skip
        return out.to(hidden.dtype)


def _base(module: nn.Module) -> nn.Module:
    while isinstance(module, ParamWrapper):
        module = module.base_layer
    return module


def share_tied_experts(model: nn.Module) -> None:
    """Where two layers' `experts` modules hold the same tensors (tied weights), the later layer
    takes the earlier one's module, wrappers included."""
    first: dict[int, nn.Module] = {}
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.Module) or not (params := list(_base(experts).parameters())):
            continue
        owner = first.setdefault(id(params[0]), experts)
        if owner is not experts and isinstance(owner, ParamWrapper) >= isinstance(
            experts, ParamWrapper
        ):
            module.experts = owner


def peft_adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """The adapters as `PeftModel.save_pretrained` writes them (`base_model.model.` + peft's
    names). A wrapper tied layers share is written under each layer's name: peft's own model of
    the base wraps every layer apart and loads each from its own keys."""
    state = get_peft_model_state_dict(model)
    first: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, ParamWrapper):
            continue
        owner = first.setdefault(id(module), name)
        state |= {name + k[len(owner) :]: v for k, v in state.items() if k.startswith(owner + ".")}
    return {f"base_model.model.{k}": v.detach().cpu().clone() for k, v in state.items()}


def _copy(param: Tensor, whole: Tensor) -> None:
    param.copy_(whole)


@torch.no_grad()
def init_expert_lora(
    model: nn.Module, seed: int, assign: Callable[[Tensor, Tensor], None] = _copy
) -> None:
    """peft's start (A as `nn.Linear`'s kaiming-uniform init, B = 0) drawn from a generator
    keyed by `seed` and the parameter's name, so that a run starts from the same adapters in one
    process or several, sharded or not (`assign` writes a whole tensor into a parameter, e.g.
    this rank's shard of it)."""
    for name, param in model.named_parameters():
        if not is_lora_param(name):
            continue
        whole = torch.zeros(param.shape)
        if ".lora_A." in name:
            key = int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "big")
            gen = torch.Generator().manual_seed(key % 2**63)
            bound = 1 / math.sqrt(param.shape[1])  # kaiming_uniform_(a=sqrt(5)) over fan-in
            whole = (torch.rand(param.shape, generator=gen) * 2 - 1) * bound
        assign(param, whole.to(param.dtype))


def base_name(name: str) -> str:
    """A parameter's name in the base checkpoint: peft's wrappers nest it under `base_layer`."""
    return name.replace(".base_layer", "")


def has_expert_lora(model: nn.Module) -> bool:
    return any(isinstance(m, ParamWrapper) for m in model.modules())


def is_lora_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def expert_low_rank(experts: nn.Module) -> tuple[nn.Module, dict[str, LowRank]]:
    """The base `Experts` inside peft's wrappers and, per adapted projection, peft's factors
    `(lhs [E, out, r], rhs [E, r, in], scaling)`: delta = scaling * lhs @ rhs."""
    factors = {}
    while isinstance(experts, ParamWrapper):
        if not experts.merged and ADAPTER in experts.lora_A:
            factors[experts.parameter_name] = experts.get_delta_factors(ADAPTER)
        experts = experts.base_layer
    return experts, factors


def merge_expert_lora(model: nn.Module) -> None:
    """Fold every adapter into its expert tensor (peft's merge) and unwrap: the model's names
    and layout are the base's again, ready for `save_pretrained`."""
    for module in list(model.modules()):
        experts = getattr(module, "experts", None)
        if isinstance(experts, ParamWrapper):
            wrapper = experts
            while isinstance(wrapper, ParamWrapper):
                if not wrapper.merged:  # a wrapper tied layers share is met twice
                    wrapper.merge(adapter_names=[ADAPTER])
                wrapper = wrapper.base_layer
            module.experts = wrapper
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        vars(model).pop(
            attr, None
        )  # peft's marks on the instance (transformers' class keeps its own)
