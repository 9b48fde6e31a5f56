import hashlib
import json
import random

import pytest

from dmoe_train.data.module import data_module
from dmoe_train.data.skills import BROAD, GENERATORS, SKILLS, final_answer, skills_split


def test_splits_are_disjoint_seeded_and_hold_1000_test_problems():
    splits = {
        s: skills_split(s, n, seed=1)
        for s, n in [("train", 4000), ("validation", 500), ("test", 1000)]
    }
    prompts = {s: {r["prompt"] for r in rows} for s, rows in splits.items()}
    assert [len(p) for p in prompts.values()] == [4000, 500, 1000]  # distinct within a split
    assert not prompts["train"] & prompts["test"] and not prompts["train"] & prompts["validation"]
    assert not prompts["validation"] & prompts["test"]
    assert skills_split("test", 100, seed=1) == splits["test"][:100]
    assert skills_split("test", 100, seed=2) != splits["test"][:100]
    assert [r["skill"] for r in splits["test"][:8]] == [*SKILLS, *SKILLS]  # interleaved


def test_every_answer_spans_two_blocks_of_32_and_fits_96_tokens():
    for row in skills_split("test", 1200, skills=BROAD):
        assert 47 <= len(row["response"]) <= 53
        assert len(row["prompt"]) + len(row["response"]) < 96


def test_the_four_skill_data_is_what_the_shipped_bases_were_trained_and_tested_on():
    # digests of the first 400 rows of each split as the four-skill suite wrote them before the
    # broad suite existed: every skill draws from its own stream
    digests = {
        "train": "d229ba3f4ece1ee67daf01bd877ecaea6f1d47e13d5b1da9cd19bdc36745b8b4",
        "test": "d82c2a951acc190f7a5d601fa93865e6cf3d9540b5c8e2ed7291c9d0c7d86d02",
    }
    for split, digest in digests.items():
        rows = json.dumps(skills_split(split, 400, 0)).encode()
        assert hashlib.sha256(rows).hexdigest() == digest
    broad = skills_split("test", 1200, 0, skills=BROAD)
    assert [r for r in broad if r["skill"] == "sort"][:50] == [
        r for r in skills_split("test", 400, 0) if r["skill"] == "sort"
    ][:50]
    assert [r["skill"] for r in broad[:12]] == list(BROAD)


class Digits(random.Random):
    """Draws `randrange` values from a fixed list."""

    def __init__(self, *values: int) -> None:
        super().__init__(0)
        self.values = iter(values)

    def randrange(self, *_):
        return next(self.values)


def test_subtraction_writes_every_column_with_its_borrow():
    prompt, answer = GENERATORS["sub"](Digits(937, 4821))  # drawn in either order: a >= b
    assert prompt == "sub 004821-000937="
    assert answer == "1-7-0=14 2-3-1=18 8-9-1=18 4-0-1=03 0-0-0=00 0-0-0=00"


def test_multiplication_by_a_digit_writes_every_column_with_its_carry():
    prompt, answer = GENERATORS["mul"](Digits(4821, 7))
    assert prompt == "mul 004821*7="
    assert answer == "1*7+0=07 2*7+0=14 8*7+1=57 4*7+5=33 0*7+3=03 0*7+0=00"


def test_addition_writes_every_column_with_its_carry():
    class Fixed(random.Random):  # draws 4821 then 937
        values = iter([4821, 937])

        def randrange(self, *_):
            return next(self.values)

    prompt, answer = GENERATORS["add"](Fixed())
    assert prompt == "add 004821+000937="
    assert answer == "1+7+0=08 2+3+0=05 8+9+0=17 4+0+1=05 0+0+0=00 0+0+0=00"


def test_counting_writes_every_digit_with_a_two_digit_count():
    class Fixed(random.Random):  # draws 3 1 4 1 5 9 2 6 and then sixteen 0s
        digits = iter("31415926" + "0" * 16)

        def choice(self, _):
            return next(self.digits)

    prompt, answer = GENERATORS["count"](Fixed())
    assert prompt == "cnt 314159260000000000000000="
    assert answer == "0=16 1=02 2=01 3=01 4=01 5=01 6=01 7=00 8=00 9=01"


