"""The LightningDataModule: prompt/response pairs -> fixed-length token tensors.

Sequences are `prompt + response + eos`, padded with eos to `max_seq_len` (LLaDA's convention:
the trailing eos tokens are part of the response, so the model learns where an answer ends, and
no attention padding is needed). `response_mask` marks what the noise may mask: prompts never are.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from datasets import Dataset, load_dataset
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase

from dmoe_train.data.arithmetic import arithmetic_split
from dmoe_train.data.skills import skills_split
from dmoe_train.data.tokenizer import load_tokenizer

# text columns that travel with a sample to evaluation (`skill`: per-skill accuracy)
KEPT_COLUMNS = ("prompt", "response", "skill")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def encode(
    tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_seq_len: int
) -> dict[str, list]:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + response_ids + [tokenizer.eos_token_id])[:max_seq_len]
    ids += [tokenizer.eos_token_id] * (max_seq_len - len(ids))
    response_mask = [i >= len(prompt_ids) for i in range(max_seq_len)]
    return {
        "input_ids": ids,
        "response_mask": response_mask,
        "prompt_len": min(len(prompt_ids), max_seq_len),
    }


def to_prompt_response(example: dict, tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
    """GSM8K style (`question`/`answer`) or conversation style (`messages`, last = the answer)."""
    if "messages" in example:
        *context, last = example["messages"]
        if last.get("role") != "assistant":
            raise ValueError(f"data: the last message must be the assistant's, got {last!r:.80}")
        return {"prompt": _chat_prompt(tokenizer, context), "response": last["content"]}
    return {
        "prompt": _chat_prompt(tokenizer, [{"role": "user", "content": example["question"]}]),
        "response": example["answer"],
    }


def _chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "".join(f"{m['content']}\n" for m in messages)


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


class DiffusionDataModule(L.LightningDataModule):
    """`source`: `arithmetic` or `skills` (embedded, see their modules), a local
    .jsonl/.json/.parquet file or folder of them, or a hub dataset name (needs network)."""

    def __init__(
        self,
        tokenizer_path: str,
        source: str = "arithmetic",
        max_seq_len: int = 32,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        train_size: int = 8000,
        val_size: int = 256,
        test_size: int = 256,
        max_digits: int = 2,
        val_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.tokenizer_path = tokenizer_path
        self.source = source
        self.max_seq_len = max_seq_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.sizes = {"train": train_size, "validation": val_size, "test": test_size}
        self.max_digits, self.val_fraction = max_digits, val_fraction
        self.seed, self.num_workers = seed, num_workers
        self.splits: dict[str, Dataset] = {}
        self.tokenizer: PreTrainedTokenizerBase | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_path)
        raw = self._raw_splits()
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
            self.splits[split] = encoded.with_format(
                "torch", columns=columns, output_all_columns=True
            )

    def _raw_splits(self) -> dict[str, Dataset]:
        if self.source == "arithmetic":
            return {
                split: Dataset.from_list(arithmetic_split(split, size, self.max_digits, self.seed))
                for split, size in self.sizes.items()
            }
        if self.source == "skills":
            return {
                split: Dataset.from_list(skills_split(split, size, self.seed))
                for split, size in self.sizes.items()
            }
        path = Path(self.source)
        if path.exists():
            files = sorted(path.glob("*")) if path.is_dir() else [path]
            builder = FILE_BUILDERS.get(files[0].suffix) if files else None
            if builder is None:
                raise ValueError(f"data.source={self.source}: expected .jsonl, .json or .parquet")
            if not any(f.stat().st_size for f in files):
                raise ValueError(f"data.source={self.source}: empty")
            loaded = load_dataset(builder, data_files={"train": [str(f) for f in files]})
        elif path.suffix in FILE_BUILDERS or self.source.startswith((".", "/", "~")):
            raise FileNotFoundError(f"data.source={self.source}: no such file or directory")
        else:
            loaded = load_dataset(self.source)  # a hub dataset name (needs network)
        columns = set(loaded["train"].column_names)
        if "messages" not in columns and not {"question", "answer"} <= columns:
            raise ValueError(
                f"data.source={self.source}: needs columns question and answer (GSM8K style) or "
                f"messages (conversations); it has {sorted(columns)}"
            )
        if "validation" not in loaded:
            parts = loaded["train"].train_test_split(test_size=self.val_fraction, seed=self.seed)
            loaded["train"], loaded["validation"] = parts["train"], parts["test"]
        return {
            split: ds.map(lambda ex: to_prompt_response(ex, self.tokenizer))
            for split, ds in loaded.items()
        }

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
        return self._loader("train", self.batch_size, sampler)

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
        self, split: str, batch_size: int, sampler: Sampler | range | None = None
    ) -> DataLoader:
        return DataLoader(
            self.splits[split],
            batch_size=batch_size,
            sampler=sampler,
            shuffle=False,
            num_workers=self.num_workers,
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
