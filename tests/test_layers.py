"""Imports run one way: entry points -> training / evaluation -> data and checkpoints -> models
-> tensor objectives and kernels -> routing. Read from every module's source (ast), so a new
arrow that runs back up fails here, whoever adds it."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dmoe_train"
# module (or package) -> its layer; the first matching prefix names it
LAYERS: list[tuple[str, int, str]] = [
    ("dmoe_train.locations", 0, "base"),
    ("dmoe_train.routing", 1, "routing"),
    ("dmoe_train.grouped_experts", 2, "kernels and objectives"),
    ("dmoe_train.diffusion", 2, "kernels and objectives"),
    ("dmoe_train.metrics", 2, "kernels and objectives"),
    ("dmoe_train.regularizers", 2, "kernels and objectives"),
    ("dmoe_train.frontier", 2, "kernels and objectives"),
    ("dmoe_train.models", 3, "models"),
    ("dmoe_train.data", 4, "data and checkpoints"),
    ("dmoe_train.router_io", 4, "data and checkpoints"),
    ("dmoe_train.generate", 4, "data and checkpoints"),
    ("dmoe_train.finetuner", 5, "training"),
    ("dmoe_train.callbacks", 5, "training"),
    ("dmoe_train.checkpoint_io", 5, "training"),
    ("dmoe_train.run_dirs", 5, "training"),
    ("dmoe_train.decoding_eval", 5, "evaluation"),
    ("dmoe_train.harness", 5, "evaluation"),
    ("dmoe_train.self_generation", 5, "evaluation"),
    ("dmoe_train.cli", 6, "entry points"),
]


def layer_of(module: str) -> tuple[int, str]:
    for prefix, level, name in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return level, name
    raise AssertionError(f"{module}: in no layer of tests/test_layers.py (add it)")


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "dmoe_train":
            out.append((name, path))
    return out


def imports_of(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m.startswith("dmoe_train.")}


@pytest.mark.parametrize(("module", "path"), modules(), ids=[m for m, _ in modules()])
def test_imports_run_one_way(module, path):
    level, name = layer_of(module)
    for imported in imports_of(path):
        their_level, theirs = layer_of(imported)
        assert their_level < level or theirs == name, (
            f"{module} ({name}) imports {imported} ({theirs}): an arrow that runs back up"
        )


def test_the_rule_catches_an_arrow_back_up(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from dmoe_train.cli.common import CONFIG_DIR\n")
    (level, _), (theirs, _) = layer_of("dmoe_train.harness"), layer_of("dmoe_train.cli.common")
    assert imports_of(bad) == {"dmoe_train.cli.common"} and theirs > level
