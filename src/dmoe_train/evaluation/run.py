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

from dmoe_train.evaluation.canvas_decoding import CanvasDecoding, decode_canvas_split
from dmoe_train.evaluation.split_decoding import (
    GenerationSettings,
    apply_expert_cache,
    check_expert_store,
    decode_split,
    experts_in_files,
    warn_if_few,
)
from dmoe_train.files import write_json
from dmoe_train.models import GEMMA, model_type
from dmoe_train.models.adapted_weights import base_fingerprint, export_base, load_adapted
from dmoe_train.models.routing_control import policy_as, set_policy
from dmoe_train.reports import markdown_table
from dmoe_train.routing import RoutingPolicy
from dmoe_train.settings import settings_of

log = logging.getLogger(__name__)


def prepare_eval(
    cfg: DictConfig, routed: bool = True
) -> tuple[torch.nn.Module, Any, GenerationSettings]:
    """The model, the data and the decoding settings of an evaluation config; the model under
    its routing (`apply_routing`) unless `routed=False` (the base as loaded)."""
    data, settings = checked_inputs(cfg)
    model = load_eval_model(cfg, settings)
    if routed:
        apply_routing(model, cfg, settings)
    return model, data, settings


def checked_inputs(cfg: DictConfig) -> tuple[Any, GenerationSettings]:
    """The data (set up) and decoding settings of an evaluation config: their errors surface
    before any model loads."""
    with settings_of("generation"):
        settings = GenerationSettings(**cfg.generation)
    check_expert_store(settings, cfg.router_checkpoint)
    with settings_of("data"):
        data = instantiate(cfg.data, tokenizer_path=cfg.model.path)
        data.setup()
    return data, settings


def load_eval_model(
    cfg: DictConfig, settings: GenerationSettings, path: Path | None = None
) -> torch.nn.Module:
    """The config's model (or the one at `path`, as the config loads it), its experts left in
    the files under the disk store."""
    where = {"path": str(path)} if path is not None else {}
    return instantiate(cfg.model, expert_cache=experts_in_files(settings), **where)


def apply_routing(model: torch.nn.Module, cfg: DictConfig, settings: GenerationSettings) -> None:
    """Apply the adapted weights (their policy, or `router=`) or the `router=` policy, then
    `generation.expert_cache`."""
    with settings_of("router"):
        routing = instantiate(cfg.router) if cfg.get("router") else None
        if cfg.router_checkpoint:
            load_adapted(model, cfg.router_checkpoint, routing)
        elif routing is not None:
            model.set_routing(routing)
    policy = model.config.routing
    if policy.uses_blocks and policy.block_size != settings.block_length:
        raise ValueError(
            f"router.block_size={policy.block_size} != generation.block_length="
            f"{settings.block_length}: routing blocks must be the decoding blocks"
        )
    apply_expert_cache(model, settings)


def token_reference(
    cfg: DictConfig, settings: GenerationSettings
) -> tuple[torch.nn.Module | None, str]:
    """The model whose token routing `accuracy_retained` is measured against, when it is not
    the config's model as loaded (None: it is: the base, with its own router, never a
    checkpoint's), and whose it is, in words. For an export (`dmoe-export`) it is the base the
    export was made from, when that directory is at hand and still is that base."""
    model_path = Path(cfg.model.path)
    exported = export_base(model_path)
    if exported is None:
        return None, f"{model_path} (the base) under token routing"
    base, fingerprint = exported
    itself = f"the export {model_path} itself under token routing (its adapted router)"
    if not (base / "config.json").is_file():
        return None, f"{itself}: its base {base} is not at hand"
    model = load_eval_model(cfg, settings, base)
    if base_fingerprint(model) != fingerprint:
        return None, f"{itself}: {base} is no longer the base it was exported from"
    return model, f"{base} under token routing (the base {model_path} was exported from)"


def retained(accuracy: float, reference: float) -> float | None:
    """The share of the reference's exact match kept; undefined (None) when the reference
    scored 0."""
    return accuracy / reference if reference > 0 else None


def run_eval(cfg: DictConfig) -> dict:
    """Decode `split` under the config's routing; with `reference_token`, first the reference
    (`token_reference`) under token routing on the same prompts: the reference of
    `accuracy_retained`."""
    if cfg.split not in ("validation", "test"):
        raise ValueError(f"split={cfg.split}: must be validation or test")
    if model_type(Path(cfg.model.path)) == GEMMA:
        return run_canvas_eval(cfg)
    data, settings = checked_inputs(cfg)
    warn_if_few(data, cfg.split, settings)
    model = token = reference = None
    if cfg.reference_token:
        base, reference = token_reference(cfg, settings)
        log.info("accuracy_retained against %s", reference)
        scored = base or (model := load_eval_model(cfg, settings))
        with scored.routing_as(RoutingPolicy("token", block_size=settings.block_length)):
            token = decode_split(scored, data, settings, cfg.split)
        del base, scored  # an export's base is decoded before the export loads
    model = model or load_eval_model(cfg, settings)
    apply_routing(model, cfg, settings)
    measured = decode_split(model, data, settings, cfg.split)
    metrics = measured.to_dict() | {"router_checkpoint": cfg.router_checkpoint}
    if token is not None:
        metrics |= {
            "reference": reference,
            "accuracy_token": token.accuracy,
            "accuracy_retained": retained(measured.accuracy, token.accuracy),
            "unique_experts_token": token.unique_experts_per_block,
            "expert_bytes_fraction": measured.unique_experts_per_block
            / token.unique_experts_per_block,
        }
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    log.info("\n%s\nmetrics: %s", format_table([metrics]), out / "metrics.json")
    return metrics


