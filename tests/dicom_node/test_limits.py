"""The node's limits against a sloppy modality or an attacker (issue 23): a deflated data set whose
pad byte spun a thread for ever, a re-send in another transfer syntax, the per-data-set size
limit, the association deadline and per-address connection rates.
"""

from __future__ import annotations

import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from sqlalchemy import func, select

from core.db import AuditEvent, Instance
from core.settings import Settings
from dicom_node import scp
from dicom_node.checks import inflates_past
from dicom_node.receive import CONFLICTING_DUPLICATE, SUCCESS, store_instance
from ops.send import wrap_image
from tests.conftest import DATA, REAL_DICOM
from tests.helpers import dcmtk, free_port, requires_program, wait_for

IMAGE = sorted((DATA / "test" / "NORMAL").iterdir())[0]
IMAGE_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def _deflated_body(path: Path) -> bytes:
    meta = read_file_meta_info(path)
    return path.read_bytes()[132 + 12 + int(meta.FileMetaInformationGroupLength):]


def _leaves_pad_in_tail(body: bytes) -> bool:
    """Whether inflating `body` 1 MiB at a time ends with bytes left in `unconsumed_tail`: the
    state in which `decompress` returns b'' for ever (the trigger of issue 23 row 1)."""
    inflater, chunk = zlib.decompressobj(-zlib.MAX_WBITS), body
    for _ in range(1000):
        inflater.decompress(chunk, 1 << 20)
        chunk = inflater.unconsumed_tail
        if inflater.eof or not chunk:
            break
    return inflater.eof and bool(inflater.unconsumed_tail)


def deflated_zeros(folder: Path) -> tuple[Path, Dataset]:
    """Row 1's file: a DX of 2000x4000 16-bit zeros, Deflated Explicit VR Little Endian (~16 KB),
    whose stream leaves its pad byte in the tail (the description's length is varied until it
    does: whether it does depends on where the stream's end falls against the 1 MiB steps)."""
    for length in range(2, 80, 2):
        dataset = wrap_image(IMAGE)
        dataset.Rows, dataset.Columns = 2000, 4000
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
        dataset.PixelData = np.zeros((2000, 4000), np.uint16).tobytes()
        dataset.StudyDescription = "X" * length
        dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        path = folder / "deflated.dcm"
        dataset.save_as(path, enforce_file_format=True)
        if _leaves_pad_in_tail(_deflated_body(path)):
            return path, dataset
    raise AssertionError("no variant leaves the pad byte in the tail")


@pytest.mark.timeout(60)  # the old loop never ended: a hang here is the failure
def test_a_deflated_data_set_ending_in_its_pad_byte_is_read_to_its_end(tmp_path: Path, sessions) -> None:
    path, dataset = deflated_zeros(tmp_path)
    assert path.stat().st_size < 20_000
    assert inflates_past(path, 512 << 20) is False
    assert inflates_past(path, 1 << 20) is True  # the limit still applies
    (tmp_path / "storage").mkdir()
    outcome = store_instance(path, dataset.SOPClassUID, dataset.SOPInstanceUID, "SENDER",
                             tmp_path / "storage", sessions)
    assert outcome.status == SUCCESS, outcome.reason


@pytest.fixture
def node(tmp_path: Path, sessions):
    queued: list[int] = []
    settings = Settings(home=tmp_path / "home", port=free_port(), host="127.0.0.1", allowed_peers="*")
    server = scp.start(settings, sessions, queued.append)
    yield settings, queued
    server.shutdown()


def send(settings: Settings, dataset: Dataset, syntax: str) -> int:
    """C-STORE `dataset` over a context offering only `syntax` (pynetdicom re-encodes it)."""
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(dataset.SOPClassUID, [syntax])
    assoc = ae.associate("127.0.0.1", settings.port, ae_title=settings.ae_title)
    assert assoc.is_established
    status = assoc.send_c_store(dataset).Status
    assoc.release()
    return status


