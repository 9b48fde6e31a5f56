import random

import pytest

from dmoe_train.data.module import data_module
from dmoe_train.data.skills import GENERATORS, SKILLS, skills_split


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
    for row in skills_split("test", 1000):
        assert len(row["response"]) >= 33 and len(row["prompt"]) + len(row["response"]) < 96


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
        else:
            counts = dict(pair.split("=") for pair in row["response"].split(" "))
            assert list(counts) == list("0123456789")  # every digit, in order, even if absent
            assert {d: int(c) for d, c in counts.items()} == {d: body.count(d) for d in counts}
            assert all(len(c) == 2 for c in counts.values()) and len(body) == 24


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
