"""The whole product as users run it: `pneumo run` (node, workers, scheduler) as a process,
dcmtk's storescu as the modality/PACS sender and dcmtk's storescp as the PACS receiving SRs.

Runs on both back-ends: the embedded default (SQLite + bundled Redis socket) and the production
shape (PostgreSQL + the machine's Redis).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from highdicom.sr import srread
from pydicom import dcmread
from sqlalchemy import select

from core.db import Delivery, DeliveryState, Instance, Result, session_factory
from ops.send import wrap_image
from tests.conftest import DATA, link_subset
from tests.helpers import dcmtk, wait_for
from tests.pipeline.conftest import REPO, database_url, sr_files

pytestmark = pytest.mark.slow


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
        [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", running["PNEUMO_PORT"],
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
        dump = subprocess.run([dcmtk("dsrdump"), str(path)], capture_output=True, text=True)
        assert dump.returncode == 0, dump.stderr
        assert "Pneumonia" in dump.stdout and "UNVERIFIED" in dump.stdout


def test_pneumo_send_matches_pneumo_evaluate(
    running: dict[str, str], pacs, tmp_path: Path, tiny_registry: Path
) -> None:
    """Parity: 20 test images through the DICOM path get evaluate's probabilities (1e-4)."""
    assert_parity(running, pacs, tmp_path, tiny_registry)


@pytest.fixture
def batched_env(pipeline_env: dict[str, str]) -> dict[str, str]:
    pipeline_env["PNEUMO_INFERENCE_BATCH_SIZE"] = "8"
    return pipeline_env


@pytest.mark.parametrize("pipeline_env", ["postgresql-redis"], indirect=True)
def test_batched_inference_worker_matches_pneumo_evaluate(
    batched_env, running: dict[str, str], pacs, tmp_path: Path, tiny_registry: Path
) -> None:
    """The GPU worker's configuration (thread pool, batches of up to 8) on the same parity check:
    every image classified once, each with its own image's probability."""
    assert_parity(running, pacs, tmp_path, tiny_registry)


def assert_parity(running: dict[str, str], pacs, tmp_path: Path, tiny_registry: Path) -> None:
    root = tmp_path / "parity"
    link_subset(root, "test", "NORMAL", 10)
    link_subset(root, "test", "PNEUMONIA", 10)
    files = sorted((root / "test").rglob("*.jpeg"))
    sent = subprocess.run(
        [sys.executable, "-m", "ops.cli", "send", *map(str, files), "--to",
         f"PNEUMO@127.0.0.1:{running['PNEUMO_PORT']}"],
        env=running, cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "sent 20/20" in sent.stdout
    evaluated = subprocess.run(
        [sys.executable, "-m", "ops.cli", "evaluate", "--model", "pneumonia-transfer",
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
        version = subprocess.run([dcmtk(tool), "--version"], capture_output=True, text=True).stdout
        assert "dcmtk" in version, f"{tool} is not dcmtk's: {version[:200]!r}"


@pytest.fixture
def tight_memory_env(pipeline_env: dict[str, str]) -> dict[str, str]:
    pipeline_env["PNEUMO_DELIVERY_WORKER_MAX_MEMORY_MB"] = "1"  # every child is past it after a task
    return pipeline_env


@pytest.mark.parametrize("pipeline_env", ["embedded"], indirect=True)
def test_delivery_children_past_the_memory_bound_are_replaced_and_nothing_is_lost(
    tight_memory_env, running: dict[str, str], pacs, tmp_path: Path
) -> None:
    outgoing = tmp_path / "outgoing"
    outgoing.mkdir()
    for image in sorted((DATA / "test" / "NORMAL").iterdir())[:4]:
        wrap_image(image).save_as(outgoing / f"{image.stem}.dcm", enforce_file_format=True)
    subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1",
                    running["PNEUMO_PORT"], *map(str, sorted(outgoing.iterdir()))],
                   check=True, capture_output=True)
    wait_for(lambda: len(sr_files(pacs["folder"])) >= 4, 120, "four SRs at the PACS")
    log = (Path(running["PNEUMO_HOME"]) / "worker-delivery.log").read_text()
    children = set(re.findall(r"ForkPoolWorker-(\d+)\]", log))
    assert len(children) > 2, f"the pool's 2 children were never replaced: {sorted(children)}"

    def states() -> list[str]:
        with session_factory(database_url(running))() as session:
            return sorted(session.scalars(select(Delivery.state)).all())

    # storescp writes the SR before it answers, and the task records the answer after: wait.
    wait_for(lambda: states() == [DeliveryState.DELIVERED] * 4, 30, "four deliveries recorded")
