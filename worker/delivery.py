"""C-STORE of an SR to the PACS (pynetdicom SCU), over TLS when given a context."""

from __future__ import annotations

import ssl
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage

from core.scu import AssociationFailed, associate, stored
from core.settings import PeerAddress


class DeliveryError(Exception):
    """The PACS could not be reached or refused the SR; the message is recorded."""


def send_sr(
    path: Path, destination: PeerAddress, ae_title: str, timeout_s: float = 30,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """With `ssl_context`, TLS only; the PACS's certificate must match its host as given."""
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(ComprehensiveSRStorage)
    try:
        assoc = associate(ae, destination, timeout_s, ssl_context)
    except AssociationFailed as error:
        raise DeliveryError(str(error)) from None
    try:
        status = assoc.send_c_store(dcmread(path))
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        raise DeliveryError(f"no C-STORE response from {destination!r}")
    if not stored(code):
        raise DeliveryError(f"{destination!r} answered C-STORE status 0x{code:04X}")
