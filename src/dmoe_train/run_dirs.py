"""Hydra with multi-process launches: one run directory per run, whoever starts the processes.

- `torchrun` / `srun` start every rank: each rank composes the config itself, so the run directory
  must not depend on each process's clock: `run_id` names it after the launcher's job id.
- Lightning's own launcher (`python -m dmoe_train.cli.train trainer=ddp`) restarts `sys.argv` for
  ranks > 0 with `hydra.run.dir` set; `multirun_job_relaunchable` makes that work in a `-m` sweep.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import read_write

STARTED = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")


def run_id() -> str:
    """`srun` with several tasks: the SLURM job and step; `torchrun`: its rendezvous id (unless
    "none", its default for static multi-node launches); else this process's start time."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in env:
        return f"slurm-{env['SLURM_JOB_ID']}.{env['SLURM_STEP_ID']}"
    if env.get("TORCHELASTIC_RUN_ID", "none") != "none":
        return f"torchrun-{env['TORCHELASTIC_RUN_ID']}"
    return STARTED


def check_same_output_dir(output_dir: Path) -> None:
    """Ranks that composed different run directories would scatter checkpoints: stop all."""
    if not dist.is_initialized():
        return
    dirs: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(dirs, str(output_dir))
    if len(set(dirs)) > 1:
        raise ValueError(
            f"paths.output_dir differs across ranks: {sorted(set(dirs))}; give every process "
            "the same hydra.run.dir=... (torchrun: --rdzv-id, srun: one job step)"
        )


@contextmanager
def multirun_job_relaunchable() -> Iterator[None]:
    """Inside a `-m` sweep job: Lightning would restart the whole sweep (`sys.argv`) for ranks > 0
    in `hydra.run.dir`, a directory of its own. Point both at this job; afterwards undo what the
    launch left behind (LOCAL_RANK, WORLD_SIZE, MASTER_PORT in the environment, the process group),
    or the next job would believe its ranks already run and wait for them forever."""
    hydra = HydraConfig.get() if HydraConfig.initialized() else None
    if hydra is None or hydra.mode != RunMode.MULTIRUN:
        yield
        return
    argv, env = sys.argv, dict(os.environ)
    sys.argv = [argv[0], *hydra.overrides.task]
    with read_write(hydra.run):
        hydra.run.dir = hydra.runtime.output_dir
    try:
        yield
    finally:
        sys.argv = argv
        os.environ.clear()
        os.environ.update(env)
        if dist.is_initialized() and "LOCAL_RANK" not in env:
            dist.destroy_process_group()
