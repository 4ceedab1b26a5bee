"""C-STORE of an SR to the PACS (pynetdicom SCU)."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import ComprehensiveSRStorage

from core.settings import PeerAddress


class DeliveryError(Exception):
    """The PACS could not be reached or refused the SR; the message is recorded."""


def send_sr(path: Path, destination: PeerAddress, ae_title: str, timeout_s: float = 30) -> None:
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.add_requested_context(ComprehensiveSRStorage)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        raise DeliveryError(f"association with {destination!r} failed (rejected, aborted or down)")
    try:
        status = assoc.send_c_store(dcmread(path))
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code is None:
        raise DeliveryError(f"no C-STORE response from {destination!r}")
    if code != 0x0000 and not 0xB000 <= code <= 0xBFFF:
        raise DeliveryError(f"{destination!r} answered C-STORE status 0x{code:04X}")
