"""The node against a hostile or broken peer on loopback (issue 16, attack probe): stalled and
oversized association requests, one host taking every slot, forged log lines, and /healthz while
associations are refused. Every wait here is bounded by a socket timeout of a few seconds.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from core.db import session_factory
from core.migrate import upgrade
from core.settings import Settings
from dicom_node import scp
from dicom_node.receive import SUCCESS
from ops.send import wrap_image
from tests.conftest import DATA, REDIS_TEST_URL, REPO
from tests.helpers import free_port, wait_for

IMAGE = sorted((DATA / "test" / "NORMAL").iterdir())[0]


def _item(item_type: int, data: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(data)) + data


def associate_rq(calling: bytes, called: bytes = b"PNEUMO", abstract: bytes = b"1.2.840.10008.1.1") -> bytes:
    """A-ASSOCIATE-RQ bytes made by hand: a real SCU library refuses to send a hostile AE title."""
    context = _item(0x20, bytes([1, 0, 0, 0]) + _item(0x30, abstract) + _item(0x40, b"1.2.840.10008.1.2"))
    user = _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.826.0.1.3680043.9.1"))
    body = (struct.pack(">HH", 1, 0) + called.ljust(16) + calling.ljust(16) + bytes(32)
            + _item(0x10, b"1.2.840.10008.3.1.1.1") + context + user)
    return struct.pack(">BBI", 0x01, 0, len(body)) + body


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the node closes `sock` within `seconds` (anything it sends first is read)."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            if not sock.recv(4096):
                return True
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return False


@pytest.fixture
def start_node(tmp_path: Path):
    servers = []
    url = f"sqlite:///{tmp_path / 'pneumo.db'}"
    upgrade(url)

    def start(**overrides) -> Settings:
        settings = Settings(home=tmp_path / "home", port=free_port(), host="127.0.0.1",
                            database_url=url, allowed_peers="*", **overrides)
        servers.append(scp.start(settings, session_factory(url), lambda _id: None))
        return settings

    yield start
    for server in servers:
        server.shutdown()


def connect(settings: Settings, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", settings.port), timeout=5, source_address=(source, 0))
    return sock


def echo_status(settings: Settings, source: str = "127.0.0.1") -> int | None:
    ae = AE(ae_title="SENDER")
    ae.acse_timeout = ae.network_timeout = 5
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", settings.port, ae_title="PNEUMO", bind_address=(source, 0))
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo().Status
    assoc.release()
    return status


def health(settings: Settings) -> dict:
    return json.loads((settings.node_health_path).read_text())


def test_stalled_association_requests_are_closed_and_free_their_slots(start_node) -> None:
    """10 sockets send 6 bytes of an A-ASSOCIATE-RQ and stall: they held every slot for ever."""
    settings = start_node(max_associations=10, max_associations_per_host=10,
                          association_request_timeout_s=1.5)
    stalled = [connect(settings) for _ in range(10)]
    for sock in stalled:
        sock.sendall(associate_rq(b"STALLER")[:6])
    assert echo_status(settings) is None  # every slot taken meanwhile: refused, not hung
    assert all(closed_within(sock, 4) for sock in stalled)
    assert echo_status(settings) == SUCCESS


def test_a_dripping_request_is_closed_at_its_deadline(start_node) -> None:
    """One byte every half second never trips a per-read timeout; the deadline is for the whole."""
    settings = start_node(association_request_timeout_s=1.5)
    sock = connect(settings)
    request = associate_rq(b"DRIPPER")
    started = time.monotonic()
    with pytest.raises(OSError):
        for byte in request:
            sock.sendall(bytes([byte]))
            time.sleep(0.5)
            assert time.monotonic() - started < 6, "the node kept reading past its deadline"
    assert time.monotonic() - started < 6


def test_a_pdu_claiming_4_gib_is_refused_before_its_body_is_read(start_node, caplog) -> None:
    settings = start_node(association_request_timeout_s=30)
    sock = connect(settings)
    sock.sendall(struct.pack(">BBI", 0x01, 0, 0xFFFFFFFF) + b"\0" * 4096)
    assert closed_within(sock, 3)  # long before the 30 s deadline
    assert any("over the 1048576-byte limit before association" in r.getMessage() for r in caplog.records)


def test_one_host_cannot_take_every_slot(start_node) -> None:
    settings = start_node(max_associations=4, max_associations_per_host=2,
                          association_request_timeout_s=30)
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", settings.port, ae_title="PNEUMO") for _ in range(2)]
    try:
        assert all(assoc.is_established for assoc in held)
        refused = ae.associate("127.0.0.1", settings.port, ae_title="PNEUMO")
        assert refused.is_rejected  # A-ASSOCIATE-RJ, transient: the sender retries later
        assert echo_status(settings, source="127.0.0.2") == SUCCESS  # another host still gets in
    finally:
        for assoc in held:
            assoc.release()
    # The slots are free once the node's side of each released association has wound down.
    wait_for(lambda: echo_status(settings) == SUCCESS, 10, "the released slots to be free")


def test_a_junk_pdu_does_not_hold_a_slot_after_close(start_node) -> None:
    """The connection is gone, but pynetdicom's thread waits out its ACSE timeout (60 s): the
    slot was held all that time."""
    settings = start_node(max_associations=3, max_associations_per_host=3,
                          association_request_timeout_s=30)
    junk = [connect(settings) for _ in range(3)]
    for sock in junk:
        sock.sendall(b"\x09\x00\x00\x00\x00\x04junk")
    time.sleep(0.5)  # read by the node: it waits for the peer to close (Sta13)
    for sock in junk:
        sock.close()
    started = time.monotonic()
    wait_for(lambda: echo_status(settings) == SUCCESS, 10, "the slot to be free")
    assert time.monotonic() - started < 3


def test_200_idle_connections_from_one_host_do_not_lock_others_out(start_node) -> None:
    settings = start_node(max_associations=10, association_request_timeout_s=30)
    idle = []
    try:
        for _ in range(200):
            idle.append(connect(settings))
        started = time.monotonic()
        assert echo_status(settings, source="127.0.0.2") == SUCCESS
        assert time.monotonic() - started < 3
        assert health(settings)["max_associations_per_host"] == 8
        wait_for(lambda: health(settings)["active_associations"] == 8, 5, "the health file")
    finally:
        for sock in idle:
            sock.close()


def test_healthz_reflects_full_slots_and_refusals(start_node, tmp_path: Path) -> None:
    """The dashboard said "accepting" while every association was refused."""
    from starlette.testclient import TestClient

    from ops.dashboard import create_app

    settings = start_node(max_associations=3, max_associations_per_host=3,
                          association_request_timeout_s=30)
    client = TestClient(create_app(Settings(
        home=settings.home, database_url=settings.database_url, broker_url=f"{REDIS_TEST_URL}/8")))
    assert client.get("/healthz").json()["accepting_images"] is True
    stalled = [connect(settings) for _ in range(3)]
    for sock in stalled:
        sock.sendall(associate_rq(b"STALLER")[:6])
    assert echo_status(settings) is None
    def full_and_refused() -> bool:
        """Both in one file: one written between the third slot and the refusal says 0 refused
        (it failed so once under load)."""
        written = health(settings)
        return not written["accepting"] and written["refused_last_60_s"] >= 1

    wait_for(full_and_refused, 5, "the node to report its slots full and the refusal")
    body = client.get("/healthz").json()
    assert body["accepting_images"] is False
    assert body["node"]["active_associations"] == 3 and body["node"]["refused_last_60_s"] >= 1
    for sock in stalled:
        sock.close()
    wait_for(lambda: health(settings)["accepting"], 5, "the slots to free")
    assert client.get("/healthz").json()["accepting_images"] is True


def test_a_stopped_node_is_not_accepting(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from ops.dashboard import create_app

    url = f"sqlite:///{tmp_path / 'pneumo.db'}"
    upgrade(url)
    settings = Settings(home=tmp_path / "home", database_url=url, broker_url=f"{REDIS_TEST_URL}/8")
    client = TestClient(create_app(settings))
    assert client.get("/healthz").json()["accepting_images"] is True  # no node has run here
    settings.node_health_path.write_text(json.dumps({
        "updated_at": time.time() - 3600, "active_associations": 0, "max_associations": 10,
        "accepting": True}))
    body = client.get("/healthz").json()
    assert body["accepting_images"] is False and body["node"]["status"].startswith("not running")


@pytest.fixture
def node_process(tmp_path: Path):
    """`pneumo node` as a process: its own logging set-up and umask, as in production."""
    env = {**os.environ, "PNEUMO_HOME": str(tmp_path / "home"), "PNEUMO_PORT": str(free_port()),
           "PNEUMO_HOST": "127.0.0.1", "PNEUMO_ALLOWED_PEERS": "*",
           "PNEUMO_BROKER_URL": f"{REDIS_TEST_URL}/9", "PNEUMO_ASSOCIATION_REQUEST_TIMEOUT_S": "3"}
    subprocess.run([sys.executable, "-m", "ops.cli", "db", "upgrade"], env=env, cwd=REPO,
                   check=True, capture_output=True)
    process = subprocess.Popen([sys.executable, "-m", "ops.cli", "node"], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    settings = Settings(home=tmp_path / "home", port=int(env["PNEUMO_PORT"]))
    try:
        wait_for(lambda: echo_status(settings) == SUCCESS, 60, "the node to answer C-ECHO")
        yield settings, process
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_cr_lf_in_an_ae_title_cannot_forge_a_log_line(node_process) -> None:
    """pynetdicom logs the invalid AE title as received, in its message and its traceback: the
    line is logged (what it quotes withheld by core.phi, or escaped by core.logsafe), never split."""
    settings, process = node_process
    sock = connect(settings)
    sock.sendall(associate_rq(b"EVIL\r\n2026-01-01 00:00:00,000 INFO FORGED"))
    assert closed_within(sock, 5)
    process.terminate()
    output, _ = process.communicate(timeout=10)
    assert "must not contain control characters" in output
    assert "EVIL\\r\\n2026" in output or "<withheld>" in output
    assert not any(line.startswith("2026-01-01") for line in output.splitlines()), output


def test_patient_data_is_stored_private_to_the_service(node_process, tmp_path: Path) -> None:
    """Images, the database and the node's files were 0644 in 0755 folders."""
    settings, _ = node_process
    dataset = wrap_image(IMAGE)
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", settings.port, ae_title="PNEUMO")
    assert assoc.send_c_store(dataset).Status == SUCCESS
    assoc.release()
    home = settings.home_dir
    stored = next(home.glob("storage/*/*/*.dcm"))
    files = [stored, home / "pneumo.db", settings.node_health_path]
    folders = [home, home / "storage", home / "spool", stored.parent, stored.parent.parent]
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in files} == {str(p): "0o600" for p in files}
    assert {str(p): oct(p.stat().st_mode & 0o777) for p in folders} == {str(p): "0o700" for p in folders}


