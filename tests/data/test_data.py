import json

import pytest
import torch

from dmoe_train.data.arithmetic import arithmetic_split
from dmoe_train.data.module import StreamSampler, data_module
from dmoe_train.data.tokenizer import char_tokenizer


def test_arithmetic_splits_never_overlap_and_are_seeded():
    splits = {
        s: arithmetic_split(s, 300, max_digits=2, seed=3) for s in ("train", "validation", "test")
    }
    prompts = {s: {r["prompt"] for r in rows} for s, rows in splits.items()}
    assert all(len(p) == 300 for p in prompts.values())
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"] and not prompts["validation"] & prompts["test"]
    assert arithmetic_split("train", 50, seed=3) == splits["train"][:50]
    for row in splits["test"]:
        assert str(eval(row["prompt"][:-1])) == row["response"]


def test_too_many_problems_is_a_clear_error():
    with pytest.raises(ValueError, match="max_digits=1"):
        arithmetic_split("train", 1000, max_digits=1)


def _rows(dm, split):
    return next(iter(dm.val_dataloader() if split == "validation" else dm.test_dataloader()))


def test_gsm8k_jsonl_prompt_is_not_in_response(tmp_path, tokenizer_dir):
    rows = [
        {"question": f"What is {i} plus {i}?", "answer": f"{i}+{i}={2 * i}\n#### {2 * i}"}
        for i in range(40)
    ]
    path = tmp_path / "gsm.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = data_module(str(tokenizer_dir), source=str(path), max_seq_len=48, val_fraction=0.25)
    dm.setup()
    sizes = {split: len(rows) for split, rows in dm.splits.items()}
    assert sizes == {"train": 28, "validation": 10, "test": 2}  # test_fraction 0.05 of 40
    prompts = {split: set(rows["prompt"]) for split, rows in dm.splits.items()}
    assert sum(map(len, prompts.values())) == 40 == len(set.union(*prompts.values()))
    batch = _rows(dm, "validation")
    tok = dm.tokenizer
    for ids, resp, n, prompt in zip(
        batch["input_ids"],
        batch["response_mask"],
        batch["prompt_len"],
        batch["prompt"],
        strict=True,
    ):
        # no chat template in the base: the question as written, as the base was trained on
        assert tok.decode(ids[:n]) == prompt and prompt.startswith("What is ") and prompt[-1] == "?"
        assert not resp[:n].any() and resp[n:].all()
        assert "####" in tok.decode(ids[n:], skip_special_tokens=True)


def test_messages_parquet_uses_the_chat_template(tmp_path, tokenizer_dir):
    tok = char_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    tok.save_pretrained(tokenizer_dir)
    from datasets import Dataset

    rows = [
        {
            "messages": [
                {"role": "user", "content": f"hi {i}"},
                {"role": "assistant", "content": f"ok {i}"},
            ]
        }
        for i in range(8)
    ]
    Dataset.from_list(rows).to_parquet(tmp_path / "chat.parquet")
    dm = data_module(
        str(tokenizer_dir), source=str(tmp_path / "chat.parquet"), max_seq_len=32, val_fraction=0.25
    )
    dm.setup()
    batch = _rows(dm, "validation")
    assert all(p.startswith("<user>hi ") and p.endswith("<assistant>") for p in batch["prompt"])
    assert all(a.startswith("ok ") for a in batch["answer"])


def test_sequences_are_padded_and_truncated(tokenizer_dir, caplog):
    # 2-digit problems are 7 to 10 tokens with their eos: 9 cuts a minority, which is logged
    dm = data_module(str(tokenizer_dir), max_seq_len=9, train_size=64, val_size=64, test_size=64)
    dm.setup()
    batch = _rows(dm, "validation")
    assert batch["input_ids"].shape == (64, 9)
    pairs = zip(batch["prompt"], batch["answer"], strict=True)
    cut = sum(len(p) + len(a) + 1 > 9 for p, a in pairs)
    assert 0 < cut < 32
    assert f"max_seq_len=9: {cut} of 64 validation samples lose response tokens" in caplog.text


def test_stream_sampler_resumes_and_shards():
    full = list(StreamSampler(10, 25, seed=1))
    assert sorted(full[:10]) == list(range(10)) and sorted(full[10:20]) == list(range(10))
    assert list(StreamSampler(10, 25, seed=1, start=13)) == full[13:]
    ranks = [list(StreamSampler(10, 6, seed=1, rank=r, world=2)) for r in (0, 1)]
    assert [i for pair in zip(*ranks, strict=True) for i in pair] == full[:12]
    assert torch.tensor(full).unique().numel() == 10
