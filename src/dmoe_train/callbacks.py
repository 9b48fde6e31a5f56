"""Lightning callbacks and plugins of ours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dmoe_train.router_io import ROUTER_FILE, atomic_write, router_manifest, save_router


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoints written to a temporary file, fsynced, then renamed: a kill during a
    save leaves the previous checkpoint whole."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


class SaveOnSigterm(L.Callback):
    """SIGTERM (what SLURM sends before preemption): Lightning ends the current batch and raises;
    this saves `last.ckpt` (and so the router) before the run exits."""

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException) and trainer.checkpoint_callback is not None:
            trainer.save_checkpoint(Path(trainer.checkpoint_callback.dirpath) / "last.ckpt")


class RouterCheckpoint(L.Callback):
    """Every Lightning checkpoint save also writes `router.safetensors` + `router.json`. Every
    rank gathers the router (its shards under FSDP); only rank 0 writes."""

    def __init__(self, dirpath: str, base_path: str) -> None:
        self.dirpath = Path(dirpath)
        self.base_path = base_path

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        export_router(trainer, pl_module, self.dirpath, self.base_path)


def export_router(
    trainer: L.Trainer, pl_module: L.LightningModule, dirpath: Path, base_path: str, **extra: Any
) -> Path:
    """Collective: every rank calls it, rank 0 writes."""
    tensors = pl_module.trainable_state()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    manifest = router_manifest(
        pl_module.model,
        base_path=str(base_path),
        step=trainer.global_step,
        metrics=metrics,
        **extra,
    )
    if trainer.is_global_zero:
        save_router(tensors, dirpath, manifest)
    return Path(dirpath) / ROUTER_FILE
