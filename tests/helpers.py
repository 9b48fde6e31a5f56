"""Test-only pieces that configs can name by `_target_` (tests/ is on sys.path under pytest)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

import dmoe_train.train  # noqa: F401  (registers the ${project_root:} resolver)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
FAST = [
    "data.train_size=512",
    "data.val_size=64",
    "data.eval_batch_size=64",
    "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false",
]


def cli_train(output_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m dmoe_train.train` in a subprocess, with tests/ importable for its callbacks."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent)}
    cmd = [
        sys.executable,
        "-m",
        "dmoe_train.train",
        f"hydra.run.dir={output_dir}",
        *FAST,
        *overrides,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def compose_train(
    output_dir: Path, *overrides: str, return_hydra_config: bool = False
) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(
            "train",
            overrides=[f"paths.output_dir={output_dir}", *FAST, *overrides],
            return_hydra_config=return_hydra_config,
        )


class StopAtStep(L.Callback):
    """Simulates an interrupted run: stop once `step` optimizer steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class PoisonRouter(L.Callback):
    """Sets every router weight to NaN before the batch of step `step` (after its checkpoint)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            for name, p in pl_module.model.named_parameters():
                if name.endswith("gate.weight"):
                    p.data.fill_(float("nan"))


class KillAtStep(L.Callback):
    """Sends this process `signal` (SIGTERM or SIGKILL) once `step` optimizer steps are done."""

    def __init__(self, step: int, signal: str) -> None:
        self.step, self.signal = step, signal

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal, self.signal))


class PoisonOneBatch(L.Callback):
    """Makes one batch's loss NaN (router weights NaN during that batch only)."""

    def __init__(self, step: int) -> None:
        self.step, self.saved = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.saved is None:
            gates = [p for n, p in pl_module.model.named_parameters() if n.endswith("gate.weight")]
            self.saved = [(p, p.detach().clone()) for p in gates]
            for p in gates:
                p.data.fill_(float("nan"))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for p, value in self.saved or []:
            p.data.copy_(value)
        self.saved = self.saved and []


class SaveRankRouter(L.Callback):
    """Each rank saves its (whole) router at the end of training to `<dirpath>/rank<r>.pt`."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer, pl_module) -> None:
        state = pl_module.trainable_state()  # a collective under FSDP: every rank calls it
        torch.save(state, self.dirpath / f"rank{trainer.global_rank}.pt")
