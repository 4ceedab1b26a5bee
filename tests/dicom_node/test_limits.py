"""The node's limits against a sloppy modality or an attacker (issue 23): a deflated data set whose
pad byte spun a thread for ever, a re-send in another transfer syntax, the per-data-set size
limit, the association deadline and per-address connection rates.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian

from dicom_node.receive import SUCCESS, inflates_past, store_instance
from ops.send import wrap_image
from tests.conftest import DATA

IMAGE = sorted((DATA / "test" / "NORMAL").iterdir())[0]


def _deflated_body(path: Path) -> bytes:
    meta = read_file_meta_info(path)
    return path.read_bytes()[132 + 12 + int(meta.FileMetaInformationGroupLength):]


def _leaves_pad_in_tail(body: bytes) -> bool:
    """Whether inflating `body` 1 MiB at a time ends with bytes left in `unconsumed_tail`: the
    state in which `decompress` returns b'' for ever (the trigger of issue 23 row 1)."""
    inflater, chunk = zlib.decompressobj(-zlib.MAX_WBITS), body
    for _ in range(1000):
        inflater.decompress(chunk, 1 << 20)
        chunk = inflater.unconsumed_tail
        if inflater.eof or not chunk:
            break
    return inflater.eof and bool(inflater.unconsumed_tail)


def deflated_zeros(folder: Path) -> tuple[Path, Dataset]:
    """Row 1's file: a DX of 2000x4000 16-bit zeros, Deflated Explicit VR Little Endian (~16 KB),
    whose stream leaves its pad byte in the tail (the description's length is varied until it
    does: whether it does depends on where the stream's end falls against the 1 MiB steps)."""
    for length in range(2, 80, 2):
        dataset = wrap_image(IMAGE)
        dataset.Rows, dataset.Columns = 2000, 4000
        dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 16, 15
        dataset.PixelData = np.zeros((2000, 4000), np.uint16).tobytes()
        dataset.StudyDescription = "X" * length
        dataset.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        path = folder / "deflated.dcm"
        dataset.save_as(path, enforce_file_format=True)
        if _leaves_pad_in_tail(_deflated_body(path)):
            return path, dataset
    raise AssertionError("no variant leaves the pad byte in the tail")


@pytest.mark.timeout(60)  # the old loop never ended: a hang here is the failure
def test_a_deflated_data_set_ending_in_its_pad_byte_is_read_to_its_end(tmp_path: Path, sessions) -> None:
    path, dataset = deflated_zeros(tmp_path)
    assert path.stat().st_size < 20_000
    assert inflates_past(path, 512 << 20) is False
    assert inflates_past(path, 1 << 20) is True  # the limit still applies
    (tmp_path / "storage").mkdir()
    outcome = store_instance(path, dataset.SOPClassUID, dataset.SOPInstanceUID, "SENDER",
                             tmp_path / "storage", sessions)
    assert outcome.status == SUCCESS, outcome.reason
