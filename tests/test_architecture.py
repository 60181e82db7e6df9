"""The shape of the code (issues 13 and 25): packages import one way (the may-import table
below, lazy imports included, no cycle), the top of src/resfit holds only the entry points, the
run folder's owner and packages, and modules and functions stay small."""

from __future__ import annotations

import ast
import re
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "resfit"
MAX_FUNCTION_LINES = 60
MAX_MODULE_LINES = 500

# What each part may import (besides itself). The parts are layers: each may import the
# ones listed, never one above it. ``runs`` is the run folder's owner (src/resfit/runs.py).
_BASE = {"core"}
MAY_IMPORT: dict[str, set[str]] = {
    "core": set(),
    "tasks": _BASE,
    "data": _BASE,
    "models": _BASE | {"data"},
    "runs": _BASE | {"tasks"},
    "inference": _BASE | {"tasks", "data", "models", "runs"},
    "export": _BASE | {"tasks", "data", "models", "runs", "inference"},
    "insight": _BASE | {"tasks", "data", "models", "runs", "inference"},
    "quality": _BASE | {"tasks", "data", "models", "runs", "inference", "insight"},
    "training": _BASE | {"tasks", "data", "models", "runs", "inference", "insight", "quality"},
    "apps": _BASE
    | {"tasks", "data", "models", "runs", "inference", "export", "insight", "quality", "training"},
}
MAY_IMPORT["cli"] = set(MAY_IMPORT) | {"apps"}
MAY_IMPORT["__main__"] = {"cli"}
TOP_LEVEL_FILES = {"__init__.py", "__main__.py", "cli.py", "runs.py"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in SRC.rglob("*.py")}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def import_graph() -> dict[str, set[str]]:
    """Every resfit module -> the resfit modules it imports anywhere (top level or in a
    function: a lazy import is still a dependency)."""
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node)
                targets = [f"{base}.{a.name}" for a in node.names] + [base]
            for t in targets:
                while t and t not in modules:
                    t = t.rpartition(".")[0]
                if t and t != name and t != "resfit":
                    graph[name].add(t)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_no_import_cycles() -> None:
    # A package's __init__ re-exports its submodules, so a submodule that imports its own
    # package (``from . import sibling``) closes a cycle: it must name the sibling module.
    graph = import_graph()
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_function_over_60_lines() -> None:
    long = []
    for path in SRC.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


def test_low_level_modules_import_no_torch() -> None:
    """``resfit --help`` answers at once because the CLI's own imports avoid torch."""
    for name in ("resfit.core.errors", "resfit.core.config"):
        path = _modules()[name]
        imported = {
            a.name.split(".")[0]
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Import)
            for a in node.names
        } | {
            (node.module or "").split(".")[0]
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.ImportFrom) and node.level == 0
        }
        assert not imported & {"torch", "torchvision", "numpy"}, name


def _part(module: str) -> str:
    return module.split(".")[1]


def test_parts_import_only_the_parts_below_them() -> None:
    wrong = sorted(
        f"{a} -> {b}"
        for a, targets in import_graph().items()
        if a != "resfit"
        for b in targets
        if _part(b) != _part(a) and _part(b) not in MAY_IMPORT[_part(a)]
    )
    assert not wrong, wrong


def test_the_may_import_table_has_no_cycle() -> None:
    assert _cycle({k: set(v) for k, v in MAY_IMPORT.items()}) is None


def test_top_level_holds_entry_points_the_run_folder_and_packages_only() -> None:
    loose = sorted(p.name for p in SRC.glob("*.py") if p.name not in TOP_LEVEL_FILES)
    assert not loose, f"modules outside a package: {loose}"
    unknown = sorted(p.name for p in SRC.iterdir() if p.is_dir() and p.name not in MAY_IMPORT)
    assert not [u for u in unknown if u != "__pycache__"], unknown


def test_no_module_over_500_lines() -> None:
    big = {
        str(p.relative_to(SRC)): n
        for p in SRC.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not big, big


# Outside tasks/, no code asks whether labels are single or multiple: it asks the task (or, in
# data/, the task's label coding, core/labels.py). Issue 25.
def task_branches(tree: ast.AST) -> int:
    """Conditions (if, conditional expressions, while, comprehension filters) that mention
    multi-label."""
    count = 0
    for node in ast.walk(tree):
        tests: list[ast.expr] = []
        if isinstance(node, ast.If | ast.IfExp | ast.While):
            tests = [node.test]
        elif isinstance(node, ast.comprehension):
            tests = list(node.ifs)
        count += sum(bool(re.search("multi_?label", ast.unparse(t), re.I)) for t in tests)
    return count


def test_no_single_or_multi_label_branch_outside_tasks() -> None:
    found = {}
    for path in SRC.rglob("*.py"):
        rel = path.relative_to(SRC).as_posix()
        if not rel.startswith("tasks/") and (n := task_branches(ast.parse(path.read_text()))):
            found[rel] = n
    assert not found, f"conditions on multi-label outside tasks/ (ask the task instead): {found}"


def test_the_task_branch_counter_counts() -> None:
    tree = ast.parse(
        "if task == 'multilabel':\n    pass\nx = 1 if is_multilabel else 2\n"
        "y = [a for a in b if a]\nif multipart:\n    pass"
    )
    assert task_branches(tree) == 2
