"""The embedded multi-skill task of the 256-expert base: four skills, four answer formats.

Every answer is 47 to 53 characters long, so that each one spans at least two decoding blocks of
32 tokens, as a real model's answers do. Problems are drawn from seeded streams per skill and
assigned to a split by a hash of their text, so the splits never overlap whatever their sizes.

- `add`: 6-digit addition written column by column, right to left, with the carries:
  `add 004821+000937=` -> `1+7+0=08 2+3+0=05 ...`: each column `a+b+carry=` and its two-digit
  sum, whose first digit is the next column's carry. Exact match needs every column.
- `sort`: 24 digits in ascending order, space separated.
- `reverse`: 24 letters in reverse order, space separated.
- `count`: 24 digits, and how often each digit occurs, in digit order with two-digit counts:
  `cnt 3141...=` -> `0=02 1=05 2=03 ...`.

Key lookup (twelve keys with values, then the keys in another order) was the fourth skill first:
the 5-layer base never learned it (values right 31-33% of the time, chance 10%, after 4000 mixed
steps and 500 more lookup-only steps), so counting replaced it.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from dmoe_train.data.arithmetic import _split_of

SKILLS = ("add", "sort", "reverse", "count")
DIGITS_ADD = 6
LIST_LENGTH = 24


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


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "sort": _sort,
    "reverse": _reverse,
    "count": _count,
}


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
    unknown = sorted(set(skills) - set(SKILLS))
    if unknown or not skills:
        raise ValueError(f"skills {list(skills)}: each must be one of {list(SKILLS)}")
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
