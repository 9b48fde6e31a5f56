"""Own data: prompt/response rows from local .jsonl/.json/.parquet files (or a hub dataset when
online), in the format the base knows; every bad file, line or field named."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from datasets import Dataset, load_dataset
from transformers import PreTrainedTokenizerBase

from dmoe_train.settings import SettingError

log = logging.getLogger(__name__)

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
# the column sets own data is read from, in order of precedence (`source_fields`)
SOURCE_COLUMNS = (("prompt", "response"), ("messages",), ("question", "answer"))


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


def data_files(key: str, source: str) -> list[Path]:
    """A data file, or every file of a data folder: one format, nothing else in it."""
    path = Path(source)
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    if not files:
        raise SettingError(key, f"={source}: an empty folder")
    other = [f.name for f in files if f.suffix not in FILE_BUILDERS]
    if other:
        raise SettingError(
            key, f"={source}: not data files (.jsonl, .json or .parquet): {other[:10]}"
        )
    kinds = {FILE_BUILDERS[f.suffix] for f in files}
    if len(kinds) > 1:
        raise SettingError(key, f"={source}: mixes formats {sorted(kinds)}; use one")
    if not any(f.stat().st_size for f in files):
        raise SettingError(key, f"={source}: empty")
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


def read_rows(key: str, source: str, tokenizer: PreTrainedTokenizerBase) -> dict[str, Dataset]:
    """Prompt/response rows of a local file or folder (`train`, in file order), or a hub
    dataset's splits (needs network); a malformed line or a missing field names its file and
    line, under the setting `key` that named the source."""
    path = Path(source)
    files: list[Path] = []
    if path.exists():
        files = data_files(key, source)
        try:
            loaded = load_dataset(
                FILE_BUILDERS[files[0].suffix], data_files=[str(f) for f in files]
            )
        except Exception as err:  # datasets wraps the parser's error in its own
            where = first_bad_json_line(files) or str(err).splitlines()[0]
            raise SettingError(key, f"={source}: unreadable: {where}") from err
    elif path.suffix in FILE_BUILDERS or source.startswith((".", "/", "~")):
        raise SettingError(key, f"={source}: no such file or directory")
    else:
        loaded = load_dataset(source)
    columns = loaded["train"].column_names
    if not any(set(c) <= set(columns) for c in SOURCE_COLUMNS):
        raise SettingError(
            key,
            f"={source}: needs columns question and answer (GSM8K style), messages "
            f"(conversations) or prompt and response (dmoe-generate); it has {sorted(columns)}",
        )
    fields = source_fields(columns)
    log.info("%s=%s: %s", key, source, source_format(fields, tokenizer))

    def convert(example: dict, row: int, split: str) -> dict[str, str]:
        try:
            return to_prompt_response(example, fields, tokenizer)
        except ValueError as err:
            where = row_origin(files, row) if split == "train" else f"{split} row {row}"
            raise SettingError(key, f"={source}: {where}: {err}") from None

    return {
        split: ds.map(convert, with_indices=True, fn_kwargs={"split": split})
        for split, ds in loaded.items()
    }
