"""The fault drill, CI-sized, and the product bugs it found.

The drill (tests/drills/fault_drill.py) runs the product as separate processes on PostgreSQL and its
own Redis, sends 40 instances over 4 associations and meanwhile SIGKILLs the node and the worker's
pool process, restarts Redis and takes the PACS down for 5 s; then it checks every acknowledged
instance is recorded and terminal and each study has exactly one SR at the PACS.

Bugs the drill found, each with a test here: a study sent over parallel associations got 0xA700;
an SR retry not published while Redis was down was lost for good (delivery stuck in `retrying`);
a Celery 5.7.0 worker exits when Redis stays down for seconds while it holds an unacked task.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import event, func, select

from core.db import AuditEvent, Delivery, DeliveryState, Instance, Study, utcnow
from core.settings import Settings
from dicom_node.receive import SUCCESS, store_instance
from ops.send import wrap_image
from tests.conftest import DATA
from tests.helpers import free_port, wait_for
from tests.pipeline.conftest import REPO
from worker import housekeeping

pytestmark = pytest.mark.slow


def test_fault_drill_short(tiny_registry: Path) -> None:
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, str(REPO / "tests" / "drills" / "fault_drill.py"), "--instances", "40",
         "--associations", "4", "--pacs-down-s", "5", "--model-dir", str(tiny_registry),
         "--workers", "1", "--kill-worker", "pool", "--kill-at", "0", "--pacs-down-at", "0",
         "--redis-during", "sending", "--redis-down-s", "5", "--quiet-s", "1",
         "--delivery-backoff-s", "1", "--timeout-s", "120", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )
    print(f"drill: {time.monotonic() - started:.0f} s, exit {run.returncode}")
    print(run.stderr[-6000:])
    report = json.loads(run.stdout)
    failed = [i for i in report["invariants"] if not i["ok"]]
    assert run.returncode == 0 and report["ok"], failed
    assert report["acknowledged"] == report["recorded"] == 40
    assert report["states"] == {"classified": 40}
    assert report["srs_expected"] == report["srs_distinct"] == report["studies"]
    assert report["duplicate_srs"] == report["missing_srs"] == report["missing_instances"] == 0
    assert all(fault["at_s"] is not None for fault in report["faults"])
    # The faults hit work in flight: the killed job ran again, SRs were retried past the outage.
    assert report["instances_retried_by_workers"] >= 1
    assert report["deliveries_retried"] >= 1


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_study_created_by_a_parallel_association_is_recorded_not_refused(sessions, tmp_path: Path) -> None:
    """Found by the drill: two images of one new study on parallel associations both insert the
    study row; the loser's C-STORE was answered 0xA700 and its file deleted. It must be recorded."""
    dataset = wrap_image(sorted((DATA / "test" / "NORMAL").iterdir())[0])
    spool = tmp_path / "spool.dcm"
    (tmp_path / "storage").mkdir()
    dataset.save_as(spool, enforce_file_format=True)
    raced: list[str] = []
    engine = sessions.kw["bind"]

    # On the statement, not the ORM: the node inserts its rows with Core statements (issue 21).
    def other_association_commits_the_study_first(_connection, _cursor, statement: str, *_: object) -> None:
        if not raced and statement.startswith("INSERT INTO studies"):
            raced.append(dataset.StudyInstanceUID)
            with sessions() as other, other.begin():
                other.add(Study(study_instance_uid=dataset.StudyInstanceUID,
                                first_received_at=utcnow(), last_received_at=utcnow()))

    event.listen(engine, "before_cursor_execute", other_association_commits_the_study_first)
    try:
        outcome = store_instance(spool, str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), "SENDER",
                                 tmp_path / "storage", sessions)
    finally:
        event.remove(engine, "before_cursor_execute", other_association_commits_the_study_first)
    assert raced == [dataset.StudyInstanceUID]
    assert outcome.status == SUCCESS, outcome.reason
    with sessions() as session:
        instance = session.scalar(select(Instance))
        assert session.scalar(select(func.count()).select_from(Study)) == 1
        assert instance.sop_instance_uid == dataset.SOPInstanceUID
        assert Path(instance.path).is_file()


def test_delivery_whose_message_was_lost_is_queued_again(sessions) -> None:
    """Found by the drill: Redis down while an SR retry was being queued; Celery rejected the task
    without requeue and the delivery stayed `retrying` with no message, so the SR never left."""
    with sessions() as session, session.begin():
        study = Study(study_instance_uid="1.2.3.4", first_received_at=utcnow(), last_received_at=utcnow())
        session.add(study)
        session.flush()
        rows = {
            name: Delivery(study_id=study.id, model_name="m", model_version=name, destination="PACS@h:1",
                           sr_sop_instance_uid=f"1.2.3.{index}", state=state, attempts=1,
                           updated_at=utcnow() - timedelta(seconds=age_s))
            for index, (name, state, age_s) in enumerate([
                ("lost", DeliveryState.RETRYING, 700), ("waiting", DeliveryState.RETRYING, 30),
                ("never-queued", DeliveryState.PENDING, 700), ("done", DeliveryState.DELIVERED, 700)])
        }
        session.add_all(rows.values())
    settings = Settings(quiet_seconds=0, delivery_backoff_s=5, delivery_max_attempts=6)
    queued: list[int] = []
    assert housekeeping.finalise_stable_studies(sessions, settings, queued.append) == queued
    assert sorted(queued) == sorted([rows["lost"].id, rows["never-queued"].id])
    assert housekeeping.finalise_stable_studies(sessions, settings, queued.append) == []  # not every second
    with sessions() as session:
        events = session.scalars(select(AuditEvent.entity_id).where(AuditEvent.event == "requeued")).all()
    assert sorted(events) == sorted(queued)


def test_worker_survives_redis_down_while_it_holds_a_task(tmp_path: Path) -> None:
    """Found by the drill: with Celery 5.7.0 the worker exits ("Unrecoverable error:
    AttributeError") when Redis stays down for seconds while it holds an unacked task (here an SR
    retry waiting on its countdown); pyproject pins celery below 5.7."""
    from celery import Celery

    port = free_port()
    redis_command = [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind",
                     "127.0.0.1", "--dir", str(tmp_path), "--appendonly", "yes", "--save", ""]
    env = {**os.environ, "PNEUMO_BROKER_URL": f"redis://127.0.0.1:{port}/0", "PNEUMO_HOME": str(tmp_path)}
    log = tmp_path / "worker.log"
    redis = subprocess.Popen(redis_command, stdout=subprocess.DEVNULL)
    worker = None
    try:
        with log.open("wb") as handle:
            worker = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker", "-Q", "delivery",
                 "-c", "1", "--loglevel", "INFO"], env=env, cwd=tmp_path, stdout=handle,
                stderr=subprocess.STDOUT)
        wait_for(lambda: " ready." in log.read_text(), 60, "the worker to be ready")
        app = Celery(broker=env["PNEUMO_BROKER_URL"])
        app.send_task("pneumo.deliver", args=[0], countdown=300, queue="delivery")
        time.sleep(2)  # the worker now holds it, unacked, until the countdown ends
        redis.terminate()
        redis.wait(timeout=10)
        time.sleep(8)  # longer than the Redis client's own reconnect attempts
        redis = subprocess.Popen(redis_command, stdout=subprocess.DEVNULL)
        wait_for(lambda: log.read_text().count("Connected to redis") >= 2 or worker.poll() is not None,
                 60, "the worker to reconnect or exit")
        assert worker.poll() is None, log.read_text()[-3000:]
    finally:
        for process in (worker, redis):
            if process is not None and process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    process.kill()
