"""Lightning callbacks of ours."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from dmoe_train.router_io import save_router


class RouterCheckpoint(L.Callback):
    """Every Lightning checkpoint save also writes `router.safetensors` + `router.json`."""

    def __init__(self, dirpath: str, base_path: str) -> None:
        self.dirpath = Path(dirpath)
        self.base_path = base_path

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if trainer.is_global_zero:
            export_router(trainer, pl_module, self.dirpath, self.base_path)


def export_router(
    trainer: L.Trainer, pl_module: L.LightningModule, dirpath: Path, base_path: str, **extra: Any
) -> Path:
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    manifest = {"base_path": str(base_path), "step": trainer.global_step, "metrics": metrics}
    return save_router(pl_module.model, dirpath, pl_module.is_trainable, {**manifest, **extra})
