"""The embedded default task: seeded multi-digit addition and subtraction.

Every distinct problem lands in exactly one split, chosen by a hash of its text, so the train,
validation and test splits never overlap whatever their sizes.
"""

from __future__ import annotations

import hashlib
import random


def _split_of(problem: str, val_fraction: float, test_fraction: float) -> str:
    u = int.from_bytes(hashlib.sha256(problem.encode()).digest()[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "validation" if u < test_fraction + val_fraction else "train"


def arithmetic_split(
    split: str,
    size: int,
    max_digits: int = 2,
    seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
) -> list[dict[str, str]]:
    """`size` distinct problems of one split: `{"prompt": "47+85=", "response": "132"}`."""
    if split not in ("train", "validation", "test"):
        raise ValueError(f"split={split!r}: must be train, validation or test")
    top = 10**max_digits
    space = 2 * top * top
    budget = space * (val_fraction if split == "validation" else test_fraction)
    budget = space - 2 * budget if split == "train" else budget
    if size > 0.9 * budget:
        raise ValueError(
            f"data size={size} for split {split!r}: max_digits={max_digits} gives only "
            f"~{int(budget)} distinct problems"
        )
    rng = random.Random(f"{seed}-{split}")
    seen: set[str] = set()
    out = []
    while len(out) < size:
        a, b, op = rng.randrange(top), rng.randrange(top), rng.choice("+-")
        prompt = f"{a}{op}{b}="
        if prompt in seen or _split_of(prompt, val_fraction, test_fraction) != split:
            continue
        seen.add(prompt)
        out.append({"prompt": prompt, "response": str(a + b if op == "+" else a - b)})
    return out
