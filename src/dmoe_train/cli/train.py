"""`dmoe-train`: compose the Hydra config, fine-tune the router, write `summary.json`."""

from __future__ import annotations

import logging
import os
import subprocess
import zipfile
from dataclasses import dataclass, fields
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from dmoe_train.cli.common import exit_on_error, hydra_entry
from dmoe_train.evaluation.canvas_decoding import CanvasDecoding, decode_canvas_split
from dmoe_train.evaluation.split_decoding import GenerationSettings, decode_split, warn_if_few
from dmoe_train.files import write_json
from dmoe_train.locations import PROJECT_ROOT
from dmoe_train.models.adapted_weights import load_adapted
from dmoe_train.models.routing_control import is_canvas_model, policy_as
from dmoe_train.routing import RoutingPolicy
from dmoe_train.settings import settings_of
from dmoe_train.training.callbacks import save_adapted_weights
from dmoe_train.training.finetuner import RouterFineTuner
from dmoe_train.training.from_config import build_module, load_routed_model
from dmoe_train.training.run_dirs import (
    RUN_INFO,
    check_relaunch,
    check_same_output_dir,
    multirun_job_relaunchable,
)
from dmoe_train.training.settings import Checkpointing, OptimizerSettings, Schedule

log = logging.getLogger(__name__)


def resume_checkpoint(cfg: DictConfig, output_dir: Path) -> str | None:
    """`ckpt_path=` if given, else the run directory's own `last.ckpt` if it has one (a file, or
    a directory of shards under trainer=fsdp)."""
    last = output_dir / "checkpoints" / "last.ckpt"
    resuming = cfg.ckpt_path or (str(last) if last.exists() else None)
    if resuming and cfg.init_router:
        raise ValueError(
            f"init_router={cfg.init_router} starts a new run, but this run resumes from "
            f"{resuming}: give one of ckpt_path / init_router (or a fresh hydra.run.dir)"
        )
    if cfg.ckpt_path and not Path(cfg.ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path}: no such file")
    # a torch.save file is a zip archive, whose directory is at its end: a cut copy has none
    if resuming and Path(resuming).is_file() and not zipfile.is_zipfile(resuming):
        raise ValueError(f"checkpoint {resuming}: truncated or not a Lightning checkpoint")
    return resuming


def measure(
    trainer: L.Trainer, module: RouterFineTuner, data, policy: RoutingPolicy, label: str
) -> dict[str, float]:
    """Validation loss and unique experts per block under `policy` (validation's own noise),
    through Lightning, so every strategy shards and reduces it; logged as `label/...`. A canvas
    model adds its encoder's loss: the encoder keeps token routing, so what moves it is the
    router it shares with the decoder."""
    with policy_as(module.model, policy), module.labelled(label):
        metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    names = (("val_loss", "lm_loss"), ("unique_experts", "unique_experts"), ("encoder_loss",) * 2)
    return {k: metrics[f"{label}/{m}"] for k, m in names if f"{label}/{m}" in metrics}


def check_settings(cfg: DictConfig) -> None:
    """The training settings Lightning or torch would take (or refuse) only once the model is
    loaded and validated, checked before anything loads."""
    for group, typed in (
        ("trainer", Schedule),
        ("callbacks.model_checkpoint", Checkpointing),
        ("module.optimizer", OptimizerSettings),
    ):
        node = OmegaConf.select(cfg, group)
        names = {f.name for f in fields(typed)}
        with settings_of(group):
            typed(**{k: v for k, v in node.items() if k in names})


def check_data(cfg: DictConfig, policy: RoutingPolicy, data) -> None:
    """Data settings that must fit the routing, checked before the model is loaded."""
    if cfg.module.attention.startswith("block_diffusion") and data.max_seq_len % policy.block_size:
        raise ValueError(
            f"data.max_seq_len={data.max_seq_len} is not a multiple of router.block_size="
            f"{policy.block_size}: the block-diffusion mask needs whole blocks"
        )


