"""The pynetdicom SCP: allow-list at association, C-ECHO, durable C-STORE, enqueue after commit."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from core import tls
from core.lifecycle import notify_ready
from core.settings import Settings
from dicom_node import contexts
from dicom_node.receive import (
    CONFLICT_COMMENT,
    CONFLICTING_DUPLICATE,
    SUCCESS,
    enqueue_after_commit,
    record_refusal,
    spool_into,
    store_instance,
)

log = logging.getLogger(__name__)

REJECTED_PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNISED = 0x01, 0x01, 0x03


class CannotListen(RuntimeError):
    """The node's port cannot be bound (in use, or not ours to take): restarting will not help."""


def peer_allowed(allowed: list[tuple[str, str | None]], ae_title: str, address: str) -> bool:
    """Empty allow-list: any peer. Else the AE title must match, and the host if one is given."""
    if not allowed:
        return True
    return any(ae == ae_title and (host is None or host == address) for ae, host in allowed)


def handle_requested(event: evt.Event, settings: Settings) -> None:
    requestor = event.assoc.requestor
    # At EVT_REQUESTED only the A-ASSOCIATE primitive carries the calling AE title.
    ae_title = str(requestor.primitive.calling_ae_title).strip()
    if not peer_allowed(settings.allowed, ae_title, requestor.address):
        log.warning("association rejected: calling AE %r from %s is not in the allow-list",
                    ae_title, requestor.address)
        # As pynetdicom's own AE-title check does: send the A-ASSOCIATE-RJ, then stop the
        # association cleanly so the PDU is flushed before the socket closes.
        event.assoc.acse.send_reject(REJECTED_PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNISED)
        event.assoc.kill()


def handle_echo(event: evt.Event) -> int:
    return SUCCESS


def handle_accepted(event: evt.Event) -> None:
    """Say which proposed contexts we refused: a sender whose only context is refused sees an
    association with nothing to send on, and IT needs this line to find out why."""
    ae_title = str(event.assoc.requestor.ae_title).strip()
    for context in event.assoc.rejected_contexts:
        log.warning("presentation context refused for %s: %s with %s", ae_title,
                    context.abstract_syntax, ", ".join(map(str, context.transfer_syntax)))


def handle_store(
    event: evt.Event,
    settings: Settings,
    sessions: sessionmaker[Session],
    enqueue: Callable[[int], None],
) -> int | Dataset:
    request = event.request
    calling = str(event.assoc.requestor.ae_title).strip()
    outcome = store_instance(
        Path(event.dataset_path), str(request.AffectedSOPClassUID),
        str(request.AffectedSOPInstanceUID), calling, settings.storage_dir, sessions,
        settings.min_free_disk_mb, settings.max_inflated_mb,
    )
    log.info("C-STORE %s from %s: 0x%04X %s", request.AffectedSOPInstanceUID, calling,
             outcome.status, outcome.reason)
    if outcome.status == SUCCESS and not outcome.duplicate and outcome.instance_id is not None:
        enqueue_after_commit(outcome.instance_id, sessions, enqueue)
    elif outcome.status != SUCCESS and not 0xB000 <= outcome.status <= 0xBFFF:
        record_refusal(sessions, calling, outcome.status, outcome.reason)
    if outcome.status == CONFLICTING_DUPLICATE:  # the sender's operator reads what the status means
        answer = Dataset()
        answer.Status, answer.ErrorComment = outcome.status, CONFLICT_COMMENT
        return answer
    return outcome.status


def clean_spool(spool_dir: Path, older_than_s: float) -> list[Path]:
    """Remove spool files left by transfers that were interrupted (the handler never ran)."""
    cutoff = time.time() - older_than_s
    removed = []
    for path in spool_dir.glob("*.dcm"):
        try:
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed.append(path)
        except FileNotFoundError:
            continue
    if removed:
        log.warning("removed %d spool file(s) of interrupted transfers", len(removed))
    return removed


def _spool_janitor(settings: Settings) -> None:
    """Runs for the life of the node process (a daemon thread)."""
    older_than_s = max(3 * settings.network_timeout_s, 60.0)
    while True:
        time.sleep(60.0)
        clean_spool(settings.spool_dir, older_than_s)


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.require_called_aet = True
    ae.maximum_associations = settings.max_associations
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.network_timeout_s
    ae.add_supported_context(contexts.VERIFICATION_SOP_CLASS)
    for sop_class in contexts.STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, contexts.ACCEPTED_TRANSFER_SYNTAXES)
    return ae


def start(
    settings: Settings,
    sessions: sessionmaker[Session],
    enqueue: Callable[[int], None],
    block: bool = False,
) -> ThreadedAssociationServer | None:
    """Start listening; spool files go under the storage folder's filesystem for atomic renames.

    With a certificate configured the port speaks TLS only; a bad TLS file raises TLSConfigError
    here, before anything listens; a port that cannot be bound (in use, not ours) CannotListen.
    """
    ssl_context = tls.server_context(settings)
    settings.ensure_dirs()
    # Peers' UIDs are fine in logs; nothing else from the dataset is logged.
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_REQUEST_IDENTIFIERS = False
    handlers = [
        (evt.EVT_REQUESTED, handle_requested, [settings]),
        (evt.EVT_ACCEPTED, handle_accepted),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [settings, sessions, enqueue]),
    ]
    ae = build_ae(settings)
    spool_into(ae, settings.spool_dir)  # each data set straight into a spool file (receive.py)
    transport = "plain TCP"
    if ssl_context is not None:
        transport = "mutual TLS" if settings.tls_require_client_cert else "TLS"
    address = (settings.host, settings.port)
    try:  # bind first: "listening" is said only once it is true
        if block:
            server = ae.make_server(address, evt_handlers=handlers, ssl_context=ssl_context)
        else:
            server = ae.start_server(address, block=False, evt_handlers=handlers,
                                     ssl_context=ssl_context)
    except OSError as error:
        raise CannotListen(f"cannot listen on {settings.host}:{settings.port} (PNEUMO_HOST/PNEUMO_PORT): "
                           f"{error.strerror or error}") from None
    threading.Thread(target=_spool_janitor, args=(settings,), daemon=True).start()
    log.info("DICOM node %s listening on %s:%d (%s)", settings.ae_title, settings.host, settings.port,
             transport)
    notify_ready()
    if not block:
        return server
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.shutdown()
    return None
