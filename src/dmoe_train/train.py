"""`dmoe-train`: compose the Hydra config, fine-tune the router, write `summary.json`."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.strategies import DeepSpeedStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from dmoe_train.callbacks import export_router
from dmoe_train.evaluate import GenerationSettings, evaluate_generation
from dmoe_train.launch import check_same_output_dir, multirun_job_relaunchable, run_id
from dmoe_train.lit_module import RouterFineTuner
from dmoe_train.router_io import load_router
from dmoe_train.routing import RoutingPolicy

PROJECT_ROOT = Path(__file__).resolve().parents[2]
OmegaConf.register_new_resolver("project_root", lambda: str(PROJECT_ROOT), replace=True)
OmegaConf.register_new_resolver("run_id", run_id, replace=True)


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
    return resuming


def measure(
    trainer: L.Trainer, module: RouterFineTuner, data, policy: RoutingPolicy, label: str
) -> dict[str, float]:
    """Validation loss and unique experts per block under `policy` (validation's own noise),
    through Lightning, so every strategy shards and reduces it; logged as `label/...`."""
    model = module.model
    previous = model.config.routing
    model.set_routing(policy)
    module.eval_label = label
    metrics = trainer.validate(module, datamodule=data, verbose=False)[0]
    model.set_routing(previous)
    module.eval_label = "val"
    return {
        k: metrics[f"{label}/{m}"]
        for k, m in (("val_loss", "lm_loss"), ("unique_experts", "unique_experts"))
    }


def check_data(cfg: DictConfig, policy: RoutingPolicy, data) -> None:
    """Data settings that must fit the routing, checked before the model is loaded."""
    if cfg.module.attention == "block_diffusion" and data.max_seq_len % policy.block_size:
        raise ValueError(
            f"data.max_seq_len={data.max_seq_len} is not a multiple of router.block_size="
            f"{policy.block_size}: the block-diffusion mask needs whole blocks"
        )


def check_tokenizer(cfg: DictConfig, model, data) -> None:
    if data.tokenizer.mask_token_id != model.config.mask_token_id:
        raise ValueError(
            f"the tokenizer of {cfg.model.path} has mask token id {data.tokenizer.mask_token_id},"
            f" the model's config.json mask_token_id={model.config.mask_token_id}"
        )


def run_info(cfg: DictConfig) -> dict:
    """What reproduces a run: the composed config, the git commit and the package versions."""
    git = subprocess.run(
        ["git", "-C", str(PROJECT_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    packages = ("dmoe-train", "torch", "lightning", "hydra-core", "transformers", "datasets")
    return {
        "config": OmegaConf.to_container(cfg, resolve=True),
        "git_commit": git.stdout.strip() or None,
        "versions": {p: version(p) for p in packages},
    }


def train(cfg: DictConfig) -> dict:
    L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resume_checkpoint(cfg, output_dir)
    checkpoints = output_dir / "checkpoints"
    try:  # an unwritable or full disk fails now, not after the first checkpoint interval
        checkpoints.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"paths.output_dir={output_dir}: cannot write ({err})") from err
    policy: RoutingPolicy = instantiate(cfg.router)
    data = instantiate(cfg.data, tokenizer_path=cfg.model.path)
    data.setup()  # data errors surface before the (for a 16B base, minutes long) model load
    check_data(cfg, policy, data)
    callbacks = [instantiate(c) for c in cfg.callbacks.values()]
    loggers = [instantiate(c) for c in (cfg.logger or {}).values()]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    # FSDP: every rank builds the model on the meta device and loads only its shards later
    sharded = isinstance(trainer.strategy, ModelParallelStrategy)
    if cfg.evaluate_after and isinstance(
        trainer.strategy, ModelParallelStrategy | DeepSpeedStrategy
    ):
        raise ValueError(
            f"evaluate_after=true decodes on rank 0 alone, which trainer.strategy="
            f"{type(trainer.strategy).__name__} cannot (weights may be sharded); run dmoe-eval on "
            "the exported router instead"
        )
    if trainer.is_global_zero:
        (checkpoints / "run_info.json").write_text(json.dumps(run_info(cfg), indent=2) + "\n")
    # objects go through partials: Hydra would turn a dataclass argument into a config node
    model = instantiate(cfg.model, _partial_=True)(
        routing=policy, **({"device": "meta"} if sharded else {})
    )
    check_tokenizer(cfg, model, data)
    if cfg.init_router:
        load_router(model, cfg.init_router, policy)
    regularizer = instantiate(cfg.regularizer)
    module = instantiate(cfg.module, _partial_=True)(model=model, regularizer=regularizer)

    token = RoutingPolicy("token", block_size=policy.block_size)
    before_token = measure(trainer, module, data, token, "token")
    check_same_output_dir(output_dir)  # the process group exists from the first validate on
    before = measure(trainer, module, data, policy, "before")
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except SIGTERMException:
        print(
            f"\nSIGTERM at step {trainer.global_step}: saved {checkpoints / 'last.ckpt'}; "
            f"relaunch with hydra.run.dir={output_dir} to resume"
        )
        return {"interrupted_at_step": trainer.global_step}
    after = measure(trainer, module, data, policy, "after")

    summary = {
        "policy": policy.to_dict(),
        "rule": policy.describe(),
        "regularizer": OmegaConf.to_container(cfg.regularizer),
        "steps": trainer.global_step,
        "world_size": trainer.world_size,
        "unique_experts_token": before_token["unique_experts"],
        "val_loss_token": before_token["val_loss"],
        "unique_experts_before": before["unique_experts"],
        "val_loss_before": before["val_loss"],
        "unique_experts_after": after["unique_experts"],
        "val_loss_after": after["val_loss"],
    }
    router = export_router(trainer, module, checkpoints, cfg.model.path, summary=summary)
    summary["router_checkpoint"] = str(router)
    if trainer.is_global_zero:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print_summary(summary, output_dir)
        if cfg.evaluate_after:
            settings = GenerationSettings(**cfg.generation)
            metrics = evaluate_generation(module.model.eval(), data, settings, "test")
            metrics |= {"summary": summary, "overrides": _overrides()}
            (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return summary


def _overrides() -> list[str]:
    """The command-line overrides of this (multi)run job, to label sweep rows."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def print_summary(s: dict, output_dir: Path) -> None:
    print(
        f"\nunique experts per block: token routing {s['unique_experts_token']:.2f} | "
        f"{s['rule']} before {s['unique_experts_before']:.2f} -> "
        f"after {s['unique_experts_after']:.2f}\n"
        f"validation loss:          token routing {s['val_loss_token']:.4f} | "
        f"before {s['val_loss_before']:.4f} -> after {s['val_loss_after']:.4f}\n"
        f"router checkpoint: {s['router_checkpoint']}\nsummary: {output_dir / 'summary.json'}"
    )


EXPECTED_ERRORS = (ValueError, OSError, FloatingPointError, InstantiationException)


def exit_on_error(run: Callable[[DictConfig], object], cfg: DictConfig) -> None:
    """Bad input ends the command with its message and exit code 1, not a traceback."""
    try:
        run(cfg)
    except EXPECTED_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)


@hydra.main(version_base="1.3", config_path=str(PROJECT_ROOT / "configs"), config_name="train")
def main(cfg: DictConfig) -> None:
    with multirun_job_relaunchable():
        exit_on_error(train, cfg)


if __name__ == "__main__":
    main()