@requires_program("storescu", "dcmtk")
@pytest.mark.parametrize("option", ["+te", "+td", "+tb"])
@pytest.mark.parametrize("name", ["nih_cxr14_dx_implicit.dcm", "fuji_cr_chest_mono1_explicit.dcm"])
def test_an_identical_image_re_sent_in_another_transfer_syntax_is_a_no_op_success(
    node, sessions, tmp_path: Path, name: str, option: str
) -> None:
    """Issue 23 row 2: an image stored in one transfer syntax (dcmtk's dcmconv: Explicit VR,
    deflated, big endian), then sent again by dcmtk's storescu in Implicit VR (-xi, its only
    single-syntax choice) was refused 0xC211: the file's sha256 was compared."""
    settings, queued = node
    converted = tmp_path / "converted.dcm"
    subprocess.run([dcmtk("dcmconv"), option, str(REAL_DICOM / name), str(converted)], check=True)
    dataset = dcmread(converted)
    first = dataset.file_meta.TransferSyntaxUID
    assert send(settings, dataset, first) == SUCCESS
    answer = subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", settings.ae_title, "-xi",
                             "127.0.0.1", str(settings.port), str(REAL_DICOM / name)],
                            capture_output=True, text=True, timeout=60)
    assert answer.returncode == 0 and "0xc211" not in answer.stderr.lower(), answer.stderr
    with sessions() as session:
        (instance,) = session.scalars(select(Instance)).all()
        events = session.scalars(select(AuditEvent.event)).all()
    assert instance.transfer_syntax_uid == first
    assert events == ["received", "duplicate_received"]
    assert len(queued) == 1
    assert len(list(settings.storage_dir.rglob("*.dcm"))) == 1


def test_the_same_uid_with_other_pixels_in_another_syntax_is_still_a_conflict(node, sessions) -> None:
    settings, _ = node
    first = wrap_image(IMAGE)
    second = dcmread(REAL_DICOM / "nih_cxr14_dx_implicit.dcm")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        setattr(second, keyword, first.get(keyword))
    second.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    assert send(settings, first, ExplicitVRLittleEndian) == SUCCESS
    assert send(settings, first, ImplicitVRLittleEndian) == SUCCESS
    assert send(settings, second, ImplicitVRLittleEndian) == CONFLICTING_DUPLICATE
    changed = dcmread(settings.storage_dir.glob("*/*/*.dcm").__next__())
    changed.StudyDescription = "CHEST PA"  # header only: other content too
    assert send(settings, changed, ImplicitVRLittleEndian) == CONFLICTING_DUPLICATE
    with sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 1


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian])
def test_storing_a_large_data_set_does_not_load_its_pixel_data(
    sessions, tmp_path: Path, syntax: str
) -> None:
    """Issue 23 row 5: the truncation check read the last element, Pixel Data, whole (a 640 MB
    C-STORE took the node from 106 to 718 MB), and pydicom inflates a deflated data set whole.
    Memory is measured by tracemalloc (what Python allocates), not by a clock."""
    import tracemalloc

    dataset = wrap_image(IMAGE)
    dataset.Rows, dataset.Columns = 4096, 4096
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.PixelData = np.random.default_rng(0).integers(0, 4096, (4096, 4096), np.uint16).tobytes()
    dataset.file_meta.TransferSyntaxUID = syntax
    spool = tmp_path / "spool.dcm"
    dataset.save_as(spool, enforce_file_format=True)
    sop_uid = dataset.SOPInstanceUID
    del dataset
    (tmp_path / "storage").mkdir()
    tracemalloc.start()
    try:
        outcome = store_instance(spool, IMAGE_SOP_CLASS, sop_uid, "SENDER", tmp_path / "storage", sessions)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert outcome.status == SUCCESS, outcome.reason
    assert peak < 12 << 20, f"{peak >> 20} MiB allocated to store a 32 MiB data set"


