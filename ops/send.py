"""`pneumo send`: a DICOM sender for tests and demos.

DICOM files are sent as they are. JPEG/PNG chest images are wrapped as DX (for presentation)
with realistic headers: MONOCHROME2, PA, CHEST, a new patient/study/series per image unless
grouped into one study. One association carries all files.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import DigitalXRayImageStorageForPresentation as DX_PRESENTATION
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE

from core.scu import AssociationFailed, associate
from core.settings import PeerAddress
from serving.image import load_grayscale

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


@dataclass(frozen=True)
class SendResult:
    path: Path
    sop_instance_uid: str
    study_instance_uid: str
    status: int | None  # None: not sent (see `error`) or no response (association lost)
    error: str | None = None  # why this file was not sent: missing, not DICOM, unreadable image


def collect(paths: list[Path]) -> list[Path]:
    """Files, and the files inside folders (sorted), in the order given."""
    found = []
    for path in paths:
        if path.is_dir():
            found.extend(p for p in sorted(path.rglob("*")) if p.is_file())
        else:
            found.append(path)
    return found


def wrap_image(path: Path, study: Dataset | None = None) -> Dataset:
    """A DX For Presentation dataset carrying the image's grayscale pixels unchanged (8 or 16 bit)."""
    pixels = load_grayscale(path)
    now = datetime.now()
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = DX_PRESENTATION
    dataset.SOPClassUID = DX_PRESENTATION
    dataset.SOPInstanceUID = generate_uid()
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    if study is None:
        study = Dataset()
        study.PatientName = f"DEMO^{path.stem[:40]}"
        study.PatientID = f"DEMO{generate_uid()[-10:]}"
        study.StudyInstanceUID = generate_uid()
        study.AccessionNumber = f"A{generate_uid()[-12:]}"
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber"):
        setattr(dataset, keyword, getattr(study, keyword))
    dataset.PatientBirthDate = ""
    dataset.PatientSex = "O"
    dataset.StudyDate = dataset.SeriesDate = dataset.ContentDate = now.strftime("%Y%m%d")
    dataset.StudyTime = dataset.SeriesTime = dataset.ContentTime = now.strftime("%H%M%S")
    dataset.StudyID = "1"
    dataset.ReferringPhysicianName = ""
    dataset.SeriesInstanceUID = generate_uid()
    dataset.SeriesNumber = 1
    dataset.InstanceNumber = 1
    dataset.Modality = "DX"
    dataset.Manufacturer = "Pneumo demo sender"
    dataset.BodyPartExamined = "CHEST"
    # No ViewPosition: a JPEG does not say how it was taken, and the served version's scope
    # checks a view that is given (a Kermany film claimed as PA would be refused for it).
    dataset.PresentationIntentType = "FOR PRESENTATION"
    dataset.ImageType = ["DERIVED", "PRIMARY"]
    dataset.PatientOrientation = ["L", "F"]
    dataset.ImageComments = f"wrapped from {path.name}"[:64]
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.PresentationLUTShape = "IDENTITY"
    dataset.Rows, dataset.Columns = pixels.shape
    # 8-bit files stay 8-bit; a 16-bit PNG keeps its depth (the one input path reads it so too).
    bits = 8 if pixels.dtype == np.uint8 else 16
    dataset.BitsAllocated = dataset.BitsStored = bits
    dataset.HighBit = bits - 1
    dataset.PixelRepresentation = 0
    dtype = np.uint8 if bits == 8 else np.uint16
    dataset.PixelData = np.ascontiguousarray(np.clip(pixels, 0, 2**bits - 1), dtype=dtype).tobytes()
    return dataset


def _unreadable(error: Exception) -> str:
    """A one-line reason for a file we could not read (read errors name no header values)."""
    if isinstance(error, FileNotFoundError):
        return "no such file"
    if isinstance(error, IsADirectoryError | PermissionError):
        return error.strerror or type(error).__name__
    if isinstance(error, InvalidDicomError):
        return "not a DICOM file (no DICOM preamble or File Meta Information)"
    text = str(error).splitlines()[0] if str(error) else ""
    return f"unreadable: {type(error).__name__}{': ' + text[:200] if text else ''}"


