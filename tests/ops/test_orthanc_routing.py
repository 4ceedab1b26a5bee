"""The compose topology without containers: Debian's Orthanc, started with deploy/orthanc's config
and Lua script, as the PACS; `pneumo run` on PostgreSQL + Redis as the node, workers and scheduler.

A modality stores real radiographs into Orthanc with dcmtk's storescu. The Lua routes the chest
CR images to the node (one while the node is down: its job fails visibly and is resubmitted),
keeps the hip, and the SRs the node sends back land in the same Orthanc studies without being
routed back to the node.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis
from highdicom.sr import srread
from pydicom import dcmread
from sqlalchemy import select

from core.db import Instance, session_factory
from tests.conftest import REAL_DICOM, REDIS_TEST_URL
from tests.helpers import dcmtk, echo, free_port, requires_program, wait_for
from tests.pipeline.conftest import stop_pneumo_run
from worker.report import sr_uids

REPO = Path(__file__).resolve().parents[2]
ORTHANC_CONFIG = REPO / "deploy" / "orthanc" / "orthanc.json"
ROUTING_LUA = REPO / "deploy" / "orthanc" / "route-to-pneumo.lua"
ORTHANC_AET = "ORTHANC-TEST"
NODE_AET = "PNEUMO"
MODALITY_AET = "MODALITY"
BROKER = f"{REDIS_TEST_URL}/12"

CHEST_PA = REAL_DICOM / "fuji_cr_chest_mono1_explicit.dcm"  # CR, BodyPartExamined CHEST
CHEST_NO_BODY_PART = REAL_DICOM / "konica_cr_mono1_jpeg.dcm"  # CR, BodyPartExamined empty
HIP = REAL_DICOM / "cr_hip_jpeg_lossless.dcm"  # CR, HIP: stays in Orthanc

pytestmark = [
    pytest.mark.slow,
    requires_program("Orthanc", "orthanc"),
]


@dataclass
class Orthanc:
    dicom_port: int
    http_port: int
    password: str
    log: Path

    def _request(self, path: str, body: str | None = None) -> bytes:
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.http_port}{path}", data=None if body is None else body.encode()
        )
        token = base64.b64encode(f"pneumo:{self.password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.read()

    def get(self, path: str):
        return json.loads(self._request(path))

    def post(self, path: str, body: str = ""):
        return json.loads(self._request(path, body))

    def file(self, instance_id: str) -> bytes:
        return self._request(f"/instances/{instance_id}/file")

    def lookup(self, uid: str, level: str) -> str | None:
        found = [item["ID"] for item in self.post("/tools/lookup", uid) if item["Type"] == level]
        return found[0] if found else None

    def store(self, path: Path, *options: str, calling_ae: str = MODALITY_AET) -> int:
        """storescu into Orthanc; `options` proposes the file's compressed transfer syntax."""
        return subprocess.run(
            [dcmtk("storescu"), *options, "-aet", calling_ae, "-aec", ORTHANC_AET, "127.0.0.1",
             str(self.dicom_port), str(path)], capture_output=True, timeout=60,
        ).returncode

    def routing_jobs(self) -> list[dict]:
        return [job for job in self.get("/jobs?expand") if job["Type"] == "DicomModalityStore"]


@pytest.fixture
def node_port() -> int:
    return free_port()


@pytest.fixture
def orthanc(tmp_path: Path, node_port: int) -> Iterator[Orthanc]:
    """Orthanc from deploy/orthanc/orthanc.json; only ports, storage and the Lua path changed."""
    config = json.loads(ORTHANC_CONFIG.read_text())
    storage = tmp_path / "orthanc-db"
    server = Orthanc(free_port(), free_port(), "test-password-31", tmp_path / "orthanc.log")
    config.update(
        DicomPort=server.dicom_port, HttpPort=server.http_port, StorageDirectory=str(storage),
        IndexDirectory=str(storage), RemoteAccessAllowed=False, LuaScripts=[str(ROUTING_LUA)],
    )
    config_path = tmp_path / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    env = {**os.environ, "ORTHANC_AET": ORTHANC_AET, "ORTHANC_PASSWORD": server.password,
           "PNEUMO_NODE_AET": NODE_AET, "PNEUMO_NODE_HOST": "127.0.0.1",
           "PNEUMO_NODE_PORT": str(node_port), "MODALITY_AET": MODALITY_AET}
    with server.log.open("w") as log:
        process = subprocess.Popen(["Orthanc", str(config_path)], env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: process.poll() is not None or _answers(server), 30, "Orthanc's REST API")
        assert process.poll() is None, server.log.read_text()[-3000:]
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        print(f"--- Orthanc\n{server.log.read_text()[-4000:]}")


def _answers(server: Orthanc) -> bool:
    try:
        return server.get("/system")["DicomAet"] == ORTHANC_AET
    except OSError:
        return False