def check_tokenizer(cfg: DictConfig, model, data) -> None:
    if is_canvas_model(model):  # uniform-state diffusion: no mask token, any id may be drawn
        vocab = model.config.text_config.vocab_size
        if len(data.tokenizer) > vocab:
            raise ValueError(
                f"the tokenizer of {cfg.model.path} has {len(data.tokenizer)} tokens, the "
                f"model's vocab_size={vocab}"
            )
        return
    if data.tokenizer.mask_token_id != model.config.mask_token_id:
        raise ValueError(
            f"the tokenizer of {cfg.model.path} has mask token id {data.tokenizer.mask_token_id},"
            f" the model's config.json mask_token_id={model.config.mask_token_id}"
        )


def run_info(record: dict) -> dict:
    """What reproduces a run: its config record (`check_relaunch`), the git commit and the
    package versions of this launch."""
    git = subprocess.run(
        ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    packages = ("dmoe-train", "torch", "lightning", "hydra-core", "transformers", "datasets")
    return {
        **record,
        "git_commit": git.stdout.strip() or None,
        "versions": {p: version(p) for p in packages},
    }


@dataclass
class Run:
    """What `build` composes from the config."""

    trainer: L.Trainer
    module: RouterFineTuner
    data: Any
    policy: RoutingPolicy
    output_dir: Path
    ckpt_path: str | None


def prepare_output(cfg: DictConfig) -> tuple[Path, str | None, dict]:
    """The run directory, checked writable now (not after the first checkpoint interval), the
    checkpoint to resume from and the run's config record (a relaunch under another
    configuration stops here). Nothing is written: a run refused later leaves no trace."""
    output_dir = Path(cfg.paths.output_dir)
    existing = next(p for p in (output_dir, *output_dir.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise OSError(f"paths.output_dir={output_dir}: cannot write ({existing} is not a "
                      "writable directory)")  # fmt: skip
    ckpt_path = resume_checkpoint(cfg, output_dir)
    config = OmegaConf.to_container(cfg, resolve=True)
    record = check_relaunch(output_dir, config, resuming=ckpt_path is not None)
    return output_dir, ckpt_path, record


def build(cfg: DictConfig) -> Run:
    """Data, trainer, model and module, each checked before the next costlier step."""
    check_settings(cfg)
    output_dir, ckpt_path, record = prepare_output(cfg)
    with settings_of("router"):
        policy: RoutingPolicy = instantiate(cfg.router)
    with settings_of("data"):
        data = instantiate(cfg.data, tokenizer_path=cfg.model.path)
        data.setup()
    check_data(cfg, policy, data)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    loggers = [instantiate(c) for c in (cfg.logger or {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    if cfg.evaluate_after and isinstance(
        trainer.strategy, ModelParallelStrategy | DeepSpeedStrategy
    ):
        raise ValueError(
            f"evaluate_after=true decodes on rank 0 alone, which trainer.strategy="
            f"{type(trainer.strategy).__name__} cannot (weights may be sharded); run dmoe-eval on "
            "the exported router instead"
        )
    if cfg.init_router and isinstance(trainer.strategy, ModelParallelStrategy):
        raise ValueError(
            f"init_router={cfg.init_router} with trainer.strategy=ModelParallelStrategy: the "
            "sharded model cannot take a router before it is sharded; use trainer=ddp"
        )
    model = load_routed_model(cfg, policy, trainer)
    check_tokenizer(cfg, model, data)
    module = build_module(cfg, model)
    if trainer.is_global_zero:  # every setting passed: the run starts
        (output_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        write_json(output_dir / "checkpoints" / RUN_INFO, run_info(record))
    return Run(trainer, module, data, policy, output_dir, ckpt_path)


def fit(run: Run) -> bool:
    """Train; False when SIGTERM stopped the run (its `last.ckpt` is saved; Ctrl-C saves too,
    and Lightning exits with code 1)."""
    try:
        run.trainer.fit(run.module, datamodule=run.data, ckpt_path=run.ckpt_path)
    except SIGTERMException:  # SaveOnSigterm saved and said so
        return False
    return True


def report(cfg: DictConfig, run: Run, measured: dict[str, dict[str, float]]) -> dict:
    """Export the router, write `summary.json` (and `metrics.json` under evaluate_after)."""
    trainer, policy = run.trainer, run.policy
    summary = {
        "policy": policy.to_dict(),
        "rule": policy.describe(),
        "regularizer": OmegaConf.to_container(cfg.regularizer),
        "steps": trainer.global_step,
        "world_size": trainer.world_size,
        **{f"{k}_{label}": v for label, m in measured.items() for k, v in m.items()},
    }
    checkpoints = run.output_dir / "checkpoints"
    router = save_adapted_weights(trainer, run.module, checkpoints, cfg.model.path, summary=summary)
    summary["router_checkpoint"] = str(router)
    if trainer.is_global_zero:
        write_json(run.output_dir / "summary.json", summary)
        log.info(format_summary(summary, run.output_dir))
        if cfg.evaluate_after:
            metrics = decode_test_split(cfg, run)
            metrics |= {"summary": summary, "overrides": _overrides()}
            write_json(run.output_dir / "metrics.json", metrics)
            log.info("test split decoded: %s", run.output_dir / "metrics.json")
    return summary


def decode_test_split(cfg: DictConfig, run: Run) -> dict:
    """The test split decoded by the adapted model (`evaluate_after=true`)."""
    model = run.module.model.eval()
    if is_canvas_model(model):
        with settings_of("generation"):
            canvas = CanvasDecoding(**cfg.generation)
        return decode_canvas_split(model, run.data, canvas, "test", cfg.seed)
    with settings_of("generation"):
        settings = GenerationSettings(**cfg.generation)
    warn_if_few(run.data, "test", settings)
    return decode_split(model, run.data, settings, "test").to_dict()


def train(cfg: DictConfig) -> dict:
    """Build, measure the base under token routing (the reference, before any `init_router`),
    then the starting router under the policy, fit, measure again, report."""
    L.seed_everything(cfg.seed, workers=True)
    run = build(cfg)
    token = RoutingPolicy("token", block_size=run.policy.block_size)
    measured = {"token": measure(run.trainer, run.module, run.data, token, "token")}
    check_same_output_dir(run.output_dir)  # the process group exists from the first validate on
    if cfg.init_router:
        load_adapted(run.module.model, cfg.init_router, run.policy)
        run.module.keep_teacher_weights(refresh=True)  # the teacher is the starting model
    measured["before"] = measure(run.trainer, run.module, run.data, run.policy, "before")
    if not fit(run):
        return {"interrupted_at_step": run.trainer.global_step}
    measured["after"] = measure(run.trainer, run.module, run.data, run.policy, "after")
    return report(cfg, run, measured)


def _overrides() -> list[str]:
    """The command-line overrides of this (multi)run job, to label sweep rows."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def format_summary(s: dict, output_dir: Path) -> str:
    return (
        f"\nunique experts per block: base, token routing {s['unique_experts_token']:.2f} | "
        f"{s['rule']} before {s['unique_experts_before']:.2f} -> "
        f"after {s['unique_experts_after']:.2f}\n"
        f"validation loss:          base, token routing {s['val_loss_token']:.4f} | "
        f"before {s['val_loss_before']:.4f} -> after {s['val_loss_after']:.4f}\n"
        + (
            f"encoder loss:             base, token routing {s['encoder_loss_token']:.4f} | "
            f"before {s['encoder_loss_before']:.4f} -> after {s['encoder_loss_after']:.4f}\n"
            if "encoder_loss_after" in s
            else ""
        )
        + f"adapted weights: {s['router_checkpoint']}\nsummary: {output_dir / 'summary.json'}"
    )


def job(cfg: DictConfig) -> None:
    with multirun_job_relaunchable():
        exit_on_error(train, cfg)


main = hydra_entry("train", job)


if __name__ == "__main__":
    main()
