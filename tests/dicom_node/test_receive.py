"""The node's durable receive, in-process, with a real pynetdicom association."""

import logging
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select

from core.db import AuditEvent, Instance, InstanceState
from core.settings import Settings
from dicom_node import scp
from dicom_node.receive import OUT_OF_RESOURCES, SUCCESS
from ops.send import wrap_image
from tests.conftest import DATA, REAL_DICOM
from tests.helpers import free_port

IMAGE = sorted((DATA / "test" / "NORMAL").iterdir())[0]


@pytest.fixture
def node(tmp_path: Path, sessions):
    queued: list[int] = []
    settings = Settings(home=tmp_path / "home", port=free_port(), host="127.0.0.1",
                        allowed_peers="SENDER,OTHER@10.9.9.9")
    server = scp.start(settings, sessions, queued.append)
    yield settings, queued
    server.shutdown()


def associate(settings: Settings, calling: str = "SENDER", contexts=None):
    ae = AE(ae_title=calling)
    for sop_class, syntaxes in contexts or []:
        ae.add_requested_context(sop_class, syntaxes)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", settings.port, ae_title=settings.ae_title)


def send_one(settings: Settings, dataset, calling: str = "SENDER") -> int:
    assoc = associate(settings, calling, [(dataset.SOPClassUID, [dataset.file_meta.TransferSyntaxUID])])
    assert assoc.is_established
    status = assoc.send_c_store(dataset).Status
    assoc.release()
    return status


def test_store_is_on_disk_recorded_and_queued_before_success(node, sessions) -> None:
    settings, queued = node
    dataset = wrap_image(IMAGE)
    assert send_one(settings, dataset) == SUCCESS
    with sessions() as session:
        instance = session.scalar(select(Instance))
    assert instance.sop_instance_uid == dataset.SOPInstanceUID
    assert instance.state == InstanceState.QUEUED and queued == [instance.id]
    stored = dcmread(instance.path)
    assert stored.SOPInstanceUID == dataset.SOPInstanceUID
    assert stored.PixelData == dataset.PixelData
    assert not any(settings.spool_dir.iterdir())  # nothing left in the spool


def test_resent_instance_is_recognised_not_queued_twice(node, sessions) -> None:
    settings, queued = node
    dataset = wrap_image(IMAGE)
    assert send_one(settings, dataset) == SUCCESS
    assert send_one(settings, dataset) == SUCCESS
    with sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 1
        events = session.scalars(select(AuditEvent.event)).all()
    assert len(queued) == 1
    assert "duplicate_received" in events


def test_unknown_calling_ae_is_rejected_at_association(node) -> None:
    settings, _ = node
    assoc = associate(settings, calling="STRANGER")
    assert assoc.is_rejected


def test_a_wrong_called_ae_title_is_rejected_with_its_reason_logged(node, caplog) -> None:
    """pynetdicom refused it with "Rejecting Association" and no reason (issue 23 row 11)."""
    settings, _ = node
    caplog.set_level(logging.WARNING, logger="dicom_node.scp")
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", settings.port, ae_title="NOTPNEUMO")
    assert assoc.is_rejected
    assert assoc.acceptor.primitive.diagnostic == 0x07  # called AE title not recognised
    assert any("called AE 'NOTPNEUMO', this node is PNEUMO" in record.getMessage()
               for record in caplog.records), caplog.text


def test_known_ae_from_wrong_address_is_rejected(node) -> None:
    settings, _ = node
    assert associate(settings, calling="OTHER").is_rejected  # allowed only from 10.9.9.9


def test_verification(node) -> None:
    settings, _ = node
    assoc = associate(settings)
    assert assoc.send_c_echo().Status == SUCCESS
    assoc.release()


def test_disk_below_floor_answers_out_of_resources(tmp_path: Path, sessions) -> None:
    settings = Settings(home=tmp_path / "home", port=free_port(), host="127.0.0.1",
                        min_free_disk_mb=10**12)
    server = scp.start(settings, sessions, lambda _id: None)
    try:
        assert send_one(settings, wrap_image(IMAGE)) == OUT_OF_RESOURCES
    finally:
        server.shutdown()
    with sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 0
    assert not any(settings.storage_dir.rglob("*.dcm"))


def test_database_down_answers_out_of_resources_and_stores_nothing(tmp_path: Path) -> None:
    from core.db import session_factory

    settings = Settings(home=tmp_path / "home", port=free_port(), host="127.0.0.1")
    broken = session_factory("postgresql+psycopg://nobody@127.0.0.1:1/none")
    server = scp.start(settings, broken, lambda _id: None)
    try:
        assert send_one(settings, wrap_image(IMAGE)) == OUT_OF_RESOURCES
    finally:
        server.shutdown()
    assert not any(settings.storage_dir.rglob("*.dcm"))


def test_broker_down_leaves_instance_received_for_the_sweep(tmp_path: Path, sessions) -> None:
    settings = Settings(home=tmp_path / "home", port=free_port(), host="127.0.0.1")

    def broken_enqueue(_instance_id: int) -> None:
        raise ConnectionError("broker down")

    server = scp.start(settings, sessions, broken_enqueue)
    try:
        assert send_one(settings, wrap_image(IMAGE)) == SUCCESS
    finally:
        server.shutdown()
    with sessions() as session:
        assert session.scalar(select(Instance.state)) == InstanceState.RECEIVED


@pytest.mark.parametrize("name", sorted(p.name for p in REAL_DICOM.glob("*.dcm")))
def test_every_real_file_is_stored(node, sessions, name: str) -> None:
    settings, queued = node
    dataset = dcmread(REAL_DICOM / name)
    assert send_one(settings, dataset) == SUCCESS
    assert len(queued) == 1


def test_spool_files_of_interrupted_transfers_are_removed(tmp_path: Path) -> None:
    import os
    import time

    spool = tmp_path / "spool"
    spool.mkdir()
    old, fresh = spool / "old.dcm", spool / "fresh.dcm"
    old.write_bytes(b"partial")
    fresh.write_bytes(b"in flight")
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    assert scp.clean_spool(spool, older_than_s=600) == [old]
    assert fresh.exists() and not old.exists()
