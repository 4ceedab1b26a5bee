"""The RIS's final reports as labels: an HL7 v2 ORU^R01 listener over MLLP (python-hl7's asyncio
server), answering each message with an ACK: AA when it became a label (or, for an uncertain
report, was read and deliberately gave none: MSA-3 says so), AE when it could not be used (not an
ORU^R01, no study key, no result, the database down) so the RIS shows it and can re-send.

Where we look (IHE Radiology conventions, first found wins):
- study: Study Instance UID in ZDS-1 or IPC-3; Accession Number in IPC-1, OBR-18, then OBR-3;
- label: a coded OBX (value type CE/CWE/CNE) whose OBX-5 code or text is in CODED_LABELS
  (SNOMED CT 233604007 pneumonia; 17621005 normal, 260385009 negative; or the words themselves);
  else the text OBX values (TX/FT/ST) joined, read by ops.report_text's negation-aware rule.
Only addresses in PNEUMO_HL7_ALLOWED_PEERS may send (when it is set); others are disconnected
unread. A message is recorded as a label with source hl7, who = sending application@facility, evidence =
its control id (MSH-10) and how the label was read; the raw message is kept under
PNEUMO_HOME/labels/hl7/ (private, as all of home), never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re
from dataclasses import dataclass
from datetime import UTC, datetime

import hl7
from hl7.mllp import HL7StreamReader, HL7StreamWriter, start_hl7_server
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.contract import NEGATIVE_CLASS, POSITIVE_CLASS
from core.db import LabelSource
from core.logsafe import PRIVATE_UMASK, printable
from core.settings import Settings
from ops.labels import LabelError, record_label
from ops.report_text import label_text

log = logging.getLogger(__name__)

CODED_LABELS = {
    "233604007": POSITIVE_CLASS, "pneumonia": POSITIVE_CLASS,
    "17621005": NEGATIVE_CLASS, "260385009": NEGATIVE_CLASS, "normal": NEGATIVE_CLASS,
    "negative": NEGATIVE_CLASS,
}
CODED_TYPES = {"CE", "CWE", "CNE"}
TEXT_TYPES = {"TX", "FT", "ST"}


class Unusable(ValueError):
    """The message cannot become a label (answered AE with this text)."""


@dataclass
class ReadLabel:
    study_instance_uid: str | None
    accession_number: str | None
    label: str | None  # None: the report was read and is uncertain
    how: str
    control_id: str
    sender: str


def _field(message: hl7.Message, segment: str, index: int, component: int = 1) -> str:
    """Text of SEG-index.component of the first such segment ('' when absent)."""
    try:
        return str(message.segment(segment).extract_field(1, index, 1, component)).strip()
    except (KeyError, IndexError):
        return ""


def _obx_values(message: hl7.Message) -> list[tuple[str, list[str], str]]:
    """(value type, OBX-5 components of its first repetition, OBX-5 as text) per OBX."""
    found = []
    with contextlib.suppress(KeyError):
        for obx in message.segments("OBX"):
            kind = str(obx(2)).strip().upper() if len(obx) > 2 else ""
            value = obx(5) if len(obx) > 5 else ""
            components = ([str(c).strip() for c in value[0]]
                          if isinstance(value, hl7.Field) and value and isinstance(value[0], hl7.Repetition)
                          else [str(value).strip()])
            found.append((kind, components, str(value)))
    return found


def read_message(text: str) -> ReadLabel:
    """The study key and label of an ORU^R01 (module docstring); Unusable when it has none."""
    try:
        message = hl7.parse(text)
    except Exception as error:  # python-hl7 raises bare ParseException/ValueError variants
        raise Unusable(f"not an HL7 v2 message ({type(error).__name__})") from None
    kind = f"{_field(message, 'MSH', 9, 1)}^{_field(message, 'MSH', 9, 2)}"
    if kind != "ORU^R01":
        raise Unusable(f"{kind} is not an ORU^R01 result")
    control_id = _field(message, "MSH", 10)
    sender = f"{_field(message, 'MSH', 3)}@{_field(message, 'MSH', 4)}".strip("@") or "RIS"
    uid = _field(message, "ZDS", 1) or _field(message, "IPC", 3)
    accession = (_field(message, "IPC", 1) or _field(message, "OBR", 18) or _field(message, "OBR", 3))
    if not uid and not accession:
        raise Unusable("no Study Instance UID (ZDS-1, IPC-3) or Accession Number (IPC-1, OBR-18, OBR-3)")
    values = _obx_values(message)
    if not values:
        raise Unusable("no OBX result")
    for value_type, components, _ in values:
        if value_type in CODED_TYPES:
            for word in (components[0].lower(), *(c.lower() for c in components[1:2])):
                if word in CODED_LABELS:
                    return ReadLabel(uid or None, accession or None, CODED_LABELS[word],
                                     f"coded OBX {word}", control_id, sender)
    report = "\n".join(raw.replace("~", "\n") for value_type, _, raw in values if value_type in TEXT_TYPES)
    if not report.strip():
        raise Unusable("no coded finding we know and no report text")
    read = label_text(report)
    return ReadLabel(uid or None, accession or None, read.label, read.rule, control_id, sender)


def _safe_name(control_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", control_id)[:64] or "no-control-id"


def allowed_networks(text: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    """PNEUMO_HL7_ALLOWED_PEERS as networks (an address is a /32 or /128); ValueError if malformed."""
    return [ipaddress.ip_network(part.strip(), strict=False) for part in text.split(",") if part.strip()]


class Listener:
    """Handles one message at a time per connection: parse, record, ACK."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings, self.sessions = settings, sessions
        self.folder = settings.home_dir / "labels" / "hl7"
        self.allowed = allowed_networks(settings.hl7_allowed_peers)

    def admits(self, peer: object) -> bool:
        """Whether the connecting address may send reports (any, when no list is set)."""
        if not self.allowed:
            return True
        try:
            address = ipaddress.ip_address(peer[0] if isinstance(peer, tuple) else str(peer))
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.allowed)

    def keep(self, text: str, control_id: str) -> str:
        """The raw message under home (private); the evidence names its file."""
        import os

        self.folder.mkdir(parents=True, exist_ok=True)
        # Time first: a re-sent or reused control id never overwrites earlier evidence.
        path = self.folder / f"{datetime.now(UTC):%Y%m%dT%H%M%S%fZ}-{_safe_name(control_id)}.hl7"
        old = os.umask(PRIVATE_UMASK)
        try:
            path.write_text(text.replace("\r", "\n"))
        finally:
            os.umask(old)
        return str(path.relative_to(self.settings.home_dir))

    def handle(self, text: str) -> tuple[str, str]:
        """(ACK code, text) for one message; records its label."""
        try:
            read = read_message(text)
        except Unusable as error:
            log.warning("hl7: message refused (AE): %s", error)
            return "AE", str(error)
        if read.label is None:
            log.info("hl7: message %s read, report uncertain: no label", _safe_name(read.control_id))
            return "AA", "report uncertain: no label recorded"
        stored = self.keep(text, read.control_id)
        try:
            with self.sessions() as session, session.begin():
                row = record_label(session, label=read.label, source=LabelSource.HL7, who=read.sender,
                                   evidence=f"HL7 {read.control_id} ({stored}): {read.how}",
                                   study_instance_uid=read.study_instance_uid,
                                   accession_number=read.accession_number)
        except LabelError as error:
            log.warning("hl7: message refused (AE): %s", error)
            return "AE", str(error)
        except SQLAlchemyError as error:
            log.warning("hl7: database unavailable (%s); answered AE", type(error).__name__)
            return "AE", "database unavailable; send again"
        return "AA", f"label {row.id}: {read.label}"

    async def connection(self, reader: HL7StreamReader, writer: HL7StreamWriter) -> None:
        if not self.admits(writer.get_extra_info("peername")):
            log.warning("hl7: connection from %s refused: not in PNEUMO_HL7_ALLOWED_PEERS",
                        printable(str((writer.get_extra_info("peername") or ("?",))[0])))
            writer.close()
            return
        try:
            while not writer.is_closing():
                message = await reader.readmessage()
                code, text = await asyncio.to_thread(self.handle, str(message))
                ack = message.create_ack(code)
                ack.segment("MSA").assign_field(text[:80].replace("|", "/").replace("^", "/"), 3)
                writer.writemessage(ack)
                await writer.drain()
        except asyncio.IncompleteReadError:
            pass  # the client closed the connection
        except Exception as error:  # a malformed frame: drop this connection, keep listening
            log.warning("hl7: connection dropped (%s)", type(error).__name__)
        finally:
            writer.close()


async def serve(settings: Settings, sessions: sessionmaker[Session],
                started: asyncio.Event | None = None, port: int | None = None) -> None:
    """Listen until cancelled (PNEUMO_HL7_HOST:PNEUMO_HL7_PORT, or `port`)."""
    listener = Listener(settings, sessions)
    bind = port if port is not None else settings.hl7_port
    server = await start_hl7_server(listener.connection, settings.hl7_host, bind,
                                    encoding="utf-8", encoding_errors="replace")
    log.info("hl7 MLLP listener on %s:%s", settings.hl7_host, bind)
    if started is not None:
        started.set()
    async with server:
        await server.serve_forever()
