"""What a newcomer meets first: `pneumo status` in the wrong place, `pneumo models list`, the
README's requirements and the package metadata."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.conftest import REPO


def pneumo(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], env={**os.environ, **(env or {})},
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("make_home", [False, True], ids=["missing home", "empty home"])
def test_status_without_a_database_says_where_it_looked_and_which_setting_to_use(
    tmp_path: Path, make_home: bool
) -> None:
    home = tmp_path / "elsewhere"
    if make_home:
        home.mkdir()
    # A broker that takes the connection and never answers: had status asked it before finding
    # the database missing, it would hang past the timeout (no timing that load can break).
    with socket.create_server(("127.0.0.1", 0)) as silent_broker:
        result = pneumo("status", timeout=90, env={
            "PNEUMO_HOME": str(home), "PNEUMO_DATABASE_URL": "",
            "PNEUMO_BROKER_URL": f"redis://127.0.0.1:{silent_broker.getsockname()[1]}/0"})
    assert result.returncode == 1
    assert "Traceback" not in result.stdout + result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert f"no database at {home / 'pneumo.db'}" in result.stderr
    assert "PNEUMO_HOME" in result.stderr and "PNEUMO_DATABASE_URL" in result.stderr
    assert not (home / "pneumo.db").exists()  # looking did not create an empty database


def test_status_on_an_unreachable_database_names_it_without_its_password(tmp_path: Path) -> None:
    from tests.helpers import free_port

    url = f"postgresql+psycopg://pneumo:hunter2secret@127.0.0.1:{free_port()}/pneumo"
    result = pneumo("status", env={"PNEUMO_HOME": str(tmp_path), "PNEUMO_DATABASE_URL": url})
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and "hunter2secret" not in result.stderr
    assert "cannot read the database at postgresql+psycopg://pneumo:***@127.0.0.1" in result.stderr
    assert "PNEUMO_DATABASE_URL" in result.stderr


def test_models_list_says_not_read_for_test_figures_never_computed() -> None:
    result = pneumo("models", "list", "--models-dir", str(REPO / "models"))
    assert result.returncode == 0, result.stderr
    assert "nan" not in result.stdout
    member = next(line for line in result.stdout.splitlines() if "20261126T140026Z" in line.split()[:2])
    assert member.split()[-4:] == ["not", "read", "not", "read"]
    served = next(line for line in result.stdout.splitlines() if "20261126T073806Z" in line.split()[:2])
    assert "0.8702" in served  # figures that were read are still printed


def test_readme_requirements_name_every_package_the_tests_need() -> None:
    readme = (REPO / "README.md").read_text()
    requirements = readme.split("Requirements:", 1)[1].split("\n\n", 1)[0]
    for package in ("dcmtk", "dicom3tools", "orthanc", "chromium", "chromium-driver", "docker-compose"):
        assert re.search(rf"`{re.escape(package)}`", requirements), package
    try_it = readme.split("Try it", 1)[1].split("```", 1)[0]
    assert "PNEUMO_HOME" in try_it


def test_license_is_an_spdx_expression_that_the_required_setuptools_accepts() -> None:
    """A `{text = ...}` table makes setuptools >= 77 warn that it is deprecated (an error from 2027)."""
    from packaging.licenses import canonicalize_license_expression
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    license_ = pyproject["project"]["license"]
    assert isinstance(license_, str)
    assert canonicalize_license_expression(license_) == license_
    setuptools = next(Requirement(r) for r in pyproject["build-system"]["requires"]
                      if Requirement(r).name == "setuptools")
    assert not setuptools.specifier.contains("76.9") and setuptools.specifier.contains("77.0")