@pytest.fixture
def product_env(tmp_path: Path, tiny_registry: Path, node_port: int, orthanc: Orthanc,
                database_url_postgres_fresh: str) -> dict[str, str]:
    """The node, workers and scheduler as in production: PostgreSQL, Redis, Orthanc as PACS."""
    redis.Redis.from_url(BROKER).flushdb()
    return {
        **os.environ,
        "PNEUMO_HOME": str(tmp_path / "home"),
        "PNEUMO_HOST": "127.0.0.1",
        "PNEUMO_PORT": str(node_port),
        "PNEUMO_DASHBOARD_PORT": str(free_port()),  # `pneumo run` may start the dashboard too
        "PNEUMO_AE_TITLE": NODE_AET,
        "PNEUMO_PACS": f"{ORTHANC_AET}@127.0.0.1:{orthanc.dicom_port}",
        "PNEUMO_ALLOWED_PEERS": ORTHANC_AET,
        "PNEUMO_DATABASE_URL": database_url_postgres_fresh,
        "PNEUMO_BROKER_URL": BROKER,
        "PNEUMO_QUIET_SECONDS": "1",
        "PNEUMO_DELIVERY_BACKOFF_S": "1",
        "PNEUMO_MODELS_DIR": str(tiny_registry),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


@contextmanager
def pneumo_run(env: dict[str, str]) -> Iterator[None]:
    """`pneumo run` until the node answers C-ECHO from Orthanc's AE; Ctrl-C (SIGINT) at the end."""
    process = subprocess.Popen([sys.executable, "-m", "ops.cli", "run"], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    try:
        wait_for(lambda: process.poll() is not None or echo(env["PNEUMO_PORT"], NODE_AET, ORTHANC_AET),
                 90, "the node to answer C-ECHO")
        assert process.poll() is None, "pneumo run exited"
        yield
    finally:
        output = stop_pneumo_run(process, Path(env["PNEUMO_HOME"]))
    assert "pneumo: stopped" in output


def sr_in_study(orthanc: Orthanc, study_uid: str) -> str | None:
    """Orthanc's instance id of the SR in that study, once there is one."""
    study = orthanc.lookup(study_uid, "Study")
    if study is None:
        return None
    for series in orthanc.get(f"/studies/{study}/series"):
        if series["MainDicomTags"].get("Modality") == "SR":
            instances = series["Instances"]
            return instances[0] if instances else None
    return None


def srs_in_studies(orthanc: Orthanc, study_uids: list[str]) -> list[str] | None:
    found = [sr_in_study(orthanc, uid) for uid in study_uids]
    return found if all(found) else None


def test_orthanc_routes_chest_radiographs_and_keeps_the_srs(
    orthanc: Orthanc, product_env: dict[str, str], tmp_path: Path
) -> None:
    headers = {path: dcmread(path, stop_before_pixels=True) for path in (CHEST_PA, CHEST_NO_BODY_PART, HIP)}

    # Only registered AE titles may store into this PACS.
    assert orthanc.store(CHEST_PA, calling_ae="INTRUDER") != 0
    assert orthanc.lookup(headers[CHEST_PA].SOPInstanceUID, "Instance") is None

    # Node down: the routing job fails, and stays listed for a resubmit.
    assert orthanc.store(CHEST_NO_BODY_PART, "-xy") == 0
    failed = wait_for(lambda: [j for j in orthanc.routing_jobs() if j["State"] == "Failure"], 30,
                      "the routing job to fail while the node is down")
    konica_id = orthanc.lookup(headers[CHEST_NO_BODY_PART].SOPInstanceUID, "Instance")
    assert [job["Content"]["ParentResources"] for job in failed] == [[konica_id]]

    with pneumo_run(product_env):
        assert orthanc.store(CHEST_PA) == 0
        assert orthanc.store(HIP, "-xs") == 0
        orthanc.post(f"/jobs/{failed[0]['ID']}/resubmit")
        chest = (CHEST_PA, CHEST_NO_BODY_PART)
        studies = [headers[path].StudyInstanceUID for path in chest]
        reports = wait_for(lambda: srs_in_studies(orthanc, studies), 90, "an SR in each chest study")

    for path, report_id in zip(chest, reports, strict=True):
        sr_path = tmp_path / f"{report_id}.dcm"
        sr_path.write_bytes(orthanc.file(report_id))
        report = srread(sr_path)
        header = headers[path]
        assert report.StudyInstanceUID == header.StudyInstanceUID
        series_uid, instance_uid = sr_uids(header.StudyInstanceUID, "pneumonia-transfer", "test-1")
        assert (report.SeriesInstanceUID, report.SOPInstanceUID) == (series_uid, instance_uid)
        assert report.VerificationFlag == "UNVERIFIED"
        assert {(item.get("ManufacturerModelName"), item.get("SoftwareVersions"))
                for item in report.ContributingEquipmentSequence} >= {("pneumonia-transfer", "test-1")}
        group = report.content.get_image_measurement_groups()[0]
        assert group.source_images[0].referenced_sop_instance_uid == header.SOPInstanceUID
        assert f"kept {report_id} (stored by the node {NODE_AET})" in orthanc.log.read_text()

    hip_study = orthanc.lookup(headers[HIP].StudyInstanceUID, "Study")
    assert hip_study is not None and sr_in_study(orthanc, headers[HIP].StudyInstanceUID) is None
    hip_id = orthanc.lookup(headers[HIP].SOPInstanceUID, "Instance")
    assert f"kept {hip_id} (body part HIP)" in orthanc.log.read_text()

    # The node saw exactly the two chest images: not the hip, not its own SRs coming back.
    sessions = session_factory(product_env["PNEUMO_DATABASE_URL"])
    with sessions() as session:
        received = set(session.scalars(select(Instance.sop_instance_uid)))
    sessions.kw["bind"].dispose()
    assert received == {headers[p].SOPInstanceUID for p in chest}
    jobs = orthanc.routing_jobs()  # one per chest image, the resubmitted one included
    assert {job["State"] for job in jobs} == {"Success"}
    routed = sorted(job["Content"]["ParentResources"][0] for job in jobs)
    assert routed == sorted(orthanc.lookup(headers[p].SOPInstanceUID, "Instance") for p in chest)
