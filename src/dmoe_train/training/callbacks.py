"""Lightning callbacks of ours: save on SIGTERM, write the adapted weights with every checkpoint,
report training throughput and peak memory."""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from dmoe_train.memory import peak_memory_bytes, resident_bytes
from dmoe_train.models.adapted_weights import ADAPTED_FILE, adapted_manifest, save_adapted

log = logging.getLogger(__name__)


class SaveOnSigterm(L.Callback):
    """SIGTERM (what SLURM sends before preemption) or Ctrl-C: Lightning ends the current batch
    and raises; this saves `last.ckpt` (and so the router) before the run exits, and says how to
    resume."""

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        stopped = isinstance(exception, SIGTERMException | KeyboardInterrupt)
        if not stopped or trainer.checkpoint_callback is None or trainer.state.fn != "fit":
            return
        last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        trainer.save_checkpoint(last)
        log.warning(
            "%s at step %d: saved %s; relaunch with hydra.run.dir=%s to resume",
            "SIGTERM" if isinstance(exception, SIGTERMException) else "interrupted (Ctrl-C)",
            trainer.global_step,
            last,
            last.parent.parent,
        )


class AdaptedWeightsCheckpoint(L.Callback):
    """Every Lightning checkpoint save also writes the adapted weights (`router.safetensors` +
    `router.json`). Every rank gathers them (their shards under FSDP); only rank 0 writes."""

    def __init__(self, dirpath: str, base_path: str) -> None:
        self.dirpath = Path(dirpath)
        self.base_path = base_path

    def on_save_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        save_adapted_weights(trainer, pl_module, self.dirpath, self.base_path)


def save_adapted_weights(
    trainer: L.Trainer, module: L.LightningModule, dirpath: Path, base_path: str, **extra: Any
) -> Path:
    """Write the adapted weights of a run (`module.trainable_state()`) with its step and
    metrics. Collective: every rank calls it, rank 0 writes."""
    tensors = module.trainable_state()
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    manifest = adapted_manifest(
        module.model,
        module.start_fingerprint,  # a full fine-tune changes the tensors it hashes
        base_path=str(base_path),
        step=trainer.global_step,
        metrics=metrics,
        lora=module.lora.to_dict() if module.lora else None,
        **extra,
    )
    if trainer.is_global_zero:
        save_adapted(tensors, dirpath, manifest)
    return Path(dirpath) / ADAPTED_FILE


class StepResources(L.Callback):
    """Training throughput and peak memory, per rank: each batch's tokens per second (this rank's
    tokens x world size over the batch's wall time: ranks step together) and the process's peak
    memory, logged as `perf/tokens_per_s` and `perf/peak_mem_GiB`. At the end of fit each rank
    writes `<dirpath>/resources.rank<r>.json`: the resident memory when this callback was built
    (before the model, in `dmoe-train`'s build order), the peak once the model is loaded (FSDP
    loads its shards in setup) and after training, and the median step (the first, a warm-up,
    left out when there are others)."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.start_rss = resident_bytes("VmRSS")
        self.seconds: list[float] = []
        self.tokens: list[int] = []
        self.loaded_peak = 0
        self._began = 0.0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.loaded_peak = peak_memory_bytes(pl_module.device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._began = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        self.seconds.append(time.perf_counter() - self._began)
        self.tokens.append(batch["input_ids"].numel() * trainer.world_size)
        peak = peak_memory_bytes(pl_module.device)
        pl_module.log("perf/tokens_per_s", self.tokens[-1] / self.seconds[-1], rank_zero_only=True)
        pl_module.log("perf/peak_mem_GiB", peak / 2**30, rank_zero_only=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.seconds:
            return
        steady = slice(1, None) if len(self.seconds) > 1 else slice(None)
        step_s = statistics.median(self.seconds[steady])
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "batches": len(self.seconds),
            "step_s": step_s,
            "tokens_per_s": statistics.median(self.tokens[steady]) / step_s,
            "start_rss_bytes": self.start_rss,
            "loaded_peak_bytes": self.loaded_peak,
            "peak_bytes": peak_memory_bytes(pl_module.device),
        }
        self.dirpath.mkdir(parents=True, exist_ok=True)
        path = self.dirpath / f"resources.rank{trainer.global_rank}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
