"""`pneumo send` delivers DICOM files as they are, whatever their transfer syntax."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom.uid import DigitalXRayImageStorageForPresentation as DX_PRESENTATION
from pydicom.uid import ExplicitVRLittleEndian

from core.settings import PeerAddress
from ops.send import AssociationFailed, send
from tests.conftest import DATA, REAL_DICOM, REPO
from tests.helpers import dcmtk, free_port, wait_for


def test_every_real_file_goes_out_in_its_own_transfer_syntax(pacs) -> None:
    # dcmtk's storescp aborts on the canine file's odd-length fragment; our node's handling of it
    # is tested in test_receive.py.
    files = sorted(f for f in REAL_DICOM.glob("*.dcm") if not f.name.startswith("canine"))
    wait_for(lambda: subprocess.run([dcmtk("echoscu"), "-aec", "PACS", "127.0.0.1", str(pacs["port"])],
                                    capture_output=True).returncode == 0, 20, "storescp to listen")
    results = list(send(files, PeerAddress(pacs["ae"]), "PNEUMO-SEND"))
    assert [r.status for r in results] == [0x0000] * len(files)
    assert len(list(pacs["folder"].iterdir())) == len(files)


# --- bad input and peers that say no (issue 16, defect 9) -----------------------------------------

IMAGE = DATA / "test" / "PNEUMONIA" / "person100_bacteria_475.jpeg"


def _storescp_ready(pacs: dict) -> None:
    wait_for(lambda: subprocess.run([dcmtk("echoscu"), "-aec", "PACS", "127.0.0.1", str(pacs["port"])],
                                    capture_output=True).returncode == 0, 20, "storescp to listen")


def test_bad_files_are_named_with_their_reason_and_the_good_ones_still_sent(pacs, tmp_path: Path) -> None:
    not_dicom = tmp_path / "notes.dcm"
    not_dicom.write_text("this is not a DICOM file\n" * 20)
    broken_jpeg = tmp_path / "broken.jpeg"
    broken_jpeg.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    missing = tmp_path / "gone.dcm"
    real = REAL_DICOM / "nih_cxr14_dx_implicit.dcm"
    _storescp_ready(pacs)
    result = subprocess.run(
        [sys.executable, "-m", "ops.cli", "send", str(not_dicom), str(IMAGE), str(missing),
         str(broken_jpeg), str(real), "--to", pacs["ae"]],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    printed = result.stdout + result.stderr
    assert result.returncode == 1, printed
    assert "Traceback" not in printed and len(printed.splitlines()) <= 8, printed
    assert f"{not_dicom}: not sent: not a DICOM file" in result.stderr
    assert f"{missing}: not sent: no such file" in result.stderr
    assert f"{broken_jpeg}: not sent: unreadable" in result.stderr
    assert f"{IMAGE.name}: 0x0000" in result.stdout and f"{real.name}: 0x0000" in result.stdout
    assert "sent 2/5" in result.stdout
    assert len(list(pacs["folder"].iterdir())) == 2


def test_a_refused_connection_is_said_to_be_refused() -> None:
    with pytest.raises(AssociationFailed, match="connection refused"):
        list(send([IMAGE], PeerAddress(f"PACS@127.0.0.1:{free_port()}"), timeout_s=10))


def test_a_peer_that_never_answers_the_association_request_is_said_to_time_out() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(1)  # the kernel accepts the connection; nobody reads the A-ASSOCIATE-RQ
        address = PeerAddress(f"PACS@127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        with pytest.raises(AssociationFailed, match="timed out: the peer took the connection"):
            list(send([IMAGE], address, timeout_s=2))
    assert time.monotonic() - started < 30


def test_a_rejection_gives_the_peers_reason_and_source() -> None:
    from pynetdicom import AE

    peer = AE(ae_title="PACS")
    peer.require_calling_aet = ["MODALITY"]
    peer.add_supported_context(DX_PRESENTATION, ExplicitVRLittleEndian)
    port = free_port()
    server = peer.start_server(("127.0.0.1", port), block=False)
    try:
        with pytest.raises(AssociationFailed) as raised:
            list(send([IMAGE], PeerAddress(f"PACS@127.0.0.1:{port}"), "STRANGER", timeout_s=10))
    finally:
        server.shutdown()
    message = str(raised.value)
    assert "rejected by the peer (Rejected Permanent)" in message
    assert "reason 'Calling AE title not recognised'" in message and "source Service User" in message


def test_pneumo_send_says_why_the_association_failed(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ops.cli", "send", str(IMAGE), "--to", f"PACS@127.0.0.1:{free_port()}",
         "--timeout", "5"],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )
    assert result.returncode == 2
    assert "connection refused" in result.stderr and "Traceback" not in result.stderr
