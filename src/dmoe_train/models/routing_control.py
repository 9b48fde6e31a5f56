"""The routing of any model of ours, whatever its family: our LM's config holds its policy;
transformers' DiffusionGemma carries a `CanvasRouting` its routers follow."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from dmoe_train.models.families.diffusion_gemma import install_routing
from dmoe_train.routing import MoeSpec, RoutingPolicy


def is_canvas_model(model: nn.Module) -> bool:
    """A DiffusionGemma (encoder, canvas decoder) rather than one of our LMs."""
    return hasattr(model, "canvas_routing")


def policy_of(model: nn.Module) -> RoutingPolicy:
    return model.canvas_routing.policy if is_canvas_model(model) else model.config.routing


def moe_of(model: nn.Module) -> MoeSpec:
    return model.canvas_routing.moe if is_canvas_model(model) else model.config.moe


def set_policy(model: nn.Module, policy: RoutingPolicy) -> None:
    """Every MoE layer routes by `policy` from now on (the decoder's, for DiffusionGemma)."""
    if is_canvas_model(model):
        install_routing(model, policy, model.canvas_routing.encoder)
    else:
        model.set_routing(policy)


@contextmanager
def policy_as(model: nn.Module, policy: RoutingPolicy) -> Iterator[None]:
    """Route by `policy` inside the block; the previous policy comes back on leaving it."""
    previous = policy_of(model)
    set_policy(model, policy)
    try:
        yield
    finally:
        set_policy(model, previous)