def test_the_log_filter_escapes_what_libraries_log() -> None:
    import io

    from core.logsafe import install

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    install([handler])
    logger = logging.getLogger("pynetdicom.test-logsafe")
    logger.addHandler(handler)
    try:
        logger.warning("calling AE %s", "A\r\n2026-01-01 INFO forged\x00")
    finally:
        logger.removeHandler(handler)
    assert stream.getvalue() == "calling AE A\\r\\n2026-01-01 INFO forged\\x00\n"


@pytest.mark.parametrize("keyword", ["AccessionNumber", "Modality", "BodyPartExamined", "PatientID"])
def test_a_nul_character_in_a_text_value_is_refused_with_its_reason(
    keyword: str, sessions, tmp_path: Path
) -> None:
    """On PostgreSQL a NUL answered 0xA700 "database unavailable" for ever (Accession, Modality)
    or left the image in `processing` (Body Part); refused once, with the reason, on both."""
    import warnings

    from sqlalchemy import func, select

    from core.db import Instance
    from dicom_node.receive import CANNOT_UNDERSTAND, store_instance

    dataset = wrap_image(IMAGE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns of the character, and writes it
        setattr(dataset, keyword, "AB\x00CD")
        spool = tmp_path / "spool.dcm"
        dataset.save_as(spool, enforce_file_format=True)
    (tmp_path / "storage").mkdir()
    outcome = store_instance(spool, dataset.SOPClassUID, dataset.SOPInstanceUID, "SENDER",
                             tmp_path / "storage", sessions)
    assert (outcome.status, outcome.reason) == (CANNOT_UNDERSTAND,
                                                f"invalid value: NUL character in {keyword}")
    with sessions() as session:
        assert session.scalar(select(func.count(Instance.id))) == 0


def test_trailing_nul_padding_is_accepted(sessions, tmp_path: Path) -> None:
    from dicom_node.receive import store_instance

    dataset = wrap_image(IMAGE)
    dataset.AccessionNumber = "ACC1\x00"
    spool = tmp_path / "spool.dcm"
    dataset.save_as(spool, enforce_file_format=True)
    (tmp_path / "storage").mkdir()
    outcome = store_instance(spool, dataset.SOPClassUID, dataset.SOPInstanceUID, "SENDER",
                             tmp_path / "storage", sessions)
    assert outcome.status == SUCCESS, outcome.reason
