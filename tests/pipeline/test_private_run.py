"""`pneumo run` keeps everything under PNEUMO_HOME private to the service user (issue 16: stored
images, SR files, the SQLite database, the broker's append-only file and the logs were 0644)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from ops.send import wrap_image
from tests.conftest import DATA
from tests.helpers import dcmtk, wait_for
from tests.pipeline.conftest import sr_files

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("pipeline_env", ["embedded"], indirect=True)
def test_every_file_pneumo_run_creates_is_private(running: dict[str, str], pacs, tmp_path: Path) -> None:
    """Started with the test's umask (022 here, as service accounts usually have)."""
    dataset = wrap_image(sorted((DATA / "test" / "PNEUMONIA").iterdir())[0])
    path = tmp_path / "image.dcm"
    dataset.save_as(path, enforce_file_format=True)
    subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1",
                    running["PNEUMO_PORT"], str(path)], check=True, capture_output=True)
    wait_for(lambda: sr_files(pacs["folder"]), 120, "the SR at the PACS")
    home = Path(running["PNEUMO_HOME"])
    wait_for(lambda: any(home.glob("sr/*")), 30, "the SR file in home")
    entries = [home, *home.rglob("*")]
    kinds = {"stored image": "storage/*/*/*.dcm", "SR": "sr/*", "database": "pneumo.db",
             "broker's append-only file": "**/*.aof", "log": "*.log"}
    for kind, pattern in kinds.items():
        assert list(home.glob(pattern)), f"no {kind} found under {home}"
    assert {str(p): oct(p.stat().st_mode & 0o077) for p in entries} == {str(p): "0o0" for p in entries}
