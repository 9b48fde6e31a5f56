"""Bad own data: files, lines and fields named; the format the base knows. (docs/reliability.md
lists the guarantees.)"""

import json
import logging

import pytest
import torch
from helpers import (
    compose_train,
    steps,
)
from spec_helpers import SUMS, evaluate, write_jsonl

from dmoe_train.cli.train import train


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, r"data.source=.*missing.jsonl: no such file"),
        ("", r"data.source=.*: empty"),
        ('{"foo": 1}\n', r"needs columns question and answer .* it has \['foo'\]"),
    ],
)
def test_bad_data_files(tmp_path, content, message):
    path = tmp_path / "missing.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises((FileNotFoundError, ValueError), match=message):
        train(compose_train(tmp_path / "run", f"data.source={path}"))


def test_own_data_cut_by_the_presets_max_seq_len_is_refused(tmp_path, no_model_load):
    rows = [{"question": f"say {i} in words please:", "answer": "a long answer " * 3} for i in SUMS]
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    with pytest.raises(
        ValueError,
        match=r"data.max_seq_len=16: 72 of 72 train samples lose response tokens to it "
        r"\(the longest needs \d+",
    ):
        train(compose_train(tmp_path / "run", f"data.source={data}"))


def test_own_data_gets_a_seeded_test_split_for_evaluation(tmp_path):
    data = write_jsonl(tmp_path / "sums.jsonl", SUMS)
    summary = train(
        compose_train(tmp_path / "run", f"data.source={data}", *steps(2), "evaluate_after=true")
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["samples"] == 4 and summary["steps"] == 2  # test_fraction 0.05 of 80 rows
    evaluated = evaluate(tmp_path / "eval", f"data.source={data}")
    assert evaluated["samples"] == 4 and 0 <= evaluated["accuracy"] <= 1


def test_own_test_source_is_used_as_the_test_split(tmp_path):
    train_rows, test_rows = SUMS[:60], SUMS[60:]
    data, held = (
        write_jsonl(tmp_path / "t.jsonl", train_rows),
        write_jsonl(tmp_path / "h.jsonl", test_rows),
    )
    metrics = evaluate(tmp_path / "eval", f"data.source={data}", f"+data.test_source={held}")
    assert metrics["samples"] == len(test_rows)


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (
            lambda d: (d / "a.jsonl").write_text('{"question": "1+1=", "answer": "2"}\n{oops\n'),
            r"a.jsonl:2: Expecting property name",
        ),
        (
            lambda d: write_jsonl(d / "a.jsonl", [*SUMS[:3], {"question": "2+2="}]),
            r"a.jsonl:4: field 'answer' is missing",
        ),
        (
            lambda d: (write_jsonl(d / "a.jsonl", SUMS), (d / "notes.txt").write_text("hi")),
            r"not data files \(.jsonl, .json or .parquet\): \['notes.txt'\]",
        ),
    ],
    ids=["malformed-line", "missing-field", "stray-file"],
)
def test_bad_data_rows_and_files_are_named(tmp_path, write, message, no_model_load):
    folder = tmp_path / "data"
    folder.mkdir()
    write(folder)
    with pytest.raises(ValueError, match=message):
        train(compose_train(tmp_path / "run", f"data.source={folder}"))


def test_question_answer_rows_read_as_the_plain_text_a_base_without_template_knows(
    tmp_path, tokenizer_dir, caplog
):
    from dmoe_train.data.module import data_module

    caplog.set_level(logging.INFO)
    qa = write_jsonl(tmp_path / "qa.jsonl", SUMS)
    plain = [{"prompt": r["question"], "response": r["answer"]} for r in SUMS]
    pr = write_jsonl(tmp_path / "pr.jsonl", plain)
    modules = [data_module(str(tokenizer_dir), source=str(f)) for f in (qa, pr)]
    for dm in modules:
        dm.setup()
    a, b = (dm.splits["train"][:]["input_ids"] for dm in modules)
    assert torch.equal(a, b)  # the same tokens: no chat wrapping, no newline the base never saw
    assert f"source={qa}: question -> prompt, answer -> response; the base has no chat " in (
        caplog.text
    )


@pytest.mark.parametrize("field", ["question", "answer"])
def test_an_empty_field_is_refused_naming_file_and_row(tmp_path, field, no_model_load):
    rows = [*SUMS[:5], {**SUMS[5], field: "  "}, *SUMS[6:]]
    data = write_jsonl(tmp_path / "sums.jsonl", rows)
    with pytest.raises(ValueError, match=rf"sums.jsonl:6: field '{field}' is empty"):
        train(compose_train(tmp_path / "run", f"data.source={data}"))
