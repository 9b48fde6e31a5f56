"""The LightningDataModule: prompt/response pairs -> fixed-length token tensors.

Sequences are `prompt + response + eos`, padded with eos to `max_seq_len` (LLaDA's convention:
the trailing eos tokens are part of the response, so the model learns where an answer ends, and
no attention padding is needed). `response_mask` marks what the noise may mask: prompts never are.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
from datasets import Dataset, load_dataset
from torch.utils.data import DataLoader, Sampler
from transformers import PreTrainedTokenizerBase

from dmoe_train.data.arithmetic import arithmetic_split
from dmoe_train.data.skills import SKILLS, skills_split
from dmoe_train.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

# text columns that travel with a sample to evaluation (`skill`: per-skill accuracy)
KEPT_COLUMNS = ("prompt", "response", "skill")
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# the column sets own data is read from, in order of precedence (`source_fields`)
SOURCE_COLUMNS = (("prompt", "response"), ("messages",), ("question", "answer"))


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


def check_lengths(source: str, split: str, full_lens: list[int], max_seq_len: int) -> None:
    """Responses that lose tokens to `max_seq_len` (their end, or all of them) train the model on
    a cut answer: a split where most do is refused, fewer are logged."""
    cut = sum(n > max_seq_len for n in full_lens)
    if not cut:
        return
    message = (
        f"data.source={source}: {cut} of {len(full_lens)} {split} samples lose response tokens to "
        f"data.max_seq_len={max_seq_len} (the longest needs {max(full_lens)}, prompt + response "
        "+ eos)"
    )
    if 2 * cut > len(full_lens):
        raise ValueError(f"{message}: raise data.max_seq_len")
    log.warning("%s; they train on a truncated answer", message)


def source_fields(columns: list[str]) -> tuple[str, ...]:
    """The columns a file's rows are read from, the first set it has: `prompt`/`response` (as
    the model reads them: what `dmoe-generate` writes), `messages` (conversations), or
    `question`/`answer` (GSM8K style)."""
    return next(c for c in SOURCE_COLUMNS if set(c) <= set(columns))


def source_format(fields: tuple[str, ...], tokenizer: PreTrainedTokenizerBase) -> str:
    """How rows of `fields` become prompt and response text on this base, in words (printed at
    the start of every run that reads own data)."""
    if fields == ("prompt", "response"):
        return "fields prompt, response read as they are"
    mapping = (
        "the turns before the last -> prompt, the last (the assistant's) -> response"
        if fields == ("messages",)
        else "question -> prompt, answer -> response"
    )
    if tokenizer.chat_template:
        return f"{mapping}; the prompt in the base's chat template (a chat base)"
    return (
        f"{mapping}; the base has no chat template: plain text as the shipped bases were trained "
        "on (the prompt as written, turns joined by newlines, the response right after it)"
    )


def to_prompt_response(
    example: dict, fields: tuple[str, ...], tokenizer: PreTrainedTokenizerBase
) -> dict[str, str]:
    """One row of a source read from `fields` (`source_fields`) as `source_format` says. A
    missing, non-text or empty field is a ValueError naming it."""
    if fields == ("prompt", "response"):
        return {"prompt": _text(example, "prompt"), "response": _text(example, "response")}
    if fields == ("messages",):
        *context, last = example["messages"] or [None]
        if not isinstance(last, dict) or last.get("role") != "assistant":
            raise ValueError(f"the last message must be the assistant's, got {last!r:.80}")
        if not context:
            raise ValueError("no message before the assistant's: the prompt would be empty")
        for message in context:
            _text(message, "content")
        return {"prompt": _chat_prompt(tokenizer, context), "response": _text(last, "content")}
    question = [{"role": "user", "content": _text(example, "question")}]
    return {"prompt": _chat_prompt(tokenizer, question), "response": _text(example, "answer")}


def _text(example: dict, field: str) -> str:
    value = example.get(field)
    if not isinstance(value, str):
        raise ValueError(f"field {field!r} is missing or not text ({value!r:.40})")
    if not value.strip():
        raise ValueError(f"field {field!r} is empty")
    return value


def _chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> str:
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return "\n".join(m["content"] for m in messages)


def data_files(source: str) -> list[Path]:
    """A data file, or every file of a data folder: one format, nothing else in it."""
    path = Path(source)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise ValueError(f"data.source={source}: an empty folder")
    other = [f.name for f in files if f.suffix not in FILE_BUILDERS]
    if other:
        raise ValueError(
            f"data.source={source}: not data files (.jsonl, .json or .parquet): {other[:10]}"
        )
    kinds = {FILE_BUILDERS[f.suffix] for f in files}
    if len(kinds) > 1:
        raise ValueError(f"data.source={source}: mixes formats {sorted(kinds)}; use one")
    if not any(f.stat().st_size for f in files):
        raise ValueError(f"data.source={source}: empty")
    return files


def first_bad_json_line(files: list[Path]) -> str | None:
    """`file:line: error` of the first line of a JSON-lines file that does not parse."""
    for file in files:
        if file.suffix != ".jsonl":
            continue
        with file.open() as f:
            for number, line in enumerate(f, 1):
                try:
                    line.strip() and json.loads(line)
                except json.JSONDecodeError as err:
                    return f"{file}:{number}: {err.msg}"
    return None


def row_origin(files: list[Path], row: int) -> str:
    """Where row `row` (0-based, files in order) of a JSON-lines source is: `file:line`."""
    for file in files:
        if file.suffix != ".jsonl":
            return f"row {row}"
        lines = [n for n, line in enumerate(file.open(), 1) if line.strip()]
        if row < len(lines):
            return f"{file}:{lines[row]}"
        row -= len(lines)
    return f"row {row}"


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
        test_fraction: float = 0.05,
        test_source: str | None = None,
        train_skills: list[str] | None = None,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for key, value, low in (
            ("max_seq_len", max_seq_len, 2),
            ("batch_size", batch_size, 1),
            ("eval_batch_size", eval_batch_size, 1),
            ("train_size", train_size, 1),
            ("val_size", val_size, 1),
            ("test_size", test_size, 1),
            ("num_workers", num_workers, 0),
        ):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"data.{key}={value}: must be an integer >= {low}")
        for key, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 < value < 0.5:
                raise ValueError(f"data.{key}={value}: must be in (0, 0.5)")
        self.tokenizer_path = tokenizer_path
        self.source = source
        self.max_seq_len = max_seq_len
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.sizes = {"train": train_size, "validation": val_size, "test": test_size}
        self.max_digits, self.val_fraction = max_digits, val_fraction
        self.test_fraction, self.test_source = test_fraction, test_source
        if train_skills is not None and source != "skills":
            raise ValueError(f"data.train_skills={train_skills}: only for data.source=skills")
        # the skills the train split holds (validation and test keep all four): held-out skills
        # enter training in no form
        self.train_skills = tuple(train_skills) if train_skills is not None else SKILLS
        if not self.train_skills:
            raise ValueError(f"data.train_skills=[]: empty; name at least one of {list(SKILLS)}")
        unknown = [s for s in self.train_skills if s not in SKILLS]
        if unknown:
            raise ValueError(
                f"data.train_skills={list(train_skills)}: unknown {unknown}; each must be one "
                f"of {list(SKILLS)}"
            )
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
            check_lengths(self.source, split, encoded["full_len"], self.max_seq_len)
            self.splits[split] = encoded.remove_columns("full_len").with_format(
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
                split: Dataset.from_list(
                    skills_split(
                        split,
                        size,
                        self.seed,
                        skills=self.train_skills if split == "train" else SKILLS,
                    )
                )
                for split, size in self.sizes.items()
            }
        loaded = self._read("data.source", self.source)
        if self.test_source is not None:
            loaded["test"] = self._read("data.test_source", self.test_source)["train"]
        # seeded and disjoint: the test split first, then validation, off the train rows; each
        # a fraction of all of them
        rows = len(loaded["train"])
        for split, key, fraction in (
            ("test", "test_fraction", self.test_fraction),
            ("validation", "val_fraction", self.val_fraction),
        ):
            if split not in loaded:
                size = max(1, round(fraction * rows))
                if size >= len(loaded["train"]):
                    raise ValueError(
                        f"data.source={self.source}: {rows} rows are too few to split off "
                        f"data.{key}={fraction}"
                    )
                parts = loaded["train"].train_test_split(test_size=size, seed=self.seed)
                loaded["train"], loaded[split] = parts["train"], parts["test"]
        return loaded

    def _read(self, key: str, source: str) -> dict[str, Dataset]:
        """Prompt/response rows of a local file or folder (`train`, in file order), or a hub
        dataset's splits (needs network); a malformed line or a missing field names its file and
        line."""
        path = Path(source)
        files: list[Path] = []
        if path.exists():
            files = data_files(source)
            try:
                loaded = load_dataset(
                    FILE_BUILDERS[files[0].suffix], data_files=[str(f) for f in files]
                )
            except Exception as err:  # datasets wraps the parser's error in its own
                where = first_bad_json_line(files) or str(err).splitlines()[0]
                raise ValueError(f"{key}={source}: unreadable: {where}") from err
        elif path.suffix in FILE_BUILDERS or source.startswith((".", "/", "~")):
            raise FileNotFoundError(f"{key}={source}: no such file or directory")
        else:
            loaded = load_dataset(source)
        columns = loaded["train"].column_names
        if not any(set(c) <= set(columns) for c in SOURCE_COLUMNS):
            raise ValueError(
                f"{key}={source}: needs columns question and answer (GSM8K style), messages "
                f"(conversations) or prompt and response (dmoe-generate); it has {sorted(columns)}"
            )
        fields = source_fields(columns)
        log.info("%s=%s: %s", key, source, source_format(fields, self.tokenizer))

        def convert(example: dict, row: int, split: str) -> dict[str, str]:
            try:
                return to_prompt_response(example, fields, self.tokenizer)
            except ValueError as err:
                where = row_origin(files, row) if split == "train" else f"{split} row {row}"
                raise ValueError(f"{key}={source}: {where}: {err}") from None

        return {
            split: ds.map(convert, with_indices=True, fn_kwargs={"split": split})
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
