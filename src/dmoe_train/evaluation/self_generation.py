"""Training data the base generates itself (dMoE's data step): decode the prompts of a split
under token routing, keep the samples that finished (an eos within the budget), write them as
`prompt`/`response` jsonl rows that `data.source` trains on.

Work is cut into shards of consecutive prompts; a shard is written whole (atomically: its rows
in `<out>/rows/`, the folder to train on, then its counts in `<out>/shards/`) or not at all, so
a rerun redoes only the shards that are missing. Under several processes shard k belongs to
rank k % world. `<out>/generate.json` records the settings the shards were decoded under, before
the first one: an output directory is only ever resumed under exactly those (`claim_out_dir`).
`<out>/summary.json` adds the counts up and says what the shards hold.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from dmoe_train.data.module import DiffusionDataModule, collate
from dmoe_train.evaluation.split_decoding import (
    GenerationSettings,
    answer_correct,
    batch_prompts,
    decode_prompts,
)
from dmoe_train.files import atomic_write, differences, write_json

SUMMARY, SETTINGS = "summary.json", "generate.json"
ROWS, COUNTS = "rows", "shards"


def check_out_dir(out_dir: Path, settings: dict, ignored: tuple[str, ...] = ()) -> None:
    """Whether `out_dir` may take a generation under `settings`: a new or empty directory (bar
    the `ignored` names), or one holding dmoe-generate's earlier output under exactly `settings`
    (resumed). Anything else is refused, naming the directory and what differs."""
    recorded = out_dir / SETTINGS
    if recorded.is_file():
        changed = differences(json.loads(recorded.read_text()), settings)
        if changed:
            shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            raise ValueError(
                f"out_dir={out_dir} holds dmoe-generate output decoded under other settings "
                f"({shown}); give a new out_dir, or the settings of its {SETTINGS}"
            )
        return
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"out_dir={out_dir}: a file, not a directory")
    if out_dir.is_dir() and any(p.name not in ignored for p in out_dir.iterdir()):
        raise ValueError(
            f"out_dir={out_dir}: not empty and not dmoe-generate output (no {SETTINGS}); give "
            "a new or empty directory"
        )


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def shard_rows(
    model: torch.nn.Module,
    data: DiffusionDataModule,
    split: str,
    rows: range,
    settings: GenerationSettings,
) -> tuple[list[dict], dict[str, int]]:
    """Decode `rows` of `split` in batches of `data.eval_batch_size`: the kept rows and the
    counts (kept, dropped for not finishing, and how many kept responses equal the split's own
    answer: the base's agreement with the ground truth)."""
    eos = model.config.eos_token_id
    kept: list[dict] = []
    counts = {"prompts": 0, "kept": 0, "unfinished": 0, "agrees_with_reference": 0}
    ds = data.splits[split]
    for lo in range(rows.start, rows.stop, data.eval_batch_size):
        batch = collate([ds[i] for i in range(lo, min(lo + data.eval_batch_size, rows.stop))])
        prompts = batch_prompts(batch)
        gen_length = settings.gen_length or data.max_seq_len - min(len(p) for p in prompts)
        out = decode_prompts(model, prompts, gen_length, settings)
        texts = data.tokenizer.batch_decode(out.tokens, skip_special_tokens=True)
        finished = (out.tokens == eos).any(1).tolist()
        for i, (text, done) in enumerate(zip(texts, finished, strict=True)):
            counts["prompts"] += 1
            if not done:  # ran out of budget: its end is unknown, so it teaches no ending
                counts["unfinished"] += 1
                continue
            counts["kept"] += 1
            counts["agrees_with_reference"] += answer_correct(text, batch["answer"][i])
            row = {"prompt": batch["prompt"][i], "response": text}
            if "skill" in batch:
                row["skill"] = batch["skill"][i]
            kept.append(row)
    return kept, counts


def rows_asked(data: DiffusionDataModule, split: str, max_rows: int | None) -> int:
    """How many of the split's prompts a generation decodes: its first `max_rows`, or all."""
    return min(len(data.splits[split]), max_rows or len(data.splits[split]))


def my_shards(n_rows: int, shard_size: int, rank: int, world: int) -> Iterator[tuple[int, range]]:
    for k, lo in enumerate(range(0, n_rows, shard_size)):
        if k % world == rank:
            yield k, range(lo, min(lo + shard_size, n_rows))


def generate_split(
    model: torch.nn.Module,
    data: DiffusionDataModule,
    settings: GenerationSettings,
    out_dir: Path,
    record: dict,
    split: str = "train",
    shard_size: int = 256,
    max_rows: int | None = None,
    rank: int = 0,
    world: int = 1,
) -> int:
    """Write this rank's missing shards of `split` (its first `max_rows` prompts) under
    `out_dir`, `record` (what they depend on, `check_out_dir`) first; the number of shards it
    decoded."""
    for sub in (ROWS, COUNTS):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    if rank == 0 and not (out_dir / SETTINGS).is_file():  # one writer: ranks share its temp name
        write_json(out_dir / SETTINGS, record)
    n_rows = rows_asked(data, split, max_rows)
    todo = [
        (k, rows)
        for k, rows in my_shards(n_rows, shard_size, rank, world)
        if not (out_dir / COUNTS / f"{shard_name(k)}.json").is_file()
    ]
    for k, rows in tqdm(todo, desc=f"generating (rank {rank})", disable=not todo):
        kept, counts = shard_rows(model, data, split, rows, settings)
        lines = "".join(json.dumps(r) + "\n" for r in kept)
        atomic_write(out_dir / ROWS / f"{shard_name(k)}.jsonl", lambda p, t=lines: p.write_text(t))
        # the counts last: they mark the shard as done
        counted = {"rows": [rows.start, rows.stop], **counts}
        write_json(out_dir / COUNTS / f"{shard_name(k)}.json", counted)
    return len(todo)


def summarize(out_dir: Path, n_rows: int, shard_size: int) -> dict:
    """What the shards hold: the counts of every shard added up, which prompts of the split they
    cover (of the `n_rows` asked for), and the settings they were decoded under; written as
    `summary.json` beside them."""
    shards = sorted((out_dir / COUNTS).glob("shard-*.json"))
    totals: dict[str, int] = {}
    covered = []
    for path in shards:
        for key, value in json.loads(path.read_text()).items():
            if key == "rows":
                covered.append(value)
            else:
                totals[key] = totals.get(key, 0) + value
    expected = -(-n_rows // shard_size)
    summary = {
        "complete": len(shards) == expected,
        "shards": len(shards),
        "shards_expected": expected,
        "prompt_rows": covered,  # [start, stop) of the split's rows, per shard
        **totals,
        "kept_fraction": totals.get("kept", 0) / max(totals.get("prompts", 0), 1),
        "dropped": {"unfinished (no eos within the generation budget)": totals.get("unfinished")},
        "settings": json.loads((out_dir / SETTINGS).read_text()),
        "train_on": f"data.source={out_dir / ROWS}",
    }
    write_json(out_dir / SUMMARY, summary)
    return summary
