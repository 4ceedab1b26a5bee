"""Empty Pixel Data is a recorded failure that says so (issue 23, row 11).

A 0-byte Pixel Data failed in the decoder with "object of type 'NoneType' has no len()", and an
encapsulated one without a fragment with every decoder plugin's complaint; neither told anyone
that the image was simply not there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    generate_uid,
)

from core.db import InstanceState
from worker import classify
from worker.filters import failure_reason

ITEM, SEQUENCE_END = b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0"
EMPTY_ENCAPSULATED = ITEM + b"\x00" * 4 + SEQUENCE_END + b"\x00" * 4  # a Basic Offset Table only


def chest_header(syntax: str = ExplicitVRLittleEndian) -> Dataset:
    """A chest DX header the filters would pass; Pixel Data is set by each test."""
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.SOPClassUID, dataset.SOPInstanceUID = DigitalXRayImageStorageForPresentation, generate_uid()
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    dataset.Modality, dataset.BodyPartExamined, dataset.ViewPosition = "DX", "CHEST", "PA"
    dataset.Rows = dataset.Columns = 64
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 16, 12, 11
    dataset.SamplesPerPixel, dataset.PixelRepresentation = 1, 0
    dataset.PhotometricInterpretation = "MONOCHROME2"
    return dataset


def stored(dataset: Dataset, folder: Path) -> Path:
    path = folder / "image.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("encapsulated", [False, True], ids=["native 0 bytes", "encapsulated, no fragment"])
def test_empty_pixel_data_fails_with_its_reason(encapsulated: bool, tmp_path: Path) -> None:
    """Recorded as `failed` with a reason a person can read, before any decoder runs (the
    classifier is never asked for)."""
    dataset = chest_header(JPEG2000Lossless if encapsulated else ExplicitVRLittleEndian)
    dataset.PixelData = EMPTY_ENCAPSULATED if encapsulated else b""
    if encapsulated:
        dataset["PixelData"].VR, dataset["PixelData"].is_undefined_length = "OB", True

    def no_model():
        raise AssertionError("an empty image must not reach the model")

    state, reason, result, model = classify._classify_file(stored(dataset, tmp_path), no_model)
    expected = ("encapsulated Pixel Data holds no fragment" if encapsulated
                else "Pixel Data is empty (0 bytes)")
    assert (state, reason, result, model) == (InstanceState.FAILED, f"no pixel data: {expected}", None, None)


def test_pixel_data_is_not_read_to_check_it(tmp_path: Path) -> None:
    """A value over the worker's defer size stays unread: its stored length answers."""
    dataset = chest_header()
    dataset.Rows = dataset.Columns = 1024
    dataset.PixelData = b"\x01\x00" * 1024 * 1024
    header = dcmread(stored(dataset, tmp_path), defer_size=1 << 20)
    assert failure_reason(header) is None
    element = header.get_item("PixelData", keep_deferred=True)
    assert isinstance(element, RawDataElement) and element.value is None  # still deferred


def test_a_fragment_is_not_empty(tmp_path: Path) -> None:
    """An encapsulated image with a frame passes on to the codestream check and the decoder."""
    dataset = chest_header(JPEG2000Lossless)
    dataset.PixelData = encapsulate([b"\xff\x4f\xff\x51" + b"\x00" * 60])
    dataset["PixelData"].VR, dataset["PixelData"].is_undefined_length = "OB", True
    header = dcmread(stored(dataset, tmp_path), defer_size=1 << 20)
    assert not (failure_reason(header) or "").startswith("no pixel data")
