"""`pneumo retention`: dry run lists, --apply deletes only finished, old studies' images."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from core.db import AuditEvent, Delivery, DeliveryState, Instance, InstanceState, Series, Study, utcnow
from tests.pipeline.conftest import REPO


def _study(session, storage: Path, uid: str, state: str, delivered_days_ago: float | None,
           received_days_ago: float = 40) -> Path:
    now = utcnow()
    study = Study(study_instance_uid=uid, first_received_at=now - timedelta(days=received_days_ago),
                  last_received_at=now - timedelta(days=received_days_ago))
    session.add(study)
    session.flush()
    series = Series(study_id=study.id, series_instance_uid=f"{uid}.1", modality="DX")
    session.add(series)
    session.flush()
    path = storage / uid / f"{uid}.1" / f"{uid}.1.1.dcm"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"x" * 1000)
    session.add(Instance(
        study_id=study.id, series_id=series.id, sop_instance_uid=f"{uid}.1.1", sop_class_uid="1.2",
        transfer_syntax_uid="1.2", path=str(path), size_bytes=1000, sha256="0" * 64,
        calling_ae_title="M", state=state, attempts=1,
    ))
    if delivered_days_ago is not None:
        session.add(Delivery(
            study_id=study.id, model_name="m", model_version="v", destination="PACS@h:1",
            sr_sop_instance_uid=f"{uid}.9", state=DeliveryState.DELIVERED,
            delivered_at=now - timedelta(days=delivered_days_ago),
        ))
    return path


def test_dry_run_then_apply(sessions, database_url: str, tmp_path: Path) -> None:
    storage = tmp_path / "home" / "storage"
    with sessions() as session, session.begin():
        old = _study(session, storage, "1.1", InstanceState.CLASSIFIED, delivered_days_ago=31)
        recent = _study(session, storage, "1.2", InstanceState.CLASSIFIED, delivered_days_ago=2)
        ignored = _study(session, storage, "1.3", InstanceState.IGNORED, delivered_days_ago=None)
        waiting = _study(session, storage, "1.4", InstanceState.QUEUED, delivered_days_ago=None)
        undelivered = _study(session, storage, "1.5", InstanceState.CLASSIFIED, delivered_days_ago=None)
        session.flush()
        session.execute(  # an SR still retrying keeps the study's images
            Delivery.__table__.insert().values(
                study_id=session.scalar(select(Study.id).where(Study.study_instance_uid == "1.5")),
                model_name="m", model_version="v", destination="PACS@h:1", sr_sop_instance_uid="1.5.9",
                state=DeliveryState.RETRYING, instances_reported=1, attempts=2,
                created_at=utcnow(), updated_at=utcnow()))
    reports = tmp_path / "home" / "labels" / "hl7"  # the RIS's raw reports: they name the patient
    reports.mkdir(parents=True)
    old_report, new_report = reports / "20261101T000000Z-1.hl7", reports / "20261206T000000Z-2.hl7"
    for report, days in ((old_report, 31), (new_report, 2)):
        report.write_text("MSH|...")
        os.utime(report, (time.time() - days * 86400,) * 2)
    env = {**os.environ, "PNEUMO_HOME": str(tmp_path / "home"), "PNEUMO_DATABASE_URL": database_url}

    def retention(*extra: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "ops.cli", "retention", "--older-than-days", "30", *extra],
            env=env, cwd=REPO, capture_output=True, text=True, check=True).stdout

    dry = retention()
    assert "1.1:" in dry and "1.3:" in dry and "dry run: 2 study(ies)" in dry
    assert "1 raw HL7 report(s)" in dry and old_report.exists()
    assert all(path.exists() for path in (old, recent, ignored, waiting, undelivered))

    applied = retention("--apply")
    assert "removed images of 2 study(ies)" in applied and "1 raw HL7 report(s)" in applied
    assert not old_report.exists() and new_report.exists()
    assert not old.exists() and not ignored.exists() and not old.parent.exists()
    assert recent.exists() and waiting.exists() and undelivered.exists()
    with sessions() as session:
        assert session.scalar(select(Instance).where(Instance.sop_instance_uid == "1.1.1.1")) is not None
        events = session.scalars(select(AuditEvent.event).where(AuditEvent.entity == "study")).all()
    assert events == ["images_removed", "images_removed"]
    assert "dry run: 0 study(ies)" in retention()
