"""The LightningDataModule: a source's prompt/response pairs -> fixed-length token tensors.

Sequences are `prompt + response + eos`, padded with eos to `max_seq_len` (LLaDA's convention:
the trailing eos tokens are part of the response, so the model learns where an answer ends, and
no attention padding is needed). `response_mask` marks what the noise may mask: prompts never are.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import lightning as L
import torch
from datasets import Dataset
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase

from dmoe_train.data.sources import DataSource, data_source
from dmoe_train.data.tokenizer import load_tokenizer
from dmoe_train.settings import SettingError, refuse

log = logging.getLogger(__name__)

# text columns that travel with a sample to evaluation (`skill`: per-skill accuracy)
KEPT_COLUMNS = ("prompt", "response", "skill")


def encode(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_seq_len: int
) -> dict[str, list]:
    """`full_len`: the length before truncation (prompt, response and one eos)."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    ids = prompt_ids + response_ids + [tokenizer.eos_token_id]
    full_len = len(ids)
    ids = ids[:max_seq_len] + [tokenizer.eos_token_id] * (max_seq_len - len(ids))
    response_mask = [i >= len(prompt_ids) for i in range(max_seq_len)]
    return {
        "input_ids": ids,
        "response_mask": response_mask,
        "prompt_len": min(len(prompt_ids), max_seq_len),
        "full_len": full_len,
    }


def check_lengths(split: str, full_lens: list[int], max_seq_len: int) -> None:
    """Responses that lose tokens to `max_seq_len` (their end, or all of them) train the model on
    a cut answer: a split where most do is refused, fewer are logged."""
    cut = sum(n > max_seq_len for n in full_lens)
    if not cut:
        return
    detail = (
        f"={max_seq_len}: {cut} of {len(full_lens)} {split} samples lose response tokens to it "
        f"(the longest needs {max(full_lens)}, prompt + response + eos)"
    )
    if 2 * cut > len(full_lens):
        raise SettingError("max_seq_len", f"{detail}: raise it")
    log.warning("max_seq_len%s; they train on a truncated answer", detail)


class StreamSampler(Sampler[int]):
    """A deterministic stream of `total` indices (a fresh seeded permutation per pass over the
    data), sharded by rank, starting at `start` samples in: resuming at step s reads exactly the
    samples an uninterrupted run reads from step s on."""

    def __init__(
        self, size: int, total: int, seed: int, start: int = 0, rank: int = 0, world: int = 1
    ) -> None:
        self.size, self.total, self.seed = size, total, seed
        self.start, self.rank, self.world = start, rank, world

    def __iter__(self) -> Iterator[int]:
        current, perm = -1, None
        for pos in range(self.start * self.world + self.rank, self.total * self.world, self.world):
            epoch, i = divmod(pos, self.size)
            if epoch != current:
                gen = torch.Generator().manual_seed(self.seed + epoch)
                current, perm = epoch, torch.randperm(self.size, generator=gen)
            yield int(perm[i])

    def __len__(self) -> int:
        # the whole run's length, not what is left: a resumed Lightning epoch counts the batches
        # it restored against it, and would otherwise end early and iterate the stream again
        return self.total


