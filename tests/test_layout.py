"""Tests and benchmarks stay apart: benchmarks import nothing from tests, and no test runs a
benchmark script (a benchmark may change its defaults or output for a measurement at any time)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            modules.add(node.module)
    return modules


def code_strings(path: Path) -> list[str]:
    """String constants that are not docstrings (a docstring may name a benchmark)."""
    tree = ast.parse(path.read_text(), str(path))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
                  and node.body and isinstance(node.body[0], ast.Expr)
                  and isinstance(node.body[0].value, ast.Constant)}
    return [node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
            and isinstance(node.value, str) and id(node) not in docstrings]


def test_benchmarks_import_nothing_from_tests() -> None:
    scripts = sorted((REPO / "benchmarks").glob("*.py"))
    assert scripts
    found = {script.name: sorted(m for m in imported_modules(script) if m.split(".")[0] == "tests")
             for script in scripts}
    assert {name: modules for name, modules in found.items() if modules} == {}


def test_no_test_runs_or_imports_a_benchmark() -> None:
    found = []
    for path in sorted((REPO / "tests").rglob("*.py")):
        if path == Path(__file__):
            continue
        if any(m.split(".")[0] == "benchmarks" for m in imported_modules(path)):
            found.append(f"{path.relative_to(REPO)} imports a benchmark")
        if any(text == "benchmarks" or "benchmarks/" in text for text in code_strings(path)):
            found.append(f"{path.relative_to(REPO)} names a benchmark in its code")
    assert found == []
