"""The pynetdicom SCP: allow-list at association, C-ECHO, durable C-STORE, enqueue after commit."""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from sqlalchemy.orm import Session, sessionmaker

from core import tls
from core.lifecycle import notify_ready
from core.logsafe import printable
from core.scu import stored
from core.settings import Settings
from dicom_node import contexts, peerlog, processes, spool
from dicom_node.guard import GuardedRequestHandler, GuardedServer
from dicom_node.receive import (
    CONFLICT_COMMENT,
    CONFLICTING_DUPLICATE,
    SUCCESS,
    TOO_LARGE_COMMENT,
    enqueue_after_commit,
    record_refusal,
    store_instance,
)
from dicom_node.spool import clean_spool as clean_spool  # re-exported: the node's janitor, for callers

log = logging.getLogger(__name__)

REJECTED_PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNISED = 0x01, 0x01, 0x03
CALLED_AE_NOT_RECOGNISED = 0x07


class CannotListen(RuntimeError):
    """The node's port cannot be bound (in use, or not ours to take): restarting will not help."""


def peer_allowed(allowed: list[tuple[str, str | None]], ae_title: str, address: str) -> bool:
    """Empty allow-list: any peer. Else the AE title must match, and the host if one is given."""
    if not allowed:
        return True
    return any(ae == ae_title and (host is None or host == address) for ae, host in allowed)


def handle_requested(event: evt.Event, settings: Settings) -> None:
    """Refuse a peer at its A-ASSOCIATE-RQ, saying why in the log (AE titles and the address only).

    The called AE title is checked here rather than left to pynetdicom (`require_called_aet`),
    which refused a wrong one with no reason logged: IT saw "Rejecting Association" and nothing
    to act on (issue 23 row 11)."""
    requestor = event.assoc.requestor
    # At EVT_REQUESTED only the A-ASSOCIATE primitive carries the AE titles.
    assert requestor.primitive is not None  # the A-ASSOCIATE-RQ that raised this event
    ae_title = str(requestor.primitive.calling_ae_title).strip()
    called = str(requestor.primitive.called_ae_title).strip()
    if called != settings.ae_title:
        log.warning("association rejected: calling AE %s from %s called AE %s, this node is %s",
                    printable(repr(ae_title)), requestor.address, printable(repr(called)),
                    settings.ae_title)
        event.assoc.acse.send_reject(REJECTED_PERMANENT, SERVICE_USER, CALLED_AE_NOT_RECOGNISED)
        event.assoc.kill()
        return
    if not peer_allowed(settings.allowed, ae_title, requestor.address):
        log.warning("association rejected: calling AE %s from %s is not in the allow-list",
                    printable(repr(ae_title)), requestor.address)
        # As pynetdicom's own AE-title check does: send the A-ASSOCIATE-RJ, then stop the
        # association cleanly so the PDU is flushed before the socket closes.
        event.assoc.acse.send_reject(REJECTED_PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNISED)
        event.assoc.kill()


def handle_echo(event: evt.Event) -> int:
    return SUCCESS


def handle_accepted(event: evt.Event) -> None:
    """Say which proposed contexts we refused: a sender whose only context is refused sees an
    association with nothing to send on, and IT needs this line to find out why."""
    ae_title = printable(str(event.assoc.requestor.ae_title).strip())
    for context in event.assoc.rejected_contexts:
        log.warning("presentation context refused for %s: %s with %s", ae_title,
                    context.abstract_syntax, ", ".join(map(str, context.transfer_syntax)))


def handle_store(
    event: evt.Event,
    settings: Settings,
    sessions: sessionmaker[Session],
    enqueue: Callable[[int], None],
) -> int | Dataset:
    assoc: Any = event.assoc  # carries our own attributes for the watchdog
    assoc.pneumo_in_handler = True  # the watchdog's deadline covers the handler too
    try:
        return _store(event, settings, sessions, enqueue)
    finally:
        assoc.pneumo_in_handler = False
        assoc.pneumo_stores_done = getattr(assoc, "pneumo_stores_done", 0) + 1


