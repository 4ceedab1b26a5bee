"""Faults survived by the running product: a worker killed mid-job, the PACS down then up."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from core.db import AuditEvent, Delivery, DeliveryState, Instance, InstanceState, Result, session_factory
from ops.send import wrap_image
from tests.conftest import DATA
from tests.helpers import dcmtk, wait_for
from tests.pipeline.conftest import database_url, sr_files, start_storescp

pytestmark = pytest.mark.slow
EMBEDDED = pytest.mark.parametrize("pipeline_env", ["embedded"], indirect=True)


def store_one(env: dict[str, str], tmp_path: Path, index: int = 0) -> str:
    dataset = wrap_image(sorted((DATA / "test" / "PNEUMONIA").iterdir())[index])
    path = tmp_path / f"image{index}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1",
                    env["PNEUMO_PORT"], str(path)], check=True, capture_output=True)
    return str(dataset.SOPInstanceUID)


def instance_state(env: dict[str, str], sop_uid: str) -> Instance | None:
    with session_factory(database_url(env))() as session:
        return session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_uid))


def pool_children(name: str) -> list[int]:
    """Pids of the Celery pool processes of the worker started with `-n <name>@...`."""
    parents = subprocess.run(["pgrep", "-f", "--", f"-n {name}@"], capture_output=True, text=True)
    pids = {int(p) for p in parents.stdout.split()}
    children = []
    for pid in pids:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        if int(stat[1]) in pids:  # its parent is the worker's main process
            children.append(pid)
    return children


@EMBEDDED
def test_worker_killed_mid_job_is_redelivered_and_finishes_once(
    running: dict[str, str], pacs, tmp_path: Path
) -> None:
    sop_uid = store_one(running, tmp_path)
    # The first job in a fresh pool process loads TensorFlow and the model: seconds in `processing`.
    wait_for(lambda: (i := instance_state(running, sop_uid)) and i.state == InstanceState.PROCESSING,
             60, "the instance to be processing", interval_s=0.05)
    children = pool_children("inference")
    assert children, "no inference pool process found"
    for pid in children:
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: instance_state(running, sop_uid).state == InstanceState.CLASSIFIED,
             120, "the redelivered job to finish")
    instance = instance_state(running, sop_uid)
    with session_factory(database_url(running))() as session:
        results = session.scalars(select(Result).where(Result.instance_id == instance.id)).all()
    assert instance.attempts == 2
    assert len(results) == 1
    # The second attempt decoded the image apart: it may have been what killed the first.
    log = (Path(running["PNEUMO_HOME"]) / "worker-inference.log").read_text()
    assert "attempt 2 after one that never finished; decoding it apart" in log
    wait_for(lambda: len(sr_files(pacs["folder"])) == 1, 60, "the SR at the PACS")


@EMBEDDED
def test_pacs_down_then_up_delivery_retried_and_arrives_once(
    running: dict[str, str], pacs_address: dict, tmp_path: Path
) -> None:
    sessions = session_factory(database_url(running))
    store_one(running, tmp_path)

    def delivery() -> Delivery | None:
        with sessions() as session:
            return session.scalar(select(Delivery))

    wait_for(lambda: (d := delivery()) and d.state == DeliveryState.RETRYING, 90,
             "a failed delivery attempt while the PACS is down")
    assert "association" in delivery().last_error
    process = start_storescp(pacs_address["folder"], pacs_address["port"])
    try:
        wait_for(lambda: delivery().state == DeliveryState.DELIVERED, 120, "delivery after PACS is up")
        time.sleep(3)  # no second copy follows
        assert len(sr_files(pacs_address["folder"])) == 1
    finally:
        process.terminate()
    with sessions() as session:
        events = session.scalars(select(AuditEvent.event).where(AuditEvent.entity == "delivery")).all()
    assert "retrying" in events and events[-1] == "delivered"
