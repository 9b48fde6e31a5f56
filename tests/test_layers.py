"""Imports run one way: entry points (`cli`, `studies`) -> `training` / `evaluation` -> `data` ->
`models` -> `objectives` -> `routing`. Read from every module's source (ast, function-local
imports included), so a new arrow that runs back up fails here, whoever adds it; `training` and
`evaluation` never import each other, nothing imports an entry point, and no module imports
itself in a circle, inside a layer either."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dmoe_train"
# module (or package) -> its layer; the first matching prefix names it. One folder per layer; the
# flat modules at the bottom are plain helpers (paths, files, memory); `resolvers` is what the
# entry points share
LAYERS: list[tuple[str, int, str]] = [
    ("dmoe_train.locations", 0, "base"),
    ("dmoe_train.files", 0, "base"),
    ("dmoe_train.memory", 0, "base"),
    ("dmoe_train.settings", 0, "base"),
    ("dmoe_train.reports", 0, "base"),
    ("dmoe_train.routing", 1, "routing"),
    ("dmoe_train.objectives", 2, "objectives"),
    ("dmoe_train.models", 3, "models"),
    ("dmoe_train.data", 4, "data"),
    ("dmoe_train.training", 5, "training"),
    ("dmoe_train.evaluation", 5, "evaluation"),
    ("dmoe_train.resolvers", 6, "entry points"),
    ("dmoe_train.cli", 7, "entry points"),
    ("dmoe_train.studies", 7, "studies"),
]
ENTRY_POINTS = ("dmoe_train.cli.", "dmoe_train.studies.")  # imported only from within themselves


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
        entry = next((e for e in ENTRY_POINTS if (imported + ".").startswith(e)), None)
        assert entry is None or (module + ".").startswith(entry), (
            f"{module} imports the entry point {imported}: nothing imports an entry point"
        )


def test_the_rule_catches_an_arrow_back_up(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("from dmoe_train.cli.common import CONFIG_DIR\n")
    (level, _), (theirs, _) = (
        layer_of("dmoe_train.evaluation.lm_eval_model"),
        layer_of("dmoe_train.cli.common"),
    )
    assert imports_of(bad) == {"dmoe_train.cli.common"} and theirs > level


def import_graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (function-local imports included), each
    import of `a.b.c` counted as one of the module itself, else of its package."""
    names = {name for name, _ in modules()}
    graph = {}
    for name, path in modules():
        targets = set()
        for imported in imports_of(path):
            while imported not in names and "." in imported:
                imported = imported.rsplit(".", 1)[0]
            if imported in names and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The import circles of `graph` (a package importing its own submodules is no circle)."""
    found, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if nxt.startswith(node + "."):  # a package and its own submodules
                continue
            if state.get(nxt) == "open":
                found.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_module_imports_itself_in_a_circle():
    assert cycles(import_graph()) == []


def test_the_circle_check_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "p": {"p.x"}, "p.x": set()}
    assert cycles(graph) == [["a", "b", "c", "a"]]