def _store(
    event: evt.Event,
    settings: Settings,
    sessions: sessionmaker[Session],
    enqueue: Callable[[int], None],
) -> int | Dataset:
    request = cast(C_STORE, event.request)
    calling = str(event.assoc.requestor.ae_title).strip()
    outcome = store_instance(
        Path(event.dataset_path), str(request.AffectedSOPClassUID),
        str(request.AffectedSOPInstanceUID), calling, settings.storage_dir, sessions,
        settings.min_free_disk_mb, settings.max_inflated_mb, settings.max_dataset_mb,
    )
    log.info("C-STORE %s from %s: 0x%04X %s", printable(request.AffectedSOPInstanceUID),
             printable(calling), outcome.status, printable(outcome.reason))
    if outcome.status == SUCCESS and not outcome.duplicate and outcome.instance_id is not None:
        enqueue_after_commit(outcome.instance_id, sessions, enqueue)
    elif not stored(outcome.status):
        record_refusal(sessions, calling, outcome.status, outcome.reason)
    comment = (CONFLICT_COMMENT if outcome.status == CONFLICTING_DUPLICATE
               else TOO_LARGE_COMMENT if outcome.reason.startswith("data set too large") else None)
    if comment is not None:  # the sender's operator reads what the status means
        answer = Dataset()
        answer.Status, answer.ErrorComment = outcome.status, comment
        return answer
    return outcome.status


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.require_called_aet = True
    # The server counts connections against max_associations from accept on (GuardedServer);
    # pynetdicom's own count, later, would include threads of closed connections still winding down.
    ae.maximum_associations = 4 * settings.max_associations
    ae.dimse_timeout = ae.network_timeout = settings.network_timeout_s
    # The ARTIM timer: how long a rejected or aborted connection lingers before it is closed.
    ae.acse_timeout = settings.association_request_timeout_s
    ae.add_supported_context(contexts.VERIFICATION_SOP_CLASS)
    for sop_class in contexts.STORAGE_SOP_CLASSES:
        ae.add_supported_context(sop_class, contexts.ACCEPTED_TRANSFER_SYNTAXES)
    return ae


def make_server(
    settings: Settings,
    sessions: sessionmaker[Session],
    enqueue: Callable[[int], None],
    ssl_context: Any,
    server_class: type[GuardedServer],
    **kwargs: Any,
) -> GuardedServer:
    """The node's AE and its server (`server_class` binds the port unless it is a Receiver)."""
    handlers: list[Any] = [
        (evt.EVT_REQUESTED, handle_requested, [settings]),
        (evt.EVT_ACCEPTED, handle_accepted),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [settings, sessions, enqueue]),
    ]
    ae = build_ae(settings)
    # Each data set straight into a spool file, at most max_dataset_mb of it (dicom_node.spool).
    spool.spool_into(ae, settings.spool_dir, settings.max_dataset_mb)
    return cast(GuardedServer, ae.make_server(
        (settings.host, settings.port), evt_handlers=handlers, ssl_context=ssl_context,
        server_class=server_class, request_handler=GuardedRequestHandler, settings=settings, **kwargs))


def start(
    settings: Settings,
    sessions: sessionmaker[Session],
    enqueue: Callable[[int], None],
    block: bool = False,
) -> GuardedServer | None:
    """Start listening; spool files go under the storage folder's filesystem for atomic renames.

    With a certificate configured the port speaks TLS only; a bad TLS file raises TLSConfigError
    here, before anything listens; a port that cannot be bound (in use, not ours) CannotListen.
    """
    ssl_context = tls.server_context(settings)
    settings.ensure_dirs()
    # Peers' UIDs are fine in logs; nothing else from the dataset is logged.
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_REQUEST_IDENTIFIERS = False
    peerlog.install(settings.peer_warnings_per_minute)
    transport = "plain TCP"
    if ssl_context is not None:
        transport = "mutual TLS" if settings.tls_require_client_cert else "TLS"
    count = processes.process_count(settings) if block else 1
    receivers: list[tuple[int, socket.socket]] = []
    if count > 1:  # forked before this process starts any thread (dicom_node.processes)
        receivers = processes.fork_receivers(count, lambda acceptor: cast(processes.Receiver, make_server(
            settings, sessions, enqueue, ssl_context, processes.Receiver)).receive(acceptor))
    try:  # bind first: "listening" is said only once it is true
        server = make_server(settings, sessions, enqueue, ssl_context,
                             processes.Acceptor if receivers else GuardedServer,
                             **({"receivers": receivers} if receivers else {}))
    except OSError as error:
        raise CannotListen(f"cannot listen on {settings.host}:{settings.port} (PNEUMO_HOST/PNEUMO_PORT): "
                           f"{error.strerror or error}") from None
    older_than_s = max(3 * settings.network_timeout_s, 60.0)
    threading.Thread(target=spool.janitor, args=(settings.spool_dir, older_than_s), daemon=True).start()
    log.info("DICOM node %s listening on %s:%d (%s, %d process%s)", settings.ae_title, settings.host,
             settings.port, transport, count, "" if count == 1 else "es")
    server.write_health()
    server.ae._servers.append(server)  # as AE.start_server does: ae.shutdown() stops it too
    notify_ready()
    if block:
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            pass
        finally:
            server.shutdown()
            if isinstance(server, processes.Acceptor):
                server.stop_receivers()
                if server.failed:
                    raise SystemExit(1)
        return None
    threading.Thread(target=server.serve_forever, name="AcceptorServer", daemon=True).start()
    return server
