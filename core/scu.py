"""The one SCU association: open it, and when it fails say why as an operator needs it.

Used by the simulated sender (ops.send) and by SR delivery (worker.delivery): refused, timed out,
rejected by the peer with its reason, or the TLS handshake's own failure (core.tls).
"""

from __future__ import annotations

import logging
import ssl

from pynetdicom import AE, Association
from pynetdicom.status import STATUS_SUCCESS, STATUS_WARNING, code_to_category

from core.settings import PeerAddress
from core.tls import handshake_failure


def stored(status: int) -> bool:
    """Whether a C-STORE status means the object was kept: success or any warning (PS3.7 C)."""
    return code_to_category(status) in (STATUS_SUCCESS, STATUS_WARNING)


class AssociationFailed(ConnectionError):
    """No association: connection refused, timed out, a TLS failure, or rejected by the peer."""


class _Records(logging.Handler):
    """pynetdicom's own account of an association attempt (it logs, it does not raise)."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def association_failure(assoc: Association, messages: list[str], timeout_s: float) -> str:
    """Why an association was not established, as the operator needs it: refused, timed out, or
    rejected by the peer with the reason and source of its A-ASSOCIATE-RJ."""
    answer = assoc.acceptor.primitive
    if assoc.is_rejected and answer is not None:
        return (f"rejected by the peer ({answer.result_str}): reason {answer.reason_str!r}, "
                f"source {answer.source_str}")
    for message in messages:
        if message.startswith("TCP Initialisation Error"):
            cause = message.split(":", 1)[-1].strip()
            if "refused" in cause.lower():
                return "connection refused (nothing listens there, or a firewall refuses)"
            if "timed out" in cause.lower():
                return f"connection timed out after {timeout_s:g} s (host down or a firewall drops it)"
            return f"cannot connect: {cause}"
    if any("ACSE timeout" in message for message in messages):
        return (f"timed out: the peer took the connection but did not answer the association "
                f"request within {timeout_s:g} s")
    if any("No accepted presentation contexts" in message for message in messages):
        return "the peer accepted none of the proposed SOP class / transfer syntax pairs"
    if assoc.is_aborted:
        return "aborted by the peer"
    return "failed"


def associate(
    ae: AE, destination: PeerAddress, timeout_s: float, ssl_context: ssl.SSLContext | None = None
) -> Association:
    """An established association with `destination` (TLS only with `ssl_context`, the peer's
    certificate checked against its host as given), or AssociationFailed saying why."""
    tls_args = None if ssl_context is None else (ssl_context, destination.host)
    records = _Records()
    pynetdicom_log = logging.getLogger("pynetdicom")
    pynetdicom_log.addHandler(records)
    try:
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             tls_args=tls_args)
    finally:
        pynetdicom_log.removeHandler(records)
    if assoc.is_established:
        return assoc
    if ssl_context is not None and not assoc.is_rejected:
        reason = handshake_failure(destination.host, destination.port, ssl_context, timeout_s)
        if reason:
            raise AssociationFailed(f"TLS with {destination!r} failed: {reason}")
    raise AssociationFailed(f"association with {destination!r} failed: "
                            f"{association_failure(assoc, records.messages, timeout_s)}")
