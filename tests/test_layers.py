"""The layering rules of the tree, read from the code itself (every import, those inside
functions included): a newcomer can tell where new code belongs, and CI says when it does not.

- core/ (the ground) imports nothing of ours above it, and never Keras or TensorFlow;
- dicom_node/ (the edge) imports only the ground;
- training/ imports only the ground;
- worker/ imports the ground and training, never ops/ or the edge;
- ops/ (the face) may import every part;
- devtools/ (ports, waiting, dcmtk for tests, drills and benchmarks) imports nothing of ours, and
  the product imports neither it nor tests (tests/test_layout.py keeps tests and benchmarks apart).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGES = ("core", "dicom_node", "worker", "training", "ops", "devtools")
OUTSIDE = {"devtools", "tests"}  # run the product from outside; never imported by it
FORBIDDEN = {
    "core": {"dicom_node", "worker", "training", "ops", "keras", "tensorflow", *OUTSIDE},
    "dicom_node": {"worker", "training", "ops", "keras", "tensorflow", *OUTSIDE},
    "training": {"worker", "dicom_node", "ops", *OUTSIDE},
    "worker": {"ops", "dicom_node", *OUTSIDE},
    "ops": OUTSIDE,
    "devtools": {"core", "dicom_node", "worker", "training", "ops", "tests"},
}


def imported_packages(path: Path, package: str) -> set[tuple[str, int]]:
    """(top-level package, line) of every import in a file of `package`, at any depth (inside
    functions too); a relative import counts as `package` itself."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update((alias.name.split(".")[0], node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            found.add((package if node.level else str(node.module).split(".")[0], node.lineno))
    return found


def violations(package: str) -> list[str]:
    return sorted(
        f"{path.relative_to(REPO)}:{line} imports {name}"
        for path in (REPO / package).rglob("*.py")
        for name, line in imported_packages(path, package)
        if name in FORBIDDEN[package]
    )


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_the_layers_below_it(package: str) -> None:
    assert violations(package) == []


def test_the_check_sees_imports_inside_functions(tmp_path: Path) -> None:
    """A late import (inside a function) breaks the layering as much as one at the top."""
    late = tmp_path / "late.py"
    late.write_text("from . import contract\n\ndef load():\n    import keras.saving\n"
                    "    from worker.tasks import register\n")
    assert imported_packages(late, "core") == {("core", 1), ("keras", 4), ("worker", 5)}
