"""Where the prompt/response rows come from, one typed config per kind: the embedded arithmetic
task, the embedded skills task, or own files. Each gives the raw `train`, `validation` and
`test` splits (prompt, response, and for skills the skill)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from dmoe_train.data.arithmetic import arithmetic_split
from dmoe_train.data.own_files import read_rows
from dmoe_train.data.skills import SUITES, skills_split
from dmoe_train.settings import SettingError, refuse


def _check_sizes(source: Any) -> None:
    for key in ("train_size", "val_size", "test_size"):
        value = getattr(source, key)
        if not isinstance(value, int) or value < 1:
            raise refuse(key, value, "must be an integer >= 1")


@dataclass(frozen=True)
class ArithmeticSource:
    """Seeded addition/subtraction of up to `max_digits` digits; disjoint splits."""

    train_size: int
    val_size: int
    test_size: int
    max_digits: int = 2

    def __post_init__(self) -> None:
        _check_sizes(self)

    def splits(self, seed: int, tokenizer: PreTrainedTokenizerBase) -> dict[str, Dataset]:
        sizes = {"train": self.train_size, "validation": self.val_size, "test": self.test_size}
        return {
            split: Dataset.from_list(arithmetic_split(split, size, self.max_digits, seed))
            for split, size in sizes.items()
        }


@dataclass(frozen=True)
class SkillsSource:
    """The embedded skills task: `suite` `four` (the shipped bases') or `broad` (12 skills);
    `train_skills`: the skills the train split holds, `test_skills`: those validation and test
    hold (None: the suite's all). Held-out skills enter training in no form."""

    train_size: int
    val_size: int
    test_size: int
    suite: str = "four"
    train_skills: tuple[str, ...] | None = None
    test_skills: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        _check_sizes(self)
        if self.suite not in SUITES:
            raise refuse("suite", self.suite, f"must be one of {sorted(SUITES)}")
        for key in ("train_skills", "test_skills"):
            chosen = getattr(self, key)
            if chosen is None:
                continue
            skills = list(chosen)
            object.__setattr__(self, key, tuple(skills))
            names = list(SUITES[self.suite])
            if not skills:
                raise SettingError(key, f"=[]: empty; name at least one of {names}")
            unknown = [s for s in skills if s not in names]
            if unknown:
                why = f"unknown {unknown} in suite={self.suite}; each must be one of {names}"
                raise refuse(key, skills, why)

    def splits(self, seed: int, tokenizer: PreTrainedTokenizerBase) -> dict[str, Dataset]:
        sizes = {"train": self.train_size, "validation": self.val_size, "test": self.test_size}
        every = SUITES[self.suite]
        held = {"train": self.train_skills or every}
        return {
            split: Dataset.from_list(
                skills_split(split, size, seed, skills=held.get(split, self.test_skills or every))
            )
            for split, size in sizes.items()
        }


@dataclass(frozen=True)
class FileSource:
    """Own rows (`data.own_files`): a local file or folder, or a hub dataset name when online.
    Validation and test are seeded, disjoint fractions of its rows (test first), unless
    `test_source` names the test rows."""

    source: str
    val_fraction: float = 0.05
    test_fraction: float = 0.05
    test_source: str | None = None

    def __post_init__(self) -> None:
        for key in ("val_fraction", "test_fraction"):
            if not 0.0 < getattr(self, key) < 0.5:
                raise refuse(key, getattr(self, key), "must be in (0, 0.5)")

    def splits(self, seed: int, tokenizer: PreTrainedTokenizerBase) -> dict[str, Dataset]:
        loaded = read_rows("source", self.source, tokenizer)
        if self.test_source is not None:
            loaded["test"] = read_rows("test_source", self.test_source, tokenizer)["train"]
        rows = len(loaded["train"])
        for split, key, fraction in (
            ("test", "test_fraction", self.test_fraction),
            ("validation", "val_fraction", self.val_fraction),
        ):
            if split not in loaded:
                size = max(1, round(fraction * rows))
                if size >= len(loaded["train"]):
                    raise SettingError(
                        "source",
                        f"={self.source}: {rows} rows are too few to split off {key}={fraction}",
                    )
                parts = loaded["train"].train_test_split(test_size=size, seed=seed)
                loaded["train"], loaded[split] = parts["train"], parts["test"]
        return loaded


DataSource = ArithmeticSource | SkillsSource | FileSource
EMBEDDED = {"arithmetic": ArithmeticSource, "skills": SkillsSource}
# the settings of the embedded tasks that a preset may carry and own files do not use
EMBEDDED_ONLY = ("train_size", "val_size", "test_size", "max_digits", "suite")


def data_source(source: str, **settings: Any) -> DataSource:
    """The typed source `source` names (`arithmetic`, `skills`, else own files), from the
    settings of the data preset: each kind takes its own; a setting of another kind is
    refused, naming it, except the embedded tasks' sizes, which a preset carries for them and
    own files leave unused."""
    kind = EMBEDDED.get(source, FileSource)
    own = {f for f in kind.__dataclass_fields__ if f != "source"}
    foreign = [
        k for k, v in settings.items()
        if k not in own and v is not None and not (kind is FileSource and k in EMBEDDED_ONLY)
    ]  # fmt: skip
    if foreign:
        owner = next(
            (name for name, c in EMBEDDED.items() if foreign[0] in c.__dataclass_fields__),
            "own files",
        )
        raise refuse(
            foreign[0], settings[foreign[0]], f"only for source={owner}, not source={source}"
        )
    picked = {k: v for k, v in settings.items() if k in own}
    return FileSource(source, **picked) if kind is FileSource else kind(**picked)
