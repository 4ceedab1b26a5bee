"""The whole product as users run it: `pneumo run` (node, workers, scheduler) as a process,
dcmtk's storescu as the modality/PACS sender and dcmtk's storescp as the PACS receiving SRs.

Runs on both back-ends: the embedded default (SQLite + bundled Redis socket) and the production
shape (PostgreSQL + the machine's Redis).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from highdicom.sr import srread
from pydicom import dcmread
from sqlalchemy import select

from core.db import Instance, Result, session_factory
from dicom_node.send import wrap_image
from tests.conftest import DATA, REDIS_TEST_URL, free_port, link_subset

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.5):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@pytest.fixture
def pacs(tmp_path: Path):
    """dcmtk storescp as the PACS: every received object lands in a folder."""
    folder = tmp_path / "pacs"
    folder.mkdir()
    port = free_port()
    process = subprocess.Popen(
        ["storescp", "-aet", "PACS", "-od", str(folder), "+xa", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    yield {"ae": f"PACS@127.0.0.1:{port}", "folder": folder, "port": port, "process": process}
    process.terminate()
    process.wait(timeout=10)


@pytest.fixture(params=["embedded", "postgresql-redis"])
def pipeline_env(request, tmp_path: Path, tiny_registry: Path, pacs) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PNEUMO_HOME": str(tmp_path / "home"),
        "PNEUMO_PORT": str(free_port()),
        "PNEUMO_HOST": "127.0.0.1",
        "PNEUMO_PACS": pacs["ae"],
        "PNEUMO_QUIET_SECONDS": "1",
        "PNEUMO_MODELS_DIR": str(tiny_registry),
        "PNEUMO_ALLOWED_PEERS": "STORESCU,PNEUMO-SEND",
        "TF_CPP_MIN_LOG_LEVEL": "2",
    })
    if request.param == "postgresql-redis":
        import redis

        env["PNEUMO_DATABASE_URL"] = request.getfixturevalue("database_url_postgres_fresh")
        env["PNEUMO_BROKER_URL"] = f"{REDIS_TEST_URL}/7"
        redis.Redis.from_url(env["PNEUMO_BROKER_URL"]).flushdb()
    return env


@pytest.fixture
def database_url_postgres_fresh(postgres_url: str) -> str:
    from sqlalchemy import text

    from core.db import make_engine

    engine = make_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return postgres_url


def database_url(env: dict[str, str]) -> str:
    return env.get("PNEUMO_DATABASE_URL") or f"sqlite:///{env['PNEUMO_HOME']}/pneumo.db"


@pytest.fixture
def running(pipeline_env: dict[str, str]):
    """`pneumo run`, waited for until the node answers C-ECHO; stopped with SIGINT (Ctrl-C)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "core.cli", "run"], env=pipeline_env, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    port = pipeline_env["PNEUMO_PORT"]

    def echo() -> bool:
        return subprocess.run(
            ["echoscu", "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", port],
            capture_output=True,
        ).returncode == 0

    try:
        wait_for(echo, 90, "the node to answer C-ECHO")
        yield pipeline_env
    finally:
        process.send_signal(2)
        try:
            output, _ = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        home = Path(pipeline_env["PNEUMO_HOME"])
        for log in sorted(home.glob("*.log")):
            print(f"--- {log.name}\n{log.read_text()[-3000:]}")
        print(f"--- pneumo run\n{output[-2000:]}")
    assert "pneumo: stopped" in output


def sr_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("SR*"))


def test_storescu_to_sr_in_pacs(running: dict[str, str], pacs, tmp_path: Path) -> None:
    images = sorted((DATA / "test" / "PNEUMONIA").iterdir())[:3] + sorted(
        (DATA / "test" / "NORMAL").iterdir())[:2]
    outgoing = tmp_path / "outgoing"
    outgoing.mkdir()
    sent = {}
    for image in images:
        dataset = wrap_image(image)
        path = outgoing / f"{image.stem}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        sent[dataset.StudyInstanceUID] = dataset.SOPInstanceUID
    started = time.monotonic()
    subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", running["PNEUMO_PORT"],
         *map(str, sorted(outgoing.iterdir()))],
        check=True, capture_output=True,
    )
    files = wait_for(lambda: len(sr_files(pacs["folder"])) >= 5 and sr_files(pacs["folder"]),
                     120, "five SRs at the PACS")
    print(f"5 studies: storescu start to 5th SR at the PACS {time.monotonic() - started:.1f} s")
    time.sleep(1.5)  # nothing more may arrive: one SR per study
    assert len(sr_files(pacs["folder"])) == 5

    sessions = session_factory(database_url(running))
    with sessions() as session:
        results = {r.instance.sop_instance_uid: r for r in session.scalars(select(Result))}
    assert set(results) == set(sent.values())
    for path in files:
        report = srread(path)
        sop_uid = sent[report.StudyInstanceUID]
        group = report.content.get_image_measurement_groups()[0]
        assert group.source_images[0].referenced_sop_instance_uid == sop_uid
        probability = group.get_measurements()[0].value
        assert probability == pytest.approx(results[sop_uid].probability, abs=1e-6)
        dump = subprocess.run(["dsrdump", str(path)], capture_output=True, text=True)
        assert dump.returncode == 0, dump.stderr
        assert "Pneumonia" in dump.stdout and "UNVERIFIED" in dump.stdout


def test_pneumo_send_matches_pneumo_evaluate(
    running: dict[str, str], pacs, tmp_path: Path, tiny_registry: Path
) -> None:
    """Parity: 20 test images through the DICOM path get evaluate's probabilities (1e-4)."""
    root = tmp_path / "parity"
    link_subset(root, "test", "NORMAL", 10)
    link_subset(root, "test", "PNEUMONIA", 10)
    files = sorted((root / "test").rglob("*.jpeg"))
    sent = subprocess.run(
        [sys.executable, "-m", "core.cli", "send", *map(str, files), "--to",
         f"PNEUMO@127.0.0.1:{running['PNEUMO_PORT']}"],
        env=running, cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "sent 20/20" in sent.stdout
    evaluated = subprocess.run(
        [sys.executable, "-m", "core.cli", "evaluate", "--model", "pneumonia-transfer",
         "--data", str(root), "--split", "test", "--models-dir", str(tiny_registry), "--json"],
        env=running, cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    expected = {p["file"]: p["probability"] for p in json.loads(evaluated.stdout)["predictions"]}

    wait_for(lambda: len(sr_files(pacs["folder"])) >= 20, 180, "20 SRs at the PACS")
    sessions = session_factory(database_url(running))
    with sessions() as session:
        rows = session.execute(select(Instance.path, Result.probability).join(Result)).all()
    assert len(rows) == 20
    for path, probability in rows:
        source = dcmread(path, stop_before_pixels=True).ImageComments.removeprefix("wrapped from ")
        assert probability == pytest.approx(expected[source], abs=1e-4)


def test_dcmtk_tools_are_installed() -> None:
    for tool in ("storescu", "storescp", "echoscu", "dsrdump"):
        assert shutil.which(tool), f"{tool} missing: install dcmtk (.ci/run does)"
