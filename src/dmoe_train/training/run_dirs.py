"""Run directories: one per run, whoever starts the processes, and a relaunch is the same run.

- A relaunched run directory resumes only under the configuration it started with
  (`check_relaunch`): other keys stop it, naming them, unless `resume_with_changes=true`, and the
  changes are recorded in `run_info.json`; a finished one is not re-entered silently.
- `torchrun` / `srun` start every rank: each rank composes the config itself, so the run directory
  must not depend on each process's clock: `run_id` names it after the launcher's job id.
- Lightning's own launcher (`python -m dmoe_train.cli.train trainer=ddp`) restarts `sys.argv` for
  ranks > 0 with `hydra.run.dir` set; `multirun_job_relaunchable` makes that work in a `-m` sweep.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from fnmatch import fnmatch
from pathlib import Path

import torch.distributed as dist
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import read_write

from dmoe_train.files import differences

STARTED = datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
RUN_INFO = "run_info.json"
# keys (fnmatch patterns) a relaunch may change: how it is watched, where it resumes from, the
# flag itself, the loggers' per-launch folders
RELAUNCH_FREE = (
    "ckpt_path",
    "resume_with_changes",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "logger.*.version",
)
# keys a resume cannot honour: the checkpoint restores the optimizer and its schedule
RESTORED_FROM_CHECKPOINT = ("module.optimizer.", "module.scheduler.")


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


def config_changes(started: dict, now: dict) -> dict[str, list]:
    """`key: [started with, now]` for every differing key but the `RELAUNCH_FREE` ones."""
    return {
        k: change
        for k, change in differences(started, now).items()
        if not any(fnmatch(k, free) for free in RELAUNCH_FREE)
    }


def check_relaunch(output_dir: Path, config: dict, resuming: bool) -> dict:
    """The `run_info.json` record of a run started or relaunched in `output_dir` with `config`
    (resolved): a relaunch (`resuming` its `last.ckpt`, or a finished run: `summary.json`) under
    another configuration stops, naming the keys, unless `resume_with_changes`; then the
    changes are appended to the record's `resumes`. A change the checkpoint would override (the
    optimizer, its schedule) stops whatever the flag says."""
    info_path = output_dir / "checkpoints" / RUN_INFO
    finished = (output_dir / "summary.json").is_file()
    if not (resuming or finished) or not info_path.is_file():
        return {"config": config, "resumes": []}
    info = json.loads(info_path.read_text())
    changes = config_changes(info["config"], config)
    restored = [k for k in changes if k.startswith(RESTORED_FROM_CHECKPOINT)]
    shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
    if restored:
        raise ValueError(
            f"paths.output_dir={output_dir} resumes its checkpoint, which restores the optimizer "
            f"and its schedule: {restored} cannot change on resume ({shown}); start a new run "
            "(init_router=<its router.safetensors> starts from its router)"
        )
    if not config.get("resume_with_changes"):
        if finished:
            raise ValueError(
                f"paths.output_dir={output_dir} holds a finished run (summary.json): give a new "
                "hydra.run.dir, or resume_with_changes=true to re-enter it"
                + (f" with {shown}" if changes else "")
            )
        if changes:
            raise ValueError(
                f"paths.output_dir={output_dir} was started with another configuration: {shown}; "
                "relaunch with its own, or add resume_with_changes=true (recorded in "
                f"{RUN_INFO})"
            )
    return {**info, "resumes": [*info.get("resumes", []), {"changed": changes}]}
