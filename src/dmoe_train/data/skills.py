"""The embedded skills tasks: the four-skill suite of the shipped bases and a broad suite of 12.

Every answer is 47 to 53 characters long, so that each one spans at least two decoding blocks of
32 tokens, as a real model's answers do, and most are a chain whose last field is the result (the
"final answer" the published benchmarks score). Problems are drawn from seeded streams per skill
and assigned to a split by a hash of their text, so the splits never overlap whatever their
sizes, and a skill's problems do not depend on which other skills a suite holds.

The four skills (`SKILLS`, suite `four`):
- `add`: 6-digit addition written column by column, right to left, with the carries:
  `add 004821+000937=` -> `1+7+0=08 2+3+0=05 ...`: each column `a+b+carry=` and its two-digit
  sum, whose first digit is the next column's carry. Exact match needs every column.
- `sort`: 24 digits in ascending order, space separated.
- `reverse`: 24 letters in reverse order, space separated.
- `count`: 24 digits, and how often each digit occurs, in digit order with two-digit counts:
  `cnt 3141...=` -> `0=02 1=05 2=03 ...`.

The broad suite (`BROAD`, suite `broad`) adds eight of other kinds:
- `sub`: 6-digit subtraction (a >= b) column by column with the borrows: `4-7-0=17` is the
  column `4 - 7 - borrow 0`, the next borrow 1 and the digit 7.
- `mul`: a 6-digit number times one digit, column by column: `1*7+0=07`, the carry first.
- `max`, `min`: 24 digits, each one up or down from the last, and their running maximum
  (minimum); the last field is the result.
- `parity`: 24 bits and their running parity (xor); the last field is the parity.
- `copy`: 24 letters copied, space separated.
- `dedup`: 36 letters, 25 of them distinct, and the distinct ones in order of first appearance.
- `brackets`: 24 brackets that never close more than they opened, and the depth after each; the
  last field is how many stay open.

Key lookup (twelve keys with values, then the keys in another order) was the fourth skill first:
the 5-layer base never learned it (values right 31-33% of the time, chance 10%, after 4000 mixed
steps and 500 more lookup-only steps), so counting replaced it.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from itertools import accumulate

from dmoe_train.data.arithmetic import _split_of

SKILLS = ("add", "sort", "reverse", "count")
BROAD = (*SKILLS, "sub", "mul", "max", "min", "parity", "copy", "dedup", "brackets")
SUITES = {"four": SKILLS, "broad": BROAD}
DIGITS_ADD = 6
LIST_LENGTH = 24
DEDUP_DISTINCT, DEDUP_LENGTH = 25, 36
MAX_DEPTH = 9


def _add(rng: random.Random) -> tuple[str, str]:
    a, b = (rng.randrange(10**DIGITS_ADD) for _ in range(2))
    da, db = f"{a:0{DIGITS_ADD}d}", f"{b:0{DIGITS_ADD}d}"
    columns, carry = [], 0
    for x, y in zip(reversed(da), reversed(db), strict=True):
        total = int(x) + int(y) + carry
        columns.append(f"{x}+{y}+{carry}={total:02d}")
        carry = total // 10
    return f"add {da}+{db}=", " ".join(columns)


def _sort(rng: random.Random) -> tuple[str, str]:
    digits = [rng.choice(string.digits) for _ in range(LIST_LENGTH)]
    return f"sort {''.join(digits)}=", " ".join(sorted(digits))


def _reverse(rng: random.Random) -> tuple[str, str]:
    letters = [rng.choice(string.ascii_lowercase) for _ in range(LIST_LENGTH)]
    return f"rev {''.join(letters)}=", " ".join(reversed(letters))


def _count(rng: random.Random) -> tuple[str, str]:
    digits = [rng.choice(string.digits) for _ in range(LIST_LENGTH)]
    counts = " ".join(f"{d}={digits.count(d):02d}" for d in string.digits)
    return f"cnt {''.join(digits)}=", counts


def _sub(rng: random.Random) -> tuple[str, str]:
    a, b = sorted((rng.randrange(10**DIGITS_ADD) for _ in range(2)), reverse=True)
    da, db = f"{a:0{DIGITS_ADD}d}", f"{b:0{DIGITS_ADD}d}"
    columns, borrow = [], 0
    for x, y in zip(reversed(da), reversed(db), strict=True):
        diff = int(x) - int(y) - borrow
        nxt = int(diff < 0)
        columns.append(f"{x}-{y}-{borrow}={nxt}{diff % 10}")
        borrow = nxt
    return f"sub {da}-{db}=", " ".join(columns)


def _mul(rng: random.Random) -> tuple[str, str]:
    a, d = rng.randrange(10**DIGITS_ADD), rng.randrange(10)
    da = f"{a:0{DIGITS_ADD}d}"
    columns, carry = [], 0
    for x in reversed(da):
        total = int(x) * d + carry
        columns.append(f"{x}*{d}+{carry}={total:02d}")
        carry = total // 10
    return f"mul {da}*{d}=", " ".join(columns)


def _walk(rng: random.Random) -> list[str]:
    """24 digits, each one step up or down from the last (within 0-9): a running maximum of
    uniform digits would reach 9 within a few steps and stay there."""
    digits = [rng.randrange(10)]
    while len(digits) < LIST_LENGTH:
        step = rng.choice((-1, 1))
        digits.append(digits[-1] + step if 0 <= digits[-1] + step <= 9 else digits[-1] - step)
    return [str(d) for d in digits]


def _running(name: str, pick: Callable[[str, str], str]) -> Callable[[random.Random], tuple]:
    """24 digits of a walk and the running `pick` of them (max, min)."""

    def generate(rng: random.Random) -> tuple[str, str]:
        digits = _walk(rng)
        running = list(accumulate(digits, pick))
        return f"{name} {''.join(digits)}=", " ".join(running)

    return generate


def _parity(rng: random.Random) -> tuple[str, str]:
    bits = [rng.choice("01") for _ in range(LIST_LENGTH)]
    running = accumulate(bits, lambda p, b: str(int(p) ^ int(b)))
    return f"par {''.join(bits)}=", " ".join(running)


def _copy(rng: random.Random) -> tuple[str, str]:
    letters = [rng.choice(string.ascii_lowercase) for _ in range(LIST_LENGTH)]
    return f"copy {''.join(letters)}=", " ".join(letters)


def _dedup(rng: random.Random) -> tuple[str, str]:
    distinct = rng.sample(string.ascii_lowercase, DEDUP_DISTINCT)
    letters = list(distinct)
    for _ in range(DEDUP_LENGTH - DEDUP_DISTINCT):  # each repeat after its first appearance
        at = rng.randrange(1, len(letters) + 1)
        letters.insert(at, rng.choice(letters[:at]))
    return f"dup {''.join(letters)}=", " ".join(distinct)


def _brackets(rng: random.Random) -> tuple[str, str]:
    text, depths, depth = [], [], 0
    for _ in range(LIST_LENGTH):
        opens = depth == 0 or (depth < MAX_DEPTH and rng.random() < 0.5)
        depth += 1 if opens else -1
        text.append("(" if opens else ")")
        depths.append(str(depth))
    return f"brk {''.join(text)}=", " ".join(depths)


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "sort": _sort,
    "reverse": _reverse,
    "count": _count,
    "sub": _sub,
    "mul": _mul,
    "max": _running("max", max),
    "min": _running("min", min),
    "parity": _parity,
    "copy": _copy,
    "dedup": _dedup,
    "brackets": _brackets,
}


def final_answer(response: str) -> str:
    """The result a chain ends in: its last field (what a benchmark's final-answer score reads)."""
    return response.rsplit(" ", 1)[-1]


def skills_split(
    split: str,
    size: int,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    skills: tuple[str, ...] = SKILLS,
) -> list[dict[str, str]]:
    """`size` distinct problems of one split, `skills` interleaved in turn:
    `{"prompt": ..., "response": ..., "skill": ...}`. Each skill draws from its own stream, so a
    subset of the skills gives the same problems of those skills."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split={split!r}: must be train, validation or test")
    unknown = sorted(set(skills) - set(BROAD))
    if unknown or not skills:
        raise ValueError(f"skills {list(skills)}: each must be one of {list(BROAD)}")
    rngs = {skill: random.Random(f"{seed}-{split}-{skill}") for skill in skills}
    seen: set[str] = set()
    out = []
    while len(out) < size:
        skill = skills[len(out) % len(skills)]
        prompt, response = GENERATORS[skill](rngs[skill])
        if prompt in seen or _split_of(prompt, val_fraction, test_fraction) != split:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "response": response, "skill": skill})
    return out
