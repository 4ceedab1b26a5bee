"""The product installs as a wheel and runs from any directory (issue 22 item 2): what it reads at
run time (migrations, alembic.ini, dashboard templates) is package data, no product module finds a
file beside the checkout, and every model command reads the registry from PNEUMO_MODELS_DIR."""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ops.cli import app

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("core", "dicom_node", "serving", "worker", "training", "ops")
# `Path(__file__).parents[N]` / `.parent.parent`: a folder above the package, i.e. the checkout.
ABOVE_THE_PACKAGE = re.compile(r"__file__\)?(\.resolve\(\))?\.(parents\[|parent\.parent)")


def test_no_product_module_finds_files_from_the_checkout() -> None:
    found = [f"{path.relative_to(REPO)}:{number}"
             for package in PRODUCT for path in sorted((REPO / package).rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), start=1)
             if ABOVE_THE_PACKAGE.search(line)]
    assert found == []


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    # A copy of the tracked tree: the build writes build/ and *.egg-info, not into the checkout.
    source = out / "src"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, text=True,
                           check=True).stdout.split("\0")
    for name in filter(None, files):
        if name.split("/")[0] in (*PRODUCT, "pyproject.toml", "README.md") and (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO / name).read_bytes())
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out),
                            str(source)], capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-2000:]
    return zipfile.ZipFile(next(out.glob("pneumo-*.whl")))


def test_the_wheel_carries_migrations_alembic_ini_and_templates(wheel: zipfile.ZipFile) -> None:
    names = set(wheel.namelist())
    revisions = sorted(p.name for p in (REPO / "core" / "migrations" / "versions").glob("*.py"))
    assert revisions
    # Every tracked template (labels, scorecard, trends came after dashboard): the wheel is built
    # from the tracked tree, and a pattern in package-data that misses one fails here.
    templates = subprocess.run(["git", "ls-files", "ops/templates"], cwd=REPO, capture_output=True,
                               text=True, check=True).stdout.split()
    assert "ops/templates/dashboard.html" in templates
    expected = {"core/alembic.ini", "core/migrations/env.py", "core/migrations/script.py.mako",
                *templates,
                *(f"core/migrations/versions/{name}" for name in revisions)}
    assert expected - names == set()
    assert not any(name.startswith(("models/", "tests/", "migrations/")) for name in names)


def test_migrations_run_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.migrate import upgrade

    monkeypatch.chdir(tmp_path)
    upgrade(f"sqlite:///{tmp_path / 'pneumo.db'}")
    import sqlite3

    with sqlite3.connect(tmp_path / "pneumo.db") as db:
        tables = {row[0] for row in db.execute("select name from sqlite_master where type='table'")}
    assert {"studies", "instances", "alembic_version"} <= tables


@pytest.mark.parametrize("command", [["models", "list"], ["models", "serve", "pneumonia-cnn", "1"],
                                     ["scope", "fit", "--model", "pneumonia-cnn@1"]])
def test_model_commands_read_the_registry_from_the_setting(
    command: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`models serve` said "no model ... in <checkout>/models" with PNEUMO_MODELS_DIR set."""
    registry = tmp_path / "registry"
    registry.mkdir()
    monkeypatch.setenv("PNEUMO_MODELS_DIR", str(registry))
    result = CliRunner().invoke(app, command)
    assert str(registry) in result.output, result.output
    assert str(REPO / "models") not in result.output


def test_no_other_installed_distribution_provides_our_top_level_packages() -> None:
    """`ops` (Canonical's charm library) and `worker` are distributions on PyPI too: installed in
    one environment, one would overwrite the other's files. README, Installing."""
    from importlib.metadata import packages_distributions

    providers = packages_distributions()
    clashes = {name: sorted(set(providers.get(name, [])) - {"pneumo"}) for name in PRODUCT}
    assert {name: dists for name, dists in clashes.items() if dists} == {}