def test_a_data_set_over_the_size_limit_is_refused_with_its_reason(tmp_path: Path, sessions) -> None:
    from core.db import RefusedStore
    from dicom_node.receive import OUT_OF_RESOURCES, TOO_LARGE_COMMENT

    settings = Settings(home=tmp_path / "home", port=free_port(), host="127.0.0.1", allowed_peers="*",
                        max_dataset_mb=1)
    server = scp.start(settings, sessions, lambda _id: None)
    big, small = wrap_image(IMAGE), wrap_image(IMAGE)
    big.PixelData = bytes(3 << 20)
    big.Rows, big.Columns = 1536, 2048
    try:
        ae = AE(ae_title="SENDER")
        ae.add_requested_context(big.SOPClassUID, ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", settings.port, ae_title=settings.ae_title)
        refused = assoc.send_c_store(big)
        accepted = assoc.send_c_store(small)  # the association goes on
        assoc.release()
    finally:
        server.shutdown()
    assert refused.Status == OUT_OF_RESOURCES and refused.ErrorComment == TOO_LARGE_COMMENT
    assert accepted.Status == SUCCESS
    with sessions() as session:
        (reason,) = session.scalars(select(RefusedStore.reason)).all()
        (instance,) = session.scalars(select(Instance)).all()
    assert reason == "data set too large: over the node's 1 MiB limit (PNEUMO_MAX_DATASET_MB)"
    assert instance.sop_instance_uid == small.SOPInstanceUID
    assert not any(settings.spool_dir.iterdir())


# --- row 7: slots, rates and deadlines; row 6: repeated warnings -----------------------------------

@pytest.fixture
def guarded(tmp_path: Path):
    """A node on SQLite with the given settings; its server, to look at its slots."""
    from core.db import session_factory
    from core.migrate import upgrade

    servers = []
    url = f"sqlite:///{tmp_path / 'pneumo.db'}"
    upgrade(url)

    def start(enqueue=lambda _id: None, **overrides):
        settings = Settings(home=tmp_path / "home", port=free_port(), host="127.0.0.1",
                            database_url=url, allowed_peers="*", **overrides)
        server = scp.start(settings, session_factory(url), enqueue)
        servers.append(server)
        return settings, server

    yield start
    for server in servers:
        server.shutdown()


def test_a_drip_inside_a_p_data_is_aborted_and_frees_its_slot(guarded, caplog) -> None:
    """Issue 23 row 7: an allowed AE dripping 1 byte every 20 s inside a P-DATA held its slot past
    141 s (each byte restarted every timeout). Here: 1 byte every 0.2 s, 100 bytes/s required."""
    import logging
    import struct

    from tests.dicom_node.test_node_guard import associate_rq, closed_within, connect

    caplog.set_level(logging.WARNING, logger="dicom_node.scp")
    settings, server = guarded(min_transfer_bytes_per_s=100, transfer_rate_window_s=1.0)
    sock = connect(settings, "127.0.0.4")
    sock.sendall(associate_rq(b"DRIPPER", abstract=IMAGE_SOP_CLASS.encode()))
    assert sock.recv(1) == b"\x02"  # A-ASSOCIATE-AC
    sock.recv(4096)
    sock.sendall(struct.pack(">BBI", 0x04, 0, 1000))  # a P-DATA-TF of 1000 bytes ...
    closed = False
    for _ in range(60):  # ... sent 1 byte every 0.2 s for at most 12 s
        try:
            sock.sendall(b"\x00")
        except OSError:
            closed = True
            break
        if closed_within(sock, 0.2):
            closed = True
            break
    assert closed, "the drip still holds its association"
    assert not server._slots
    assert "aborted: transfer at" in caplog.text and "PNEUMO_MIN_TRANSFER_BYTES_PER_S" in caplog.text


def test_a_c_store_past_its_deadline_is_aborted_whatever_its_handler_does(guarded, caplog) -> None:
    """The handler hangs (here in the broker call, after the commit): the watchdog aborts the
    association at the deadline and frees its slot while the handler's thread is still stuck."""
    import logging
    import threading

    caplog.set_level(logging.WARNING, logger="dicom_node.scp")
    stuck, release = threading.Event(), threading.Event()

    def hanging_enqueue(_instance_id: int) -> None:
        stuck.set()
        release.wait(30)

    settings, server = guarded(enqueue=hanging_enqueue, store_deadline_s=1.0)
    dataset = wrap_image(IMAGE)
    ae = AE(ae_title="SENDER")
    ae.dimse_timeout = ae.network_timeout = ae.acse_timeout = 20
    ae.add_requested_context(dataset.SOPClassUID, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", settings.port, ae_title=settings.ae_title)
    try:
        answer = assoc.send_c_store(dataset)
        assert stuck.is_set()
        assert "Status" not in answer  # no answer: the sender retries
        # The requestor's own thread marks the association ended a moment after the abort.
        wait_for(lambda: not assoc.is_established, 10, "the aborted association to end")
        assert not server._slots  # freed while the handler still waits
        assert "aborted: C-STORE running past its 1 s deadline" in caplog.text
    finally:
        release.set()


def test_flooding_hosts_together_cannot_take_the_last_slots(guarded) -> None:
    """Issue 23 row 7: reconnect loops from 2 addresses took every slot (each within its own
    per-host share): a third sender stored 0 of 15 attempts. The last slots are for hosts
    holding none."""
    from tests.dicom_node.test_node_guard import connect, echo_status

    settings, server = guarded(max_associations=4)  # 2 per host, the last 2 for other hosts
    held = [connect(settings, "127.0.0.2"), connect(settings, "127.0.0.3")]
    held += [connect(settings, "127.0.0.2"), connect(settings, "127.0.0.3")]
    try:
        for sock in held:
            sock.setblocking(False)
        assert echo_status(settings, "127.0.0.1") == SUCCESS
        assert sorted(server._per_host.values()) <= [1, 1, 1]
    finally:
        for sock in held:
            sock.close()


def test_connections_past_a_hosts_rate_are_refused_at_once(guarded) -> None:
    from tests.dicom_node.test_node_guard import echo_status

    settings, _ = guarded(connection_rate_per_host_per_s=0.05, connection_burst_per_host=3)
    answers = [echo_status(settings, "127.0.0.2") for _ in range(5)]
    assert answers == [SUCCESS, SUCCESS, SUCCESS, None, None]
    assert echo_status(settings, "127.0.0.3") == SUCCESS  # another host keeps its own rate


def test_repeated_warnings_from_one_peer_are_rate_limited(monkeypatch) -> None:
    """Issue 23 row 6: one log line per connection or junk PDU (600 KB of 6-byte unknown-PDU
    headers: node.log +6.5 MB). Per peer and kind: 10 a minute, then a count of the rest."""
    import logging

    from dicom_node import peerlog

    now = [1000.0]
    monkeypatch.setattr(peerlog.time, "monotonic", lambda: now[0])
    limiter = peerlog.PeerLogLimit(per_minute=10)
    logger = logging.getLogger("dicom_node.test-peerlog")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger.setLevel(logging.INFO)
    logger.addFilter(limiter)
    logger.addHandler(handler)
    try:
        for _ in range(500):
            logger.warning("connection from %s refused: %s", "10.0.0.1", "why", extra={"peer": "10.0.0.1"})
        logger.warning("connection from %s refused: %s", "10.0.0.2", "why", extra={"peer": "10.0.0.2"})
        logger.info("an informational line is not limited", extra={"peer": "10.0.0.1"})
        now[0] += 61
        logger.warning("connection from %s refused: %s", "10.0.0.1", "why", extra={"peer": "10.0.0.1"})
    finally:
        logger.removeFilter(limiter)
        logger.removeHandler(handler)
    lines = [record.getMessage() for record in records]
    assert len(lines) == 13
    assert lines[10] == "connection from 10.0.0.2 refused: why"
    assert lines[-1] == "connection from 10.0.0.1 refused: why (490 more like this from 10.0.0.1 suppressed)"


def test_a_junk_pdu_flood_from_one_peer_logs_ten_lines_a_minute(guarded, caplog) -> None:
    import logging

    from tests.dicom_node.test_node_guard import closed_within, connect

    caplog.set_level(logging.INFO)
    settings, _ = guarded()
    for _ in range(25):
        sock = connect(settings, "127.0.0.5")
        sock.sendall(b"\x09\x00\x00\x00\x00\x00")  # an unknown PDU type: pynetdicom logs an error
        assert closed_within(sock, 5)
        sock.close()
    junk = [r for r in caplog.records if r.getMessage().startswith("Unknown PDU type")]
    assert len(junk) == 10
