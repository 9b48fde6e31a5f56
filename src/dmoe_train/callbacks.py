"""Lightning callbacks of ours: save on SIGTERM, write the router with every checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dmoe_train.router_io import export_router


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