def _header(path: Path) -> tuple[str, str]:
    """(SOP Class UID, transfer syntax) of a file to send, read without its pixels."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        if not path.is_file():
            raise FileNotFoundError(path)
        return DX_PRESENTATION, ExplicitVRLittleEndian
    header = dcmread(path, stop_before_pixels=True)
    try:
        return str(header.SOPClassUID), str(header.file_meta.TransferSyntaxUID)
    except AttributeError:
        raise InvalidDicomError("no SOP Class UID or transfer syntax in the header") from None


def check(paths: list[Path]) -> tuple[dict[Path, tuple[str, str]], dict[Path, str]]:
    """Each file's (SOP class, transfer syntax), and for the files that cannot be sent, why.

    Any error while reading one file (pydicom, Pillow and the OS raise many kinds) makes that
    file fail alone, with its reason: one bad file must not stop the others.
    """
    headers, errors = {}, {}
    for path in collect(paths):
        try:
            headers[path] = _header(path)
        except Exception as error:
            errors[path] = _unreadable(error)
    return headers, errors


def datasets(
    paths: list[Path], group: bool, errors: dict[Path, str] | None = None
) -> Iterator[tuple[Path, Dataset | str]]:
    """Each file as a dataset to send, or the reason it cannot be sent, in the order given
    (`errors`: check()'s, when the caller has them already)."""
    if errors is None:
        errors = check(paths)[1]
    study = None
    for path in collect(paths):
        if path in errors:
            yield path, errors[path]
            continue
        try:
            if path.suffix.lower() in IMAGE_SUFFIXES:
                dataset = wrap_image(path, study)
                if group and study is None:
                    study = dataset
            else:
                dataset = dcmread(path)
        except Exception as error:  # as in check(): this file fails alone
            yield path, _unreadable(error)
            continue
        yield path, dataset


def requested_contexts(
    paths: list[Path], headers: dict[Path, tuple[str, str]] | None = None
) -> list[tuple[str, list[str]]]:
    """Contexts for every (SOP class, transfer syntax) present, each file sent as it is.

    A compressed syntax gets a context of its own: the acceptor picks one syntax per context, so
    offering JPEG 2000 beside Explicit VR in one context leaves the JPEG 2000 file nothing to go on.
    Files that cannot be read are left out (they are reported, not sent).
    """
    native = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    contexts: dict[tuple[str, tuple[str, ...]], None] = {}
    for sop_class, syntax in (check(paths)[0] if headers is None else headers).values():
        syntaxes = tuple(native) if syntax in native else (str(syntax),)
        contexts[(str(sop_class), syntaxes)] = None
    return [(sop_class, list(syntaxes)) for sop_class, syntaxes in contexts]


def send(
    paths: list[Path], destination: PeerAddress, calling_ae_title: str = "PNEUMO-SEND",
    group: bool = False, timeout_s: float = 60, ssl_context: ssl.SSLContext | None = None,
) -> Iterator[SendResult]:
    """Send everything over one association (re-opened if the peer drops it); TLS with a context.

    A file that cannot be read is yielded with its `error` and the others are still sent; an
    association that cannot be made raises AssociationFailed saying why.
    """
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = timeout_s
    headers, errors = check(paths)
    for sop_class, syntaxes in requested_contexts(paths, headers):
        ae.add_requested_context(sop_class, syntaxes)
    assoc = None
    try:
        for path, dataset in datasets(paths, group, errors):
            if isinstance(dataset, str):
                yield SendResult(path, "", "", None, error=dataset)
                continue
            if assoc is None or not assoc.is_established:
                assoc = associate(ae, destination, timeout_s, ssl_context)
            response = assoc.send_c_store(dataset)
            yield SendResult(path, str(dataset.SOPInstanceUID), str(dataset.StudyInstanceUID),
                             getattr(response, "Status", None))
    finally:
        if assoc is not None and assoc.is_established:
            assoc.release()


__all__ = ["AssociationFailed", "SendResult", "collect", "send", "wrap_image"]
