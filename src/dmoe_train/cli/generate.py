"""`dmoe-generate`: self-distillation data, the base's own decodes of a source's prompts.

    dmoe-generate data=skills data.train_skills=[add,sort] generation=tiny256 model=tiny256
    accelerate launch --num_processes 8 -m dmoe_train.cli.generate model=llada2_mini ...

Under `accelerate launch` every process decodes its own shards (on its own GPU, or the CPU).
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dmoe_train.cli.common import exit_on_error, hydra_entry
from dmoe_train.evaluation.self_generation import (
    SUMMARY,
    check_out_dir,
    generate_split,
    rows_asked,
    summarize,
)
from dmoe_train.evaluation.split_decoding import GenerationSettings
from dmoe_train.routing import RoutingPolicy
from dmoe_train.settings import settings_of

log = logging.getLogger(__name__)


def recorded_settings(cfg: DictConfig, settings: GenerationSettings) -> dict:
    """What the shards depend on: the base, the data source and split, the seed, the decoding
    (`max_samples` aside: `max_rows` is the row budget here), the routing and the sharding."""
    decoding = {k: v for k, v in asdict(settings).items() if k != "max_samples"}
    return {
        "model": cfg.model.path,
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "split": cfg.split,
        "seed": cfg.seed,
        "decoding": decoding,
        "routing": "token",  # the base's own
        "shard_size": cfg.shard_size,
        "max_rows": cfg.max_rows,
    }


def run_generate(cfg: DictConfig) -> dict | None:
    """Decode this process's missing shards; the main process then writes the summary."""
    if cfg.split not in ("train", "validation", "test"):
        raise ValueError(f"split={cfg.split}: must be train, validation or test")
    for key, optional in (("shard_size", False), ("max_rows", True)):
        value = cfg[key]
        if not (optional and value is None) and (not isinstance(value, int) or value < 1):
            raise ValueError(f"{key}={value}: must be an integer >= 1")
    with settings_of("generation"):
        settings = GenerationSettings(**cfg.generation)
    out_dir = Path(cfg.out_dir)
    # hydra's own files of this job, when it runs in out_dir itself (hydra's path is absolute)
    ours = (
        HydraConfig.initialized()
        and Path(HydraConfig.get().runtime.output_dir).resolve() == out_dir.resolve()
    )
    record = recorded_settings(cfg, settings)
    check_out_dir(out_dir, record, (".hydra", "generate.log") * ours)
    with settings_of("data"):
        data = instantiate(cfg.data, tokenizer_path=cfg.model.path)
        data.setup()
    accelerator, rank, world = None, 0, 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch: data parallel
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        rank, world = accelerator.process_index, accelerator.num_processes
        # every rank has checked out_dir before any writes into it (else a rank that checks
        # late sees the others' first files and refuses the directory)
        accelerator.wait_for_everyone()
        device = accelerator.device
        model = instantiate(cfg.model, device="cpu" if device.type == "cpu" else str(device))
    else:
        model = instantiate(cfg.model)
    model.eval().set_routing(RoutingPolicy("token", block_size=settings.block_length))
    with torch.no_grad():
        done = generate_split(
            model, data, settings, out_dir, record, cfg.split, cfg.shard_size, cfg.max_rows,
            rank=rank, world=world,
        )  # fmt: skip
    log.info("rank %d decoded %d shards into %s", rank, done, out_dir)
    if accelerator is not None:
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return None
    summary = summarize(out_dir, rows_asked(data, cfg.split, cfg.max_rows), cfg.shard_size)
    log.info(
        "%s: kept %d of %d samples (%.1f%%; %d unfinished), %d agree with the reference; %s",
        out_dir / SUMMARY,
        summary["kept"],
        summary["prompts"],
        100 * summary["kept_fraction"],
        summary["unfinished"],
        summary["agrees_with_reference"],
        summary["train_on"],
    )
    return summary


def job(cfg: DictConfig) -> None:
    exit_on_error(run_generate, cfg)


main = hydra_entry("generate", job)


if __name__ == "__main__":
    main()
