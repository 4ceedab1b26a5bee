"""The RIS's final report as a label (issue 20 item 3a): ORU^R01 messages sent by python-hl7's
own MLLP client to the listener, answered AA or AE, and recorded on the right study."""

from __future__ import annotations

import asyncio
import contextlib
import stat
import threading
from pathlib import Path

import hl7
import pytest
from hl7.client import MLLPClient
from sqlalchemy import select

from core.contract import NEGATIVE_CLASS, POSITIVE_CLASS
from core.db import Label
from core.settings import Settings
from ops.hl7_listener import serve
from ops.labels import current_labels
from tests.helpers import free_port, wait_for
from tests.ops.labelled import add_study


def oru(control_id: str, *, study_uid: str = "", accession: str = "", obx: list[str],
        kind: str = "ORU^R01") -> str:
    segments = [f"MSH|^~\\&|RIS|GENERAL|PNEUMO|SITE|20261207120000||{kind}|{control_id}|P|2.5.1",
                "PID|1||MRN123^^^GENERAL||DOE^JANE||19600101|F",
                f"OBR|1||{accession}|71045^XR CHEST 1 VIEW^CPT|||20261207110000||||||||||||||||||F"]
    if study_uid:
        segments.append(f"ZDS|{study_uid}^RIS^Application^DICOM")
    segments += [f"OBX|{n}|{value}" for n, value in enumerate(obx, start=1)]
    return "\r".join(segments)


@pytest.fixture
def listener(tmp_path: Path, database_url: str, request: pytest.FixtureRequest):
    """The listener in a thread of this process; PNEUMO_HL7_ALLOWED_PEERS by indirect parameter."""
    settings = Settings(home=tmp_path / "home", database_url=database_url, hl7_host="127.0.0.1",
                        hl7_allowed_peers=getattr(request, "param", ""))
    settings.home_dir.mkdir(parents=True, exist_ok=True)
    from core.db import session_factory

    port = free_port()
    loop = asyncio.new_event_loop()
    started = threading.Event()

    async def run() -> None:
        ready = asyncio.Event()
        task = asyncio.create_task(serve(settings, session_factory(database_url), ready, port))
        await ready.wait()
        started.set()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    thread = threading.Thread(target=loop.run_until_complete, args=(run(),), daemon=True)
    thread.start()
    wait_for(started.is_set, 30, "the HL7 listener to listen")
    yield {"port": port, "home": settings.home_dir}
    for task in asyncio.all_tasks(loop):
        loop.call_soon_threadsafe(task.cancel)
    thread.join(timeout=10)


def send(port: int, message: str) -> hl7.Message:
    with MLLPClient("127.0.0.1", port) as client:
        reply = client.send_message(message)
    return hl7.parse(reply.decode().strip("\x0b\x1c\r"))


def test_a_coded_finding_and_a_report_text_become_labels_on_their_studies(listener, sessions) -> None:
    with sessions() as session, session.begin():
        by_uid = add_study(session, [0.8])
        by_accession = add_study(session, [0.3], accession="ACC55")
    coded = oru("MSG001", study_uid=by_uid.study_instance_uid,
                obx=["CWE|18782-3^Radiology Study observation^LN||233604007^Pneumonia^SCT||||||F"])
    ack = send(listener["port"], coded)
    assert str(ack.segment("MSA")(1)) == "AA" and str(ack.segment("MSA")(2)) == "MSG001"
    text = oru("MSG002", accession="ACC55", obx=[
        "TX|18782-3^Radiology Study observation^LN||FINDINGS: Heart size normal.||||||F",
        "TX|18782-3^Report^LN||IMPRESSION: No focal consolidation. No pneumonia.||||||F"])
    assert str(send(listener["port"], text).segment("MSA")(1)) == "AA"
    with sessions() as session:
        current = current_labels(session)
        assert current[by_uid.id].label == POSITIVE_CLASS
        assert current[by_accession.id].label == NEGATIVE_CLASS
        rows = session.scalars(select(Label).order_by(Label.id)).all()
    assert [(r.source, r.who) for r in rows] == [("hl7", "RIS@GENERAL")] * 2
    assert "coded OBX 233604007" in rows[0].evidence
    assert "0 affirmed, 0 hedged, 2 negated" in rows[1].evidence
    (kept,) = (listener["home"] / "labels" / "hl7").glob("*-MSG001.hl7")
    assert "DOE^JANE" in kept.read_text()  # the raw evidence, kept private under home
    assert stat.S_IMODE(kept.stat().st_mode) & 0o077 == 0


@pytest.mark.parametrize(("message", "reason"), [
    (oru("BAD1", obx=["TX|18782-3^Report^LN||Right lower lobe pneumonia.||||||F"]),
     "no Study Instance UID"),
    (oru("BAD2", accession="ACC9", obx=["TX|x||y||||||F"], kind="ADT^A08"), "is not an ORU^R01"),
    (oru("BAD3", accession="ACC9", obx=[]), "no OBX result"),
])
def test_an_unusable_message_is_answered_AE_with_why_and_records_nothing(listener, sessions, message,
                                                                         reason) -> None:
    ack = send(listener["port"], message)
    assert str(ack.segment("MSA")(1)) == "AE"
    assert reason.replace("^", "/") in str(ack.segment("MSA")(3))
    with sessions() as session:
        assert session.scalars(select(Label)).all() == []


