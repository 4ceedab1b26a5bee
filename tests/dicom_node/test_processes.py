"""`pneumo node` in several processes (dicom_node.processes): the connection guard's limits hold
for all processes together, every image sent over parallel associations is stored and queued
once, and a receiver process that dies stops the node (its supervisor restarts it whole)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select

from core.db import Instance, InstanceState, session_factory
from core.migrate import upgrade
from core.settings import Settings
from ops.send import wrap_image
from tests.conftest import DATA, REDIS_TEST_URL, REPO
from tests.dicom_node.test_node_guard import closed_within
from tests.helpers import dcmtk, free_port, wait_for
from tests.pipeline.test_tls import Pki, client, pki  # noqa: F401  (pki: the fixture)
from tests.pipeline.test_tls import associate as tls_associate

PROCESSES = 3
IMAGES = sorted((DATA / "test" / "NORMAL").iterdir())[:24]


def run_node(home: Path, database_url: str, **extra: str) -> tuple[Settings, subprocess.Popen]:
    """`pneumo node` in PROCESSES receivers; 4 slots, 2 per host (so 2 kept for other hosts)."""
    env = {**os.environ, "PNEUMO_HOME": str(home), "PNEUMO_PORT": str(free_port()),
           "PNEUMO_HOST": "127.0.0.1", "PNEUMO_ALLOWED_PEERS": "*", "PNEUMO_DATABASE_URL": database_url,
           "PNEUMO_BROKER_URL": f"{REDIS_TEST_URL}/11", "PNEUMO_NODE_PROCESSES": str(PROCESSES),
           "PNEUMO_MAX_ASSOCIATIONS": "4", "PNEUMO_MAX_ASSOCIATIONS_PER_HOST": "2", **extra}
    home.mkdir(parents=True, exist_ok=True)
    with (home.parent / f"{home.name}.log").open("w") as log:
        process = subprocess.Popen([sys.executable, "-m", "ops.cli", "node"], env=env, cwd=REPO,
                                   stdout=log, stderr=subprocess.STDOUT)
    settings = Settings(home=home, port=int(env["PNEUMO_PORT"]), database_url=database_url)
    wait_for(lambda: (settings.node_health_path.exists() and process_tree(process))
             or process.poll() is not None, 60, "the node to listen")
    assert process.poll() is None, (home.parent / f"{home.name}.log").read_text()[-2000:]
    return settings, process


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture
def node(tmp_path: Path, database_url: str):
    settings, process = run_node(tmp_path / "home", database_url)
    try:
        yield settings, process
    finally:
        stop(process)


def process_tree(process: subprocess.Popen) -> list[psutil.Process]:
    """The receivers `process` forked (its direct children)."""
    try:
        return psutil.Process(process.pid).children()
    except psutil.NoSuchProcess:
        return []


def associate(settings: Settings, source: str = "127.0.0.1"):
    ae = AE(ae_title="SENDER")
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", settings.port, ae_title="PNEUMO", bind_address=(source, 0))


def test_limits_hold_across_processes(node) -> None:
    """Counted per process, a host's 2 slots would be 2 in each of 3 receivers."""
    settings, process = node
    assert len(process_tree(process)) == PROCESSES
    held = [associate(settings), associate(settings)]
    try:
        assert all(assoc.is_established and assoc.send_c_echo().Status == 0 for assoc in held)
        third = associate(settings)
        assert not third.is_established  # this host holds its 2 slots, whichever process has them
        other_host = associate(settings, source="127.0.0.2")
        assert other_host.is_established  # a slot kept for hosts holding none
        other_host.release()
    finally:
        for assoc in held:
            assoc.release()
    wait_for(lambda: associate_and_release(settings), 10, "the slots to be freed")


def associate_and_release(settings: Settings) -> bool:
    """Whether this host gets its 2 slots (released again at once)."""
    assocs = [associate(settings), associate(settings)]
    established = all(assoc.is_established for assoc in assocs)
    for assoc in assocs:
        if assoc.is_established:
            assoc.release()
    return established


def test_parallel_associations_store_each_image_once(node, tmp_path: Path) -> None:
    settings, _ = node
    folder = tmp_path / "send"
    folder.mkdir()
    files = []
    for index, image in enumerate(IMAGES):
        path = folder / f"{index}.dcm"
        wrap_image(image).save_as(path, enforce_file_format=True)
        files.append(path)
    for _ in range(2):  # the second time, every image is a duplicate: acknowledged, not stored again
        senders = [subprocess.Popen([dcmtk("storescu"), "-aet", "SENDER", "-aec", "PNEUMO", "127.0.0.1",
                                     str(settings.port), *map(str, files[i::2])], stderr=subprocess.PIPE)
                   for i in range(2)]
        for sender in senders:
            _, errors = sender.communicate(timeout=120)
            assert sender.returncode == 0 and b"Store Failed" not in errors, errors[-500:]
    sessions = session_factory(settings.sqlalchemy_url)
    with sessions() as session:
        rows = session.execute(select(Instance.sop_instance_uid, Instance.state)).all()
        assert session.scalar(select(func.count()).select_from(Instance)) == len(files)
    sent = {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files}
    assert {uid for uid, _ in rows} == sent
    assert {state for _, state in rows} <= {InstanceState.QUEUED, InstanceState.RECEIVED}
    assert len(list(settings.storage_dir.rglob("*.dcm"))) == len(files)
    sessions.kw["bind"].dispose()


def test_a_dead_receiver_stops_the_node(node) -> None:
    _, process = node
    receivers = process_tree(process)
    os.kill(receivers[0].pid, signal.SIGKILL)
    assert process.wait(timeout=30) == 1
    wait_for(lambda: not any(receiver.is_running() and receiver.status() != psutil.STATUS_ZOMBIE
                             for receiver in receivers), 15, "the other receivers to exit")


def test_tls_in_several_processes(tmp_path: Path, pki: Pki) -> None:  # noqa: F811 (the fixture)
    """The acceptor does not wrap the socket; the receiver does the handshake: a TLS peer
    associates, a plain TCP one does not."""
    url = f"sqlite:///{tmp_path / 'pneumo.db'}"
    upgrade(url)
    settings, process = run_node(tmp_path / "home", url, PNEUMO_TLS_CERT_FILE=str(pki.server.cert),
                                 PNEUMO_TLS_KEY_FILE=str(pki.server.key), PNEUMO_TLS_CA_FILE=str(pki.ca))
    try:
        for _ in range(PROCESSES):  # one association after the other: each on the least busy
            assoc = tls_associate(settings, client(pki.ca))
            assert assoc.is_established and assoc.send_c_echo().Status == 0
            assoc.release()
        assert not tls_associate(settings, None).is_established
    finally:
        stop(process)


def test_a_stalled_connection_is_closed_by_its_receiver_and_its_slot_freed(tmp_path: Path) -> None:
    """The receiver's watchdog closes a connection that never sends its A-ASSOCIATE-RQ; the
    acceptor, which counts the slot, frees it."""
    url = f"sqlite:///{tmp_path / 'pneumo.db'}"
    upgrade(url)
    settings, process = run_node(tmp_path / "home", url, PNEUMO_ASSOCIATION_REQUEST_TIMEOUT_S="2")
    stalled = [socket.create_connection(("127.0.0.1", settings.port), timeout=10) for _ in range(2)]
    try:
        wait_for(lambda: not associate_and_release(settings), 5, "this host's 2 slots to be held")
        for sock in stalled:
            assert closed_within(sock, 10)
        wait_for(lambda: associate_and_release(settings), 10, "the slots to be freed")
    finally:
        for sock in stalled:
            sock.close()
        stop(process)
