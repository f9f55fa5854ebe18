"""The package's layout: no import cycle inside ``altrack``, and no import hidden in a function
unless it is a lazy import made on purpose (start-up time) and says so in a ``# lazy`` comment."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "altrack"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _imports(path: Path) -> list[tuple[ast.stmt, str, bool]]:
    """(statement, imported altrack module, inside a function) for each altrack import in ``path``."""
    tree = ast.parse(path.read_text())
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            in_function.update(id(child) for child in ast.walk(node) if child is not node)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            # `from altrack import report` imports the module altrack.report
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in MODULES else node.module
                     for a in node.names]  # fmt: skip
        else:
            continue
        found += [(node, name, id(node) in in_function) for name in names if name.split(".")[0] == "altrack"]
    return found


def _graph() -> dict[str, set[str]]:
    return {name: {target for _, target, _ in _imports(path) if target != name} for name, path in MODULES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)) is not None:
            return found
    return None


def test_the_checker_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_inside_altrack():
    assert len(MODULES) > 20  # the walk found the package
    assert _cycle(_graph()) is None


def _says_lazy(lines: list[str], index: int) -> bool:
    """The import on ``lines[index]``, or one above it in the same block of imports, says ``# lazy``."""
    while index >= 0 and lines[index].strip().startswith(("import ", "from ")):
        if "# lazy" in lines[index]:
            return True
        index -= 1
    return False


def test_imports_inside_functions_are_lazy_on_purpose():
    hidden = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for tree_node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(tree_node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(tree_node):
                if isinstance(node, ast.Import | ast.ImportFrom) and not _says_lazy(lines, node.lineno - 1):
                    hidden.append(f"{name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert hidden == []


def test_the_catalog_names_every_registered_method_in_order():
    from altrack.catalog import METHODS
    from altrack.selection import available_methods

    assert available_methods() == METHODS


def test_refusing_bad_grid_input_needs_no_torch():
    """The one-line refusals come before torch, MLflow or Optuna load (start-up under 1.5 s)."""
    import subprocess
    import sys

    code = ("import sys; from altrack.cli import main; main(['run', '--budget', '0']); "
            "print([m for m in ('torch', 'mlflow', 'optuna', 'matplotlib') if m in sys.modules])")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "budget k must be >= 1" in done.stderr
    assert done.stdout.strip() == "[]"
