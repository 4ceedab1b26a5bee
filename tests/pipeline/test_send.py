"""`pneumo send` delivers DICOM files as they are, whatever their transfer syntax."""

from __future__ import annotations

import subprocess

from core.settings import PeerAddress
from dicom_node.send import send
from tests.conftest import REAL_DICOM, dcmtk
from tests.pipeline.conftest import wait_for


def test_every_real_file_goes_out_in_its_own_transfer_syntax(pacs) -> None:
    # dcmtk's storescp aborts on the canine file's odd-length fragment; our node's handling of it
    # is tested in test_receive.py.
    files = sorted(f for f in REAL_DICOM.glob("*.dcm") if not f.name.startswith("canine"))
    wait_for(lambda: subprocess.run([dcmtk("echoscu"), "-aec", "PACS", "127.0.0.1", str(pacs["port"])],
                                    capture_output=True).returncode == 0, 20, "storescp to listen")
    results = list(send(files, PeerAddress(pacs["ae"]), "PNEUMO-SEND"))
    assert [r.status for r in results] == [0x0000] * len(files)
    assert len(list(pacs["folder"].iterdir())) == len(files)