def _vs_token(m: dict) -> str:
    return f"{m['latency_vs_token']:.2f}" if "latency_vs_token" in m else "-"


def _retained(m: dict) -> str:
    if "accuracy_retained" not in m:
        return "-"  # no reference decoded
    share = m["accuracy_retained"]
    return "undefined (reference 0)" if share is None else f"{share:.3f}"


COLUMNS = (
    ("policy", lambda m: m["policy"]["name"]),
    ("rule", lambda m: RoutingPolicy.from_record(m["policy"]).rule),
    ("unique experts/block", lambda m: f"{m['unique_experts_per_block']:.2f}"),
    ("masked only", lambda m: f"{m['unique_experts_per_block_masked']:.2f}"),
    ("accuracy", lambda m: f"{m['accuracy']:.3f}"),
    ("retained", _retained),
    ("expert MB/block", lambda m: f"{m['expert_bytes_per_block'] / 2**20:.2f}"),
    ("forwards/block", lambda m: f"{m['forwards_per_block']:.2f}"),
    ("expert KB/token", lambda m: f"{m['expert_bytes_per_generated_token'] / 2**10:.1f}"),
    ("load CV", lambda m: f"{m['load_balance_cv']:.2f}"),
    ("experts/token", lambda m: f"{m['experts_per_token']:.2f}"),
    ("expert MFLOPs/token", lambda m: f"{m['expert_flops_per_token'] / 1e6:.2f}"),
    # with `interleaved_latency` (make compare): the median ratio to token routing
    ("latency vs token", _vs_token),
)
# under generation.expert_cache (`cache_metrics`): what the resident experts cost and saved
CACHE_COLUMNS = (
    ("expert cache", lambda m: str(m["expert_cache"])),
    ("MB loaded/block", lambda m: f"{m['expert_bytes_loaded_per_block'] / 2**20:.2f}"),
    ("hits in block", lambda m: f"{m['cache_hits_within_block']:.3f}"),
    ("hits across blocks", lambda m: f"{m['cache_hits_across_blocks']:.3f}"),
    ("peak resident MB", lambda m: f"{m['peak_resident_expert_bytes'] / 2**20:.1f}"),
)

# DiffusionGemma's canvases (`run_canvas_eval`): the block columns they share, and their own
_SHARED = dict(COLUMNS)
CANVAS_COLUMNS = (
    *((c, _SHARED[c]) for c in ("policy", "rule", "unique experts/block")),
    ("unique experts/canvas", lambda m: f"{m['unique_experts_per_canvas']:.2f}"),
    ("forwards/canvas", lambda m: f"{m['forwards_per_canvas']:.2f}"),
    ("tokens/forward", lambda m: f"{m['tokens_per_forward']:.2f}"),
    *((c, _SHARED[c]) for c in ("accuracy", "retained", "expert KB/token")),
)


def format_table(rows: list[dict], names: list[str] | None = None, columns: tuple = COLUMNS) -> str:
    """A markdown table of metrics rows (`names` label them, default: the policy) in `columns`
    (`CANVAS_COLUMNS` for DiffusionGemma's canvases); the cache's columns when a row decoded
    under `generation.expert_cache`."""
    if any("expert_cache" in m for m in rows):
        columns += tuple(
            (c, lambda m, f=f: f(m) if "expert_cache" in m else "-") for c, f in CACHE_COLUMNS
        )
    head = ["run", *(c for c, _ in columns)] if names else [c for c, _ in columns]
    return markdown_table(
        head,
        (
            [*([names[i]] if names else []), *(fmt(m) for _, fmt in columns)]
            for i, m in enumerate(rows)
        ),
    )


def run_canvas_eval(cfg: DictConfig) -> dict:
    """`run_eval` for DiffusionGemma: transformers' `generate` under the base's token routing
    (the reference), then under the config's routing, on the same prompts and sampler seed."""
    with settings_of("generation"):
        settings = CanvasDecoding(**cfg.generation)
    with settings_of("data"):
        data = instantiate(cfg.data, tokenizer_path=cfg.model.path)
        data.setup()
    model, token = instantiate(cfg.model), None
    if cfg.reference_token:
        with policy_as(model, RoutingPolicy("token", block_size=settings.block_length)):
            token = decode_canvas_split(model, data, settings, cfg.split, cfg.seed)
    with settings_of("router"):
        routing = instantiate(cfg.router) if cfg.get("router") else None
        if cfg.router_checkpoint:
            load_adapted(model, cfg.router_checkpoint, routing)
        elif routing is not None:
            set_policy(model, routing)
    metrics = decode_canvas_split(model, data, settings, cfg.split, cfg.seed)
    metrics["router_checkpoint"] = cfg.router_checkpoint
    if token is not None:
        metrics |= {
            "reference": f"{cfg.model.path} (the base) under token routing",
            "accuracy_token": token["accuracy"],
            "accuracy_retained": retained(metrics["accuracy"], token["accuracy"]),
            "unique_experts_token": token["unique_experts_per_block"],
            "unique_experts_per_canvas_token": token["unique_experts_per_canvas"],
        }
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    log.info(
        "\n%s\nmetrics: %s", format_table([metrics], columns=CANVAS_COLUMNS), out / "metrics.json"
    )
    return metrics
