"""No patient name, ID or birth date in any log file of `pneumo run`, whatever the headers hold.

Studies with distinctive values go through the real node and workers (dcmtk's storescu in, its
storescp as the PACS), including values that take every path known to quote them: pydicom's
invalid-value warnings (birth dates '01/02/1970' and a hash, an ID over 64 characters),
highdicom's person-name warning (single-component names), the SR build that raised "Unable to
convert ... to 'DA'", a decode failure, a refused C-STORE, a conflicting duplicate and the
dashboard reading patient names from the stored headers. Then every log file is searched.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
from sqlalchemy import select

from core.db import (
    TERMINAL_STATES,
    AuditEvent,
    Delivery,
    DeliveryState,
    Instance,
    RefusedStore,
    session_factory,
)
from ops.send import wrap_image
from tests.conftest import DATA, REAL_DICOM
from tests.helpers import echo, wait_for
from tests.pipeline.conftest import REPO, database_url, sr_files, stop_pneumo_run

pytestmark = pytest.mark.slow
IMAGES = sorted((DATA / "test" / "PNEUMONIA").iterdir())[:6]
HASH = "qzx9e465a3069d7d94e44c519d9c7aae430455e0ae7ac52d7d7651a5"  # 56 characters, as in 966_fixed

# (source, patient name, patient ID, birth date, referring physician); every value is distinctive.
STUDIES = [
    (IMAGES[0], "Qzxalpha^Anna", "QZXID-ALPHA", "01/02/1970", ""),
    (IMAGES[1], "QZXBRAVO", "QZXID-BRAVO", HASH, ""),  # single component: highdicom warns
    (IMAGES[2], "Qzxcharlie" * 7 + "^Carl", "QZXID-CHARLIE-" * 5, "1970-01-02", ""),  # too long
    (IMAGES[3], "Qzxdelta^Dora", "QZXID-DELTA", "19700317", "QZXDRDELTA"),  # all valid; doctor warned
    (REAL_DICOM / "fuji_cr_chest_mono1_explicit.dcm", "QZXECHO", "QZXID-ECHO", "qzx-1970", ""),
    (REAL_DICOM / "canon_dx_j2k_corrupt.dcm", "Qzxfox^Trot", "QZXID-FOXTROT", "0101qzx", ""),  # fails
    (REAL_DICOM / "cr_hip_jpeg_lossless.dcm", "QZXGOLF", "QZXID-GOLF", "19700101", ""),  # ignored
]
CLASSIFIED_STUDIES = 5
MARKERS = {"qzx", "01/02/1970", "1970-01-02", "19700317", HASH.lower()}


def header(source: Path, name: str, patient_id: str, birth_date: str, doctor: str):
    dataset = wrap_image(source) if source.suffix == ".jpeg" else dcmread(source)
    dataset.PatientName, dataset.PatientID, dataset.PatientBirthDate = name, patient_id, birth_date
    dataset.ReferringPhysicianName = doctor
    return dataset


def send(port: int, paths: list[Path]) -> list[int | None]:
    """Each file as it is (pynetdicom streams it unparsed), over one association; the statuses."""
    contexts = sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID))
                       for m in map(read_file_meta_info, paths)})
    ae = AE(ae_title="STORESCU")
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMO")
    assert assoc.is_established
    statuses = [assoc.send_c_store(path).get("Status") for path in paths]
    assoc.release()
    return statuses


@pytest.fixture(autouse=True)
def files_sent_as_they_are(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.mark.parametrize("pipeline_env", ["embedded"], indirect=True)
def test_no_patient_value_in_any_log(pipeline_env: dict[str, str], pacs, tmp_path: Path) -> None:
    env = {**pipeline_env, "PNEUMO_SHOW_PATIENT_NAMES": "true"}
    home, port = Path(env["PNEUMO_HOME"]), env["PNEUMO_PORT"]
    outgoing = tmp_path / "outgoing"
    outgoing.mkdir()
    files = []
    for index, study in enumerate(STUDIES):
        path = outgoing / f"{index}.dcm"
        header(*study).save_as(path, enforce_file_format=True)
        files.append(path)
    conflicting = header(IMAGES[5], *STUDIES[0][1:])  # study 0's SOP Instance UID, other pixels
    first = dcmread(files[0])
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(conflicting, keyword, first.get(keyword))
    conflicting.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    conflicting.save_as(outgoing / "conflicting.dcm", enforce_file_format=True)
    bad_uid = header(IMAGES[4], "Qzxhotel^Hal", "QZXID-HOTEL", "01/02/1970", "")
    bad_uid.SOPInstanceUID = bad_uid.file_meta.MediaStorageSOPInstanceUID = "999.999.01.23.45.6789"
    bad_uid.save_as(outgoing / "bad_uid.dcm", enforce_file_format=True)

    process = subprocess.Popen([sys.executable, "-m", "ops.cli", "run"], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: echo(port), 90, "the node to answer C-ECHO")
        statuses = send(int(port), [*files, outgoing / "conflicting.dcm", outgoing / "bad_uid.dcm"])
        assert statuses == [0] * len(files) + [0xC211, 0xC210]
        wait_for(lambda: len(sr_files(pacs["folder"])) >= CLASSIFIED_STUDIES, 180,
                 "an SR per classified study")
        sessions = session_factory(database_url(env))

        def settled() -> bool:
            with sessions() as session:
                states = session.scalars(select(Instance.state)).all()
                deliveries = session.scalars(select(Delivery.state)).all()
            return (len(states) == len(STUDIES) and set(states) <= set(TERMINAL_STATES)
                    and deliveries.count(DeliveryState.DELIVERED) == CLASSIFIED_STUDIES)

        wait_for(settled, 120, "every image terminal and every SR delivered")
        dashboard = f"http://127.0.0.1:{env['PNEUMO_DASHBOARD_PORT']}/"
        page = urllib.request.urlopen(dashboard, timeout=30).read()
        assert b"Qzxdelta" in page  # names shown where asked for: on the page, never in a log
        with sessions() as session:
            refused = session.scalars(select(RefusedStore.status)).all()
            texts = [*session.scalars(select(Instance.reason)), *session.scalars(select(AuditEvent.detail)),
                     *session.scalars(select(Delivery.last_error)),
                     *session.scalars(select(RefusedStore.reason))]
            dropped = session.scalars(
                select(AuditEvent.detail).where(AuditEvent.event == "sr_values_dropped")).all()
    finally:
        output = stop_pneumo_run(process, home)
    assert sorted(refused) == [0xC210, 0xC211]
    assert len(dropped) == 4  # studies 0, 1, 2 and 4: their invalid values left out of the SR
    logs = {path.name: path.read_text(errors="replace") for path in sorted(home.rglob("*.log"))}
    assert {"node.log", "worker-inference.log", "worker-delivery.log", "scheduler.log",
            "dashboard.log"} <= set(logs)
    assert "<withheld>" in logs["worker-delivery.log"]  # highdicom and pydicom did speak
    found = {(name, marker) for name, text in {**logs, "pneumo run": output}.items()
             for marker in MARKERS if marker in text.lower()}
    assert not found
    assert not [text for text in texts if text and any(marker in text.lower() for marker in MARKERS)]


def test_mixed_real_files_short(tiny_registry: Path) -> None:
    """tests/drills/mixed_real_run.py, CI-sized: 16 studies cycling through the real files, each with
    its own patient name and ID, a malformed birth date in half of them. Every study terminal
    with its reason, every SR delivered within the retry budget, no value in any log file."""
    run = subprocess.run(
        [sys.executable, "tests/drills/mixed_real_run.py", "--studies", "16", "--models-dir",
         str(tiny_registry), "--timeout-s", "300", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert run.returncode == 0 and report["ok"], report
    assert report["instances"] == {"classified": 12, "failed": 2, "ignored": 2}
    assert report["reasons"] == {
        "pixel data could not be decoded (JPEG 2000 Image Compression (Lossless Only))": 2,
        "not a chest image": 2}
    assert report["deliveries"] == {"delivered": 12} and report["srs_at_pacs"] == 12
    assert not report["log_files_with_patient_values"]
    assert {"node.log", "worker-delivery.log", "worker-inference.log"} <= set(report["log_files"])
