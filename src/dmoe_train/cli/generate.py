"""`dmoe-generate`: self-distillation data, the base's own decodes of a source's prompts.

    dmoe-generate data=skills data.train_skills=[add,sort] generation=tiny256 model=tiny256
    accelerate launch --num_processes 8 -m dmoe_train.cli.generate model=llada2_mini ...

Under `accelerate launch` every process decodes its own shards (on its own GPU, or the CPU).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from dmoe_train.cli.common import exit_on_error
from dmoe_train.evaluation.decoding import GenerationSettings
from dmoe_train.evaluation.self_generation import generate_split, summarize
from dmoe_train.locations import CONFIG_DIR
from dmoe_train.routing import RoutingPolicy

log = logging.getLogger(__name__)


def run_generate(cfg: DictConfig) -> dict | None:
    """Decode this process's missing shards; the main process then writes the summary."""
    if cfg.split not in ("train", "validation", "test"):
        raise ValueError(f"split={cfg.split}: must be train, validation or test")
    if not isinstance(cfg.shard_size, int) or cfg.shard_size < 1:
        raise ValueError(f"shard_size={cfg.shard_size}: must be an integer >= 1")
    settings = GenerationSettings(**cfg.generation)
    data = instantiate(cfg.data, tokenizer_path=cfg.model.path)
    data.setup()
    accelerator, rank, world = None, 0, 1
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch: data parallel
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        rank, world = accelerator.process_index, accelerator.num_processes
        device = accelerator.device
        model = instantiate(cfg.model, device="cpu" if device.type == "cpu" else str(device))
    else:
        model = instantiate(cfg.model)
    model.eval().set_routing(RoutingPolicy("token", block_size=settings.block_length))
    out_dir = Path(cfg.out_dir)
    with torch.no_grad():
        done = generate_split(
            model, data, settings, out_dir, cfg.split, cfg.shard_size, cfg.max_rows, rank, world
        )
    log.info("rank %d decoded %d shards into %s", rank, done, out_dir)
    if accelerator is not None:
        accelerator.wait_for_everyone()
        if not accelerator.is_main_process:
            return None
    source = {
        "model": cfg.model.path,
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "split": cfg.split,
    }
    summary = summarize(out_dir, settings, source)
    log.info(
        "kept %d of %d samples (%.1f%%; %d unfinished), %d agree with the reference; %s",
        summary["kept"],
        summary["prompts"],
        100 * summary["kept_fraction"],
        summary["unfinished"],
        summary["agrees_with_reference"],
        summary["train_on"],
    )
    return summary


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="generate")
def main(cfg: DictConfig) -> None:
    exit_on_error(run_generate, cfg)


if __name__ == "__main__":
    main()
