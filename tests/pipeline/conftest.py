"""Fixtures for tests that run the product as processes: `pneumo run` and dcmtk peers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REDIS_TEST_URL
from tests.helpers import dcmtk, echo, free_port, interrupt, wait_for

REPO = Path(__file__).resolve().parents[2]


def start_storescp(folder: Path, port: int) -> subprocess.Popen:
    return subprocess.Popen(
        [dcmtk("storescp"), "-aet", "PACS", "-od", str(folder), "+xa", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


@pytest.fixture
def pacs_address(tmp_path: Path) -> dict:
    """Where the PACS will be: an AE address and the folder its storescp writes to."""
    folder = tmp_path / "pacs"
    folder.mkdir()
    port = free_port()
    return {"ae": f"PACS@127.0.0.1:{port}", "folder": folder, "port": port}


@pytest.fixture
def pacs(pacs_address: dict):
    """dcmtk storescp as the PACS: every received object lands in a folder."""
    process = start_storescp(pacs_address["folder"], pacs_address["port"])
    yield {**pacs_address, "process": process}
    process.terminate()
    process.wait(timeout=10)


def embedded_env(home: Path, pacs_ae: str, models_dir: Path) -> dict[str, str]:
    """`pneumo run` on embedded defaults: free ports, quick settling, SRs to `pacs_ae`."""
    env = dict(os.environ)
    env.update({
        "PNEUMO_HOME": str(home),
        "PNEUMO_PORT": str(free_port()),
        "PNEUMO_DASHBOARD_PORT": str(free_port()),
        "PNEUMO_HOST": "127.0.0.1",
        "PNEUMO_PACS": pacs_ae,
        "PNEUMO_QUIET_SECONDS": "1",
        "PNEUMO_DELIVERY_BACKOFF_S": "1",
        "PNEUMO_MODELS_DIR": str(models_dir),
        "PNEUMO_ALLOWED_PEERS": "STORESCU,PNEUMO-SEND",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    })
    return env


@pytest.fixture(params=["embedded", "postgresql-redis"])
def pipeline_env(request, tmp_path: Path, tiny_registry: Path, pacs_address) -> dict[str, str]:
    env = embedded_env(tmp_path / "home", pacs_address["ae"], tiny_registry)
    if request.param == "postgresql-redis":
        import redis

        env["PNEUMO_DATABASE_URL"] = request.getfixturevalue("database_url_postgres_fresh")
        env["PNEUMO_BROKER_URL"] = f"{REDIS_TEST_URL}/7"
        redis.Redis.from_url(env["PNEUMO_BROKER_URL"]).flushdb()
    return env


def database_url(env: dict[str, str]) -> str:
    return env.get("PNEUMO_DATABASE_URL") or f"sqlite:///{env['PNEUMO_HOME']}/pneumo.db"


@pytest.fixture
def running(pipeline_env: dict[str, str]):
    """`pneumo run`, waited for until the node answers C-ECHO; stopped with SIGINT (Ctrl-C)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "run"], env=pipeline_env, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_for(lambda: echo(pipeline_env["PNEUMO_PORT"]), 90, "the node to answer C-ECHO")
        yield pipeline_env
    finally:
        output = stop_pneumo_run(process, Path(pipeline_env["PNEUMO_HOME"]))
    assert "pneumo: stopped" in output


def stop_pneumo_run(process: subprocess.Popen, home: Path) -> str:
    """Ctrl-C, as an operator would; print the children's logs for a failing test; its output."""
    output = interrupt(process)
    for log in sorted(home.glob("*.log")):
        print(f"--- {log.name}\n{log.read_text()[-3000:]}")
    print(f"--- pneumo run\n{output[-2000:]}")
    return output


def sr_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("SR*"))