def test_an_uncertain_report_is_accepted_without_a_label(listener, sessions) -> None:
    message = oru("MSG9", accession="ACC9",
                  obx=["TX|18782-3^Report^LN||Pneumonia cannot be excluded.||||||F"])
    ack = send(listener["port"], message)
    assert str(ack.segment("MSA")(1)) == "AA" and "uncertain" in str(ack.segment("MSA")(3))
    with sessions() as session:
        assert session.scalars(select(Label)).all() == []


def test_pneumo_labels_listen_serves_on_pneumo_hl7_port_and_pneumo_run_starts_it(tmp_path: Path) -> None:
    """The command `pneumo run` starts (ops.supervisor) as its own process, on PNEUMO_HL7_PORT."""
    import os
    import subprocess
    import sys

    from core.migrate import upgrade
    from ops.supervisor import child_commands
    from tests.conftest import REPO

    url = f"sqlite:///{tmp_path / 'pneumo.db'}"
    upgrade(url)
    port = free_port()
    assert [c.command[-2:] for c in child_commands(Settings(hl7_port=port)) if c.name == "hl7"] == [
        ["labels", "listen"]]
    assert "hl7" not in [c.name for c in child_commands(Settings())]
    env = {**os.environ, "PNEUMO_HOME": str(tmp_path / "home"), "PNEUMO_DATABASE_URL": url,
           "PNEUMO_HL7_PORT": str(port), "PNEUMO_HL7_HOST": "127.0.0.1"}
    process = subprocess.Popen([sys.executable, "-m", "ops.cli", "labels", "listen"], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def answers() -> hl7.Message | None:
            assert process.poll() is None, process.stdout.read() if process.stdout else ""
            try:
                return send(port, oru("P1", accession="ACC1",
                                      obx=["CE|18782-3^Report^LN||17621005^Normal^SCT||||||F"]))
            except OSError:
                return None

        ack = wait_for(answers, 60, "pneumo labels listen to answer")
        assert str(ack.segment("MSA")(1)) == "AA"
    finally:
        process.terminate()
        output = process.communicate(timeout=20)[0]
    assert "ACC1" not in output and "17621005" not in output  # identifiers stay out of its log
    from core.db import session_factory

    with session_factory(url)() as session:
        labels = [(r.accession_number, r.label) for r in session.scalars(select(Label))]
    assert labels == [("ACC1", NEGATIVE_CLASS)]


@pytest.mark.parametrize("listener", ["10.0.0.0/8, 192.168.1.7"], indirect=True)
def test_a_peer_outside_pneumo_hl7_allowed_peers_is_disconnected_unread(listener, sessions) -> None:
    message = oru("X1", accession="ACC1", obx=["CE|18782-3^Report^LN||233604007^Pneumonia^SCT||||||F"])
    with MLLPClient("127.0.0.1", listener["port"]) as client:
        try:
            reply = client.send_message(message)
        except ConnectionResetError:  # closed while the message was on its way
            reply = b""
    assert reply == b""  # closed without an ACK
    with sessions() as session:
        assert session.scalars(select(Label)).all() == []


def test_allowed_peers_match_addresses_networks_and_mapped_ipv4(tmp_path: Path) -> None:
    from ops.hl7_listener import Listener

    gate = Listener(Settings(home=tmp_path, hl7_allowed_peers="10.1.0.0/16,192.168.1.7,fd00::/8"), None)
    assert [gate.admits((peer, 2575)) for peer in ("10.1.2.3", "10.2.0.1", "192.168.1.7", "::ffff:10.1.0.9",
                                                   "fd12::1", "2001:db8::1", "not-an-address")] == [
        True, False, True, True, True, False, False]
    assert Listener(Settings(home=tmp_path), None).admits(("203.0.113.9", 1))  # no list: any


def test_the_listener_refuses_to_open_beyond_loopback_to_any_sender(tmp_path: Path) -> None:
    """Labels decide promotions and alerts: on 0.0.0.0 with no PNEUMO_HL7_ALLOWED_PEERS the
    listener does not start, and says in one line what to set."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    env = {**os.environ, "PNEUMO_HOME": str(tmp_path / "home"), "PNEUMO_HL7_PORT": str(free_port()),
           "PNEUMO_HL7_HOST": "0.0.0.0", "PNEUMO_DATABASE_URL": f"sqlite:///{tmp_path / 'p.db'}"}
    env.pop("PNEUMO_HL7_ALLOWED_PEERS", None)
    done = subprocess.run([sys.executable, "-m", "ops.cli", "labels", "listen"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    from core.lifecycle import EXIT_CANNOT_START

    assert done.returncode == EXIT_CANNOT_START
    assert done.stderr.strip().splitlines()[-1].startswith("error: the HL7 listener would take labels")
    assert "PNEUMO_HL7_ALLOWED_PEERS" in done.stderr and "Traceback" not in done.stderr
