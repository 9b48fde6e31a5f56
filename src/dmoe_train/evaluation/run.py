"""`dmoe-eval`'s work as functions of its resolved config (`configs/eval.yaml`): decode a split
under a routing policy, beside the base under token routing; the metrics table. The studies call
these in-process."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from dmoe_train.evaluation.decoding import (
    GenerationSettings,
    apply_expert_cache,
    evaluate_generation,
    experts_in_files,
)
from dmoe_train.files import write_json
from dmoe_train.models.adapted_weights import changes_routed_experts, load_router
from dmoe_train.routing import RoutingPolicy

log = logging.getLogger(__name__)


def prepare_eval(
    cfg: DictConfig, routed: bool = True
) -> tuple[torch.nn.Module, Any, GenerationSettings]:
    """The model, the data and the decoding settings of an evaluation config; the model under
    its routing (`route`) unless `routed=False` (the base as loaded)."""
    settings = GenerationSettings(**cfg.generation)
    data = instantiate(cfg.data, tokenizer_path=cfg.model.path)
    data.setup()  # data errors surface before the model load
    model = instantiate(cfg.model, expert_cache=experts_in_files(settings))
    if routed:
        route(model, cfg, settings)
    return model, data, settings


def route(model: torch.nn.Module, cfg: DictConfig, settings: GenerationSettings) -> None:
    """Apply the router checkpoint (its policy, or `router=`) or the `router=` policy, then
    `generation.expert_cache`."""
    routing = instantiate(cfg.router) if cfg.get("router") else None
    experts_changed = False
    if cfg.router_checkpoint:
        manifest = load_router(model, cfg.router_checkpoint, routing)
        experts_changed = changes_routed_experts(manifest)
    elif routing is not None:
        model.set_routing(routing)
    policy = model.config.routing
    if policy.uses_blocks and policy.block_size != settings.block_length:
        raise ValueError(
            f"router.block_size={policy.block_size} != generation.block_length="
            f"{settings.block_length}: routing blocks must be the decoding blocks"
        )
    apply_expert_cache(model, settings, experts_changed)


def run_eval(cfg: DictConfig) -> dict:
    """Decode `split` under the config's routing; with `reference_token`, first the base as
    loaded (its own router, never the checkpoint's) under token routing on the same prompts:
    the reference of `accuracy_retained`."""
    if cfg.split not in ("validation", "test"):
        raise ValueError(f"split={cfg.split}: must be validation or test")
    model, data, settings = prepare_eval(cfg, routed=False)
    token = None
    if cfg.reference_token:
        with model.routing_as(RoutingPolicy("token", block_size=settings.block_length)):
            token = evaluate_generation(model, data, settings, cfg.split)
    route(model, cfg, settings)
    metrics = evaluate_generation(model, data, settings, cfg.split)
    metrics["router_checkpoint"] = cfg.router_checkpoint
    if token is not None:
        metrics |= {
            "accuracy_token": token["accuracy"],
            "accuracy_retained": metrics["accuracy"] / max(token["accuracy"], 1e-9),
            "unique_experts_token": token["unique_experts_per_block"],
            "expert_bytes_fraction": metrics["unique_experts_per_block"]
            / token["unique_experts_per_block"],
        }
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    log.info("\n%s", format_table([metrics]))
    return metrics


def _vs_token(m: dict) -> str:
    return f"{m['latency_vs_token']:.2f}" if "latency_vs_token" in m else "-"


COLUMNS = (
    ("policy", lambda m: m["policy"]["name"]),
    ("rule", lambda m: RoutingPolicy(**m["policy"]).rule),
    ("unique experts/block", lambda m: f"{m['unique_experts_per_block']:.2f}"),
    ("masked only", lambda m: f"{m['unique_experts_per_block_masked']:.2f}"),
    ("accuracy", lambda m: f"{m['accuracy']:.3f}"),
    ("retained", lambda m: f"{m.get('accuracy_retained', float('nan')):.3f}"),
    ("expert MB/block", lambda m: f"{m['expert_bytes_per_block'] / 2**20:.2f}"),
    ("forwards/block", lambda m: f"{m['forwards_per_block']:.2f}"),
    ("expert KB/token", lambda m: f"{m['expert_bytes_per_generated_token'] / 2**10:.1f}"),
    ("load CV", lambda m: f"{m['load_balance_cv']:.2f}"),
    ("experts/token", lambda m: f"{m['experts_per_token']:.2f}"),
    ("expert MFLOPs/token", lambda m: f"{m['expert_flops_per_token'] / 1e6:.2f}"),
    # with `interleaved_latency` (make compare): the median ratio to token routing
    (
        "latency vs token",
        _vs_token,
    ),
)


def format_table(rows: list[dict], names: list[str] | None = None) -> str:
    """A markdown table of metrics rows (`names` label them, default: the policy)."""
    head = ["run", *(c for c, _ in COLUMNS)] if names else [c for c, _ in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, m in enumerate(rows):
        cells = [fmt(m) for _, fmt in COLUMNS]
        lines.append("| " + " | ".join(([names[i]] if names else []) + cells) + " |")
    return "\n".join(lines)