class StreamLoader(DataLoader):
    """The training loader. Its position is the trainer's step, from which `train_dataloader`
    rebuilds it on resume: the state Lightning asks a resumable loader for is empty."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass(frozen=True)
class LoaderSettings:
    """Sequences of `max_seq_len` tokens; training batches of `batch_size`, evaluation batches
    of `eval_batch_size`; `num_workers` loader processes."""

    max_seq_len: int = 32
    batch_size: int = 32
    eval_batch_size: int = 64
    num_workers: int = 0

    def __post_init__(self) -> None:
        for key, low in (
            ("max_seq_len", 2),
            ("batch_size", 1),
            ("eval_batch_size", 1),
            ("num_workers", 0),
        ):
            value = getattr(self, key)
            if not isinstance(value, int) or value < low:
                raise refuse(key, value, f"must be an integer >= {low}")


class DiffusionDataModule(L.LightningDataModule):
    """The splits of `source` (`data.sources`), tokenized and batched as `loader` says; `seed`
    draws the embedded tasks, splits own files and orders the training stream."""

    def __init__(
        self, tokenizer_path: str, source: DataSource, loader: LoaderSettings, seed: int = 0
    ) -> None:
        super().__init__()
        self.tokenizer_path, self.source, self.loader, self.seed = (
            tokenizer_path,
            source,
            loader,
            seed,
        )
        self.splits: dict[str, Dataset] = {}
        self.tokenizer: PreTrainedTokenizerBase | None = None

    @property
    def max_seq_len(self) -> int:
        return self.loader.max_seq_len

    @property
    def batch_size(self) -> int:
        return self.loader.batch_size

    @property
    def eval_batch_size(self) -> int:
        return self.loader.eval_batch_size

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        raw = self.source.splits(self.seed, self.tokenizer)
        columns = ["input_ids", "response_mask", "prompt_len", "index"]
        for split, ds in raw.items():
            encoded = ds.map(  # `index` keys each sample's noise (see RouterFineTuner)
                lambda ex, i: {
                    **encode(self.tokenizer, ex["prompt"], ex["response"], self.max_seq_len),
                    "index": i,
                },
                with_indices=True,
                remove_columns=[c for c in ds.column_names if c not in KEPT_COLUMNS],
            )
            check_lengths(split, encoded["full_len"], self.max_seq_len)
            self.splits[split] = encoded.remove_columns("full_len").with_format(
                "torch", columns=columns, output_all_columns=True
            )

    def train_dataloader(self) -> DataLoader:
        trainer = self.trainer
        return self.stream_loader(
            steps=max(trainer.max_steps, 1) * trainer.accumulate_grad_batches,
            start_step=trainer.global_step * trainer.accumulate_grad_batches,
            rank=trainer.global_rank,
            world=trainer.world_size,
        )

    def stream_loader(
        self, steps: int, start_step: int = 0, rank: int = 0, world: int = 1
    ) -> DataLoader:
        """Batches `start_step`..`steps` of this rank's share of the seeded training stream."""
        sampler = StreamSampler(
            len(self.splits["train"]),
            steps * self.batch_size,
            self.seed,
            start_step * self.batch_size,
            rank,
            world,
        )
        return self._loader("train", self.batch_size, sampler, StreamLoader)

    def val_dataloader(self) -> DataLoader:
        """Under several processes each rank evaluates every world-th sample; the last
        `len % world` samples are left out, so that every rank runs as many batches (the loss
        normalisation is a collective per batch)."""
        trainer = self.trainer
        world = trainer.world_size if trainer is not None else 1
        rank = trainer.global_rank if trainer is not None else 0
        size = len(self.splits["validation"])
        indices = range(rank, size - size % world, world)
        return self._loader("validation", self.eval_batch_size, indices if world > 1 else None)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    def _loader(
        self,
        split: str,
        batch_size: int,
        sampler: Sampler | range | None = None,
        loader: type[DataLoader] = DataLoader,
    ) -> DataLoader:
        return loader(
            self.splits[split],
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.loader.num_workers,
            collate_fn=collate,
        )


def collate(rows: list[dict]) -> dict:
    return {
        "input_ids": torch.stack([r["input_ids"] for r in rows]),
        "response_mask": torch.stack([r["response_mask"] for r in rows]),
        "prompt_len": torch.stack([r["prompt_len"] for r in rows]),
        "index": torch.stack([r["index"] for r in rows]),
        "prompt": [r["prompt"] for r in rows],
        "answer": [r["response"] for r in rows],
        **({"skill": [r["skill"] for r in rows]} if "skill" in rows[0] else {}),
    }


def data_module(
    tokenizer_path: str, source: str = "arithmetic", seed: int = 0, **settings: Any
) -> DiffusionDataModule:
    """The `data` group's target: `source` (`arithmetic`, `skills`, or own files: a path or a
    hub name) with its kind's settings (`data_source`), and the loader's (`LoaderSettings`)."""
    loading = {f.name for f in fields(LoaderSettings)}
    loader = LoaderSettings(**{k: v for k, v in settings.items() if k in loading})
    kind = data_source(source, **{k: v for k, v in settings.items() if k not in loading})
    return DiffusionDataModule(tokenizer_path, kind, loader, seed)