@pytest.mark.parametrize("skill", SKILLS)
def test_answers_follow_their_skill(skill):
    for row in [r for r in skills_split("validation", 200) if r["skill"] == skill]:
        body = row["prompt"].split(" ", 1)[1].rstrip("=")
        if skill == "add":
            a, b = body.split("+")
            columns = row["response"].split(" ")
            sums = [int(c[-2:]) for c in columns]
            digits = "".join(str(s % 10) for s in reversed(sums))
            assert int(str(sums[-1] // 10) + digits) == int(a) + int(b)
        elif skill == "sort":
            assert row["response"].split(" ") == sorted(body)
        elif skill == "reverse":
            assert row["response"].split(" ") == list(reversed(body))
        elif skill == "count":
            counts = dict(pair.split("=") for pair in row["response"].split(" "))
            assert list(counts) == list("0123456789")  # every digit, in order, even if absent
            assert {d: int(c) for d, c in counts.items()} == {d: body.count(d) for d in counts}
            assert all(len(c) == 2 for c in counts.values()) and len(body) == 24


@pytest.mark.parametrize("skill", BROAD[len(SKILLS) :])
def test_broad_answers_follow_their_skill(skill):
    rows = [r for r in skills_split("validation", 480, skills=BROAD) if r["skill"] == skill]
    assert len(rows) == 40
    for row in rows:
        body = row["prompt"].split(" ", 1)[1].rstrip("=")
        fields = row["response"].split(" ")
        if skill in ("sub", "mul"):
            a, b = body.split("-" if skill == "sub" else "*")
            digits = "".join(c[-1] for c in reversed(fields))
            want = int(a) - int(b) if skill == "sub" else int(a) * int(b)
            assert int(fields[-1][-2] + digits if skill == "mul" else digits) == want
        elif skill in ("max", "min"):
            pick = max if skill == "max" else min
            assert fields == [pick(body[: i + 1]) for i in range(24)]
            assert all(abs(int(x) - int(y)) == 1 for x, y in zip(body, body[1:], strict=False))
        elif skill == "parity":
            assert fields == [str(body[: i + 1].count("1") % 2) for i in range(24)]
        elif skill == "copy":
            assert fields == list(body)
        elif skill == "dedup":
            assert fields == list(dict.fromkeys(body)) and len(body) == 36 and len(fields) == 25
        else:
            depths = [body[: i + 1].count("(") - body[: i + 1].count(")") for i in range(24)]
            assert fields == [str(d) for d in depths] and min(depths) >= 0 and max(depths) <= 9
        assert final_answer(row["response"]) == fields[-1]


def test_the_data_module_serves_skills_with_their_names(tokenizer_dir):
    dm = data_module(
        str(tokenizer_dir),
        "skills",
        max_seq_len=96,
        train_size=40,
        val_size=8,
        test_size=12,
        eval_batch_size=12,
    )
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    assert batch["skill"] == [*SKILLS] * 3
    assert batch["input_ids"].shape == (12, 96)


def test_held_out_skills_never_enter_the_train_split(tokenizer_dir):
    dm = data_module(
        str(tokenizer_dir),
        "skills",
        max_seq_len=96,
        train_size=40,
        val_size=8,
        test_size=8,
        train_skills=["add", "sort"],
    )
    dm.setup()
    assert set(dm.splits["train"]["skill"]) == {"add", "sort"}
    assert set(dm.splits["test"]["skill"]) == set(dm.splits["validation"]["skill"]) == set(SKILLS)
    # the same add and sort problems as the four-skill stream's, in their order
    full = [r for r in skills_split("train", 80, 0) if r["skill"] in ("add", "sort")][:40]
    assert dm.splits["train"]["prompt"] == [r["prompt"] for r in full]
    sizes = {"train_size": 8, "val_size": 8, "test_size": 8}
    unknown = r"^train_skills=\['add', 'lookup'\]: unknown \['lookup'\]"
    with pytest.raises(ValueError, match=unknown):
        data_module(str(tokenizer_dir), "skills", train_skills=["add", "lookup"], **sizes)
    with pytest.raises(ValueError, match=r"^train_skills=\['add'\]: only for source=skills"):
        data_module(str(tokenizer_dir), "arithmetic", train_skills=["add"], **sizes)


def test_a_suite_and_a_test_side_selection_pick_the_skills(tokenizer_dir):
    sizes = {"max_seq_len": 96, "train_size": 24, "val_size": 12, "test_size": 12}
    dm = data_module(str(tokenizer_dir), "skills", suite="broad", **sizes,
                     train_skills=["dedup", "mul"], test_skills=["brackets", "add"])  # fmt: skip
    dm.setup()
    assert set(dm.splits["train"]["skill"]) == {"dedup", "mul"}
    assert dm.splits["test"]["skill"] == ["brackets", "add"] * 6
    assert set(dm.splits["validation"]["skill"]) == {"brackets", "add"}
    with pytest.raises(ValueError, match=r"^suite=wide: must be one of \['broad', 'four'\]"):
        data_module(str(tokenizer_dir), "skills", suite="wide", **sizes)
    # the four-skill suite has no dedup: named with the suite
    with pytest.raises(
        ValueError, match=r"^test_skills=\['dedup'\]: unknown \['dedup'\] in suite=four"
    ):
        data_module(str(tokenizer_dir), "skills", test_skills=["dedup"], **sizes)


def test_own_rows_under_the_skills_preset_leave_its_suite_unused(tmp_path):
    # a study trains on the base's generations with data=skills data.source=<rows>
    from dmoe_train.data.sources import FileSource, data_source

    kind = data_source(str(tmp_path / "rows"), suite="four", train_size=8, test_skills=None)
    assert isinstance(kind, FileSource)
    with pytest.raises(ValueError, match=r"^train_skills=\['add'\]: only for source=skills"):
        data_source(str(tmp_path / "rows"), suite="four", train_skills=["add"])
