"""Training data the base generates itself (dMoE's data step): decode the prompts of a split
under token routing, keep the samples that finished (an eos within the budget), write them as
`prompt`/`response` jsonl rows that `data.source` trains on.

Work is cut into shards of consecutive prompts; a shard is written whole (atomically: its rows
in `<out>/rows/`, the folder to train on, then its counts in `<out>/shards/`) or not at all, so
a rerun redoes only the shards that are missing. Under several processes shard k belongs to
rank k % world. `<out>/summary.json` adds the counts up.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from tqdm import tqdm

from dmoe_train.data.module import DiffusionDataModule, collate
from dmoe_train.evaluation.decoding import GenerationSettings, answer_correct, batch_prompts, decode
from dmoe_train.files import atomic_write, write_json

SUMMARY = "summary.json"
ROWS, COUNTS = "rows", "shards"


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
        out = decode(model, prompts, gen_length, settings)
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


def my_shards(n_rows: int, shard_size: int, rank: int, world: int) -> Iterator[tuple[int, range]]:
    for k, lo in enumerate(range(0, n_rows, shard_size)):
        if k % world == rank:
            yield k, range(lo, min(lo + shard_size, n_rows))


def generate_split(
    model: torch.nn.Module,
    data: DiffusionDataModule,
    settings: GenerationSettings,
    out_dir: Path,
    split: str = "train",
    shard_size: int = 256,
    max_rows: int | None = None,
    rank: int = 0,
    world: int = 1,
) -> int:
    """Write this rank's missing shards of `split` (its first `max_rows` prompts) under
    `out_dir`; the number of shards it decoded."""
    for sub in (ROWS, COUNTS):
        (out_dir / sub).mkdir(parents=True, exist_ok=True)
    n_rows = min(len(data.splits[split]), max_rows or len(data.splits[split]))
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


def summarize(out_dir: Path, settings: GenerationSettings, source: dict) -> dict:
    """The counts of every shard added up, with what was decoded how; written as
    `summary.json` beside the shards."""
    shards = sorted((out_dir / COUNTS).glob("shard-*.json"))
    totals: dict[str, int] = {}
    for path in shards:
        for key, value in json.loads(path.read_text()).items():
            if key != "rows":
                totals[key] = totals.get(key, 0) + value
    summary = {
        "shards": len(shards),
        **totals,
        "kept_fraction": totals.get("kept", 0) / max(totals.get("prompts", 0), 1),
        "dropped": {"unfinished (no eos within the generation budget)": totals.get("unfinished")},
        "decoding": settings.__dict__,
        "routing": "token (the base)",
        "source": source,
        "train_on": f"data.source={out_dir / ROWS}",
    }
    write_json(out_dir / SUMMARY, summary)
    return summary
