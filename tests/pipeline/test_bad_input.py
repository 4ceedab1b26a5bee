"""Bad input, kind by kind: what the sender sees, what is recorded, and that nothing else suffers.

The node runs in-process (`scp.start`) and the worker's `classify_instance` is called directly, so
each kind is one real association plus one real classification. A good chest image goes before
and after the bad one on the same association and must be stored and classified as usual. Every
dataset carries the patient name "Doe^Secret" and ID "PID-SECRET-123": no log line and no
recorded reason may ever contain them.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import subprocess
import tempfile
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    HTJ2KLossless,
    generate_uid,
)
from pynetdicom import AE, _config
from pynetdicom.association import Association
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import BasicTextSRStorage, Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core import phi
from core.db import AuditEvent, Delivery, Instance, InstanceState, RefusedStore, Study, session_factory
from core.migrate import upgrade
from core.settings import Settings
from dicom_node import receive, scp
from dicom_node.receive import (
    CANNOT_UNDERSTAND,
    CONFLICTING_DUPLICATE,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    SUCCESS,
)
from ops.send import wrap_image
from serving.decode import grayscale_pixels
from serving.image import preprocess
from tests.conftest import DATA, REAL_DICOM
from tests.helpers import dcmtk, free_port, wait_for
from worker import classify, housekeeping
from worker import delivery as sr_delivery
from worker.inference import Classifier

PATIENT_NAME, PATIENT_ID = "Doe^Secret", "PID-SECRET-123"
PHI_MARK = "secret"  # in both, whatever the case or the separator a log might use
IMAGES = sorted((DATA / "test" / "NORMAL").iterdir())[:2]
A_ABORT_PDU = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 0, 0])  # A-ABORT, source: service user


# --- fixtures and helpers ----------------------------------------------------------------------

@pytest.fixture
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """SQLite unless a test asks for PostgreSQL: most bad input is about the node, not the back-end."""
    backend = getattr(request, "param", "sqlite")
    url = (f"sqlite:///{tmp_path / 'pneumo.db'}" if backend == "sqlite"
           else request.getfixturevalue("database_url_postgres_fresh"))
    upgrade(url)
    return url


BOTH_DATABASES = pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)


@pytest.fixture(autouse=True)
def no_patient_data_in_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Every test: node and worker at DEBUG, the libraries at INFO (the production level)."""
    caplog.set_level(logging.INFO)
    for name in ("dicom_node", "worker", "core"):
        caplog.set_level(logging.DEBUG, logger=name)
    yield
    records = [*caplog.get_records("setup"), *caplog.get_records("call"), *caplog.records]
    lines = [logging.Formatter().format(record) for record in records]  # tracebacks included
    assert records and not [line for line in lines if PHI_MARK in line.lower()]


@pytest.fixture(scope="module")
def classifier(tiny_registry: Path) -> Callable[[], Classifier]:
    model = Classifier("pneumonia-transfer", tiny_registry)
    model.predict(preprocess(grayscale_pixels(chest())))  # warm: no first-call tracing in a test
    return lambda: model


@dataclass
class Node:
    settings: Settings
    sessions: sessionmaker[Session]
    queued: list[int]
    server: ThreadedAssociationServer


def start_node(home: Path, sessions: sessionmaker[Session], **settings: object) -> Node:
    options = {"allowed_peers": "SENDER,OTHER@10.9.9.9", "min_free_disk_mb": 0, "network_timeout_s": 10}
    options.update(settings)
    config = Settings(home=home, port=free_port(), host="127.0.0.1", **options)
    queued: list[int] = []
    return Node(config, sessions, queued, scp.start(config, sessions, queued.append))


@pytest.fixture
def node(tmp_path: Path, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    # Lets a test send a file byte for byte as it is (pynetdicom then does not parse it first).
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    running = start_node(tmp_path / "home", sessions)
    yield running
    running.server.shutdown()
    with sessions() as session:
        recorded = session.scalars(select(Instance.reason)).all()
        recorded += session.scalars(select(AuditEvent.detail)).all()
    assert not [text for text in recorded if text and PHI_MARK in text.lower()]


def chest(image: Path = IMAGES[0]) -> Dataset:
    """A good frontal chest DX: stored and classified."""
    dataset = wrap_image(image)
    dataset.PatientName, dataset.PatientID = PATIENT_NAME, PATIENT_ID
    return dataset


def set_class(dataset: Dataset, sop_class: str) -> Dataset:
    dataset.SOPClassUID = dataset.file_meta.MediaStorageSOPClassUID = sop_class
    return dataset


def encoded(dataset: Dataset) -> bytes:
    """The data set as it goes on the wire: explicit VR little endian, no file meta."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, dataset)
    return buffer.getvalue()


def part10(folder: Path, body: bytes, sop_class: str, sop_uid: str | None = None,
           syntax: str = ExplicitVRLittleEndian) -> Path:
    """A file whose data set is `body`, sent as it is: pynetdicom takes the request's UIDs from
    the file meta and streams the bytes after it unparsed."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid or generate_uid()
    meta.TransferSyntaxUID = syntax
    path = folder / f"{meta.MediaStorageSOPInstanceUID}.dcm"
    with open(path, "wb") as handle:
        handle.write(b"\0" * 128 + b"DICM")
        write_file_meta_info(handle, meta)
        handle.write(body)
    return path


def associate(node: Node, calling: str = "SENDER", contexts: list[tuple[str, list[str]]] = ()) -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for sop_class, syntaxes in contexts:
        ae.add_requested_context(sop_class, syntaxes)
    ae.add_requested_context(Verification)
    return ae.associate("127.0.0.1", node.settings.port, ae_title=node.settings.ae_title)


def context_of(item: Dataset | Path) -> tuple[str, str]:
    if isinstance(item, Path):
        meta, _ = split_dataset(item)
        return str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)
    return str(item.SOPClassUID), str(item.file_meta.TransferSyntaxUID)


def send_all(node: Node, items: list[Dataset | Path], calling: str = "SENDER") -> list[int | None]:
    """Everything over one association; the status of each (None: no response came back)."""
    # One context per (class, syntax): an acceptor picks one syntax per context.
    contexts = sorted({context_of(item) for item in items})
    assoc = associate(node, calling, [(sop_class, [syntax]) for sop_class, syntax in contexts])
    assert assoc.is_established
    statuses = [assoc.send_c_store(item).get("Status") for item in items]
    assoc.release()
    return statuses


def echo(node: Node) -> int | None:
    assoc = associate(node)
    status = assoc.send_c_echo().get("Status") if assoc.is_established else None
    assoc.release()
    return status


def instances(node: Node) -> dict[str, Instance]:
    with node.sessions() as session:
        return {i.sop_instance_uid: i for i in session.scalars(select(Instance))}


def classify_queued(node: Node, classifier: Callable[[], Classifier]) -> dict[str, str]:
    """Run the worker on every queued instance; {SOP Instance UID: terminal state}."""
    by_id = {i.id: uid for uid, i in instances(node).items()}
    return {by_id[i]: classify.classify_instance(node.sessions, i, classifier) for i in node.queued}


def stored_files(node: Node) -> list[Path]:
    return sorted(node.settings.storage_dir.rglob("*.dcm"))


def spool_files(node: Node) -> list[Path]:
    return sorted(node.settings.spool_dir.glob("*.dcm"))


def logged(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in record.getMessage() for record in caplog.records)


def assert_goods_classified(states: dict[str, str], goods: list[Dataset]) -> None:
    for good in goods:
        assert states[good.SOPInstanceUID] == InstanceState.CLASSIFIED


# --- kinds the node stores and the worker judges ------------------------------------------------

def no_pixel_data() -> Dataset:
    dataset = chest()
    del dataset.PixelData
    return dataset


def ct_image() -> Dataset:
    dataset = set_class(chest(), CTImageStorage)
    dataset.Modality = "CT"
    return dataset


def multi_frame() -> Dataset:
    dataset = chest()
    dataset.NumberOfFrames = 3
    dataset.PixelData = dataset.PixelData * 3
    return dataset


def rgb() -> Dataset:
    dataset = chest()
    pixels = np.frombuffer(dataset.PixelData, np.uint8).reshape(dataset.Rows, dataset.Columns)
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation, dataset.PlanarConfiguration = 3, "RGB", 0
    dataset.PixelData = np.repeat(pixels[..., None], 3, axis=2).tobytes()
    return dataset


def one_pixel() -> Dataset:
    dataset = chest()
    dataset.Rows = dataset.Columns = 1
    dataset.PixelData = b"\x80\x00"
    return dataset


def declared_huge() -> Dataset:
    """20000 x 20000 declared, 1 KB sent: decoding would try to allocate 400M pixels."""
    dataset = chest()
    dataset.Rows = dataset.Columns = 20000
    dataset.PixelData = bytes(1024)
    return dataset


def corrupt_j2k() -> Dataset:
    dataset = dcmread(REAL_DICOM / "canon_dx_j2k_corrupt.dcm")
    dataset.PatientName, dataset.PatientID = PATIENT_NAME, PATIENT_ID
    return dataset


def codestream_claiming(name: str, marker: bytes, offset: int, fmt: str, side: int) -> Dataset:
    """A real compressed file whose codestream header claims `side` x `side` pixels (the DICOM
    header keeps its own size): a decompression bomb, 9 GiB (JPEG 2000) or 14 GiB (JPEG) to fail."""
    dataset = dcmread(REAL_DICOM / name)
    frame = bytearray(next(generate_frames(dataset.PixelData, number_of_frames=1)))
    struct.pack_into(fmt, frame, frame.find(marker) + offset, side, side)
    dataset.PixelData = encapsulate([bytes(frame)])
    dataset.PatientName, dataset.PatientID = PATIENT_NAME, PATIENT_ID
    return dataset


def j2k_bomb() -> Dataset:  # SIZ: Xsiz, Ysiz
    return codestream_claiming("nema_rg1_cr_chest_j2k_lossy.dcm", b"\xff\x51", 6, ">II", 40000)


def jpeg_bomb() -> Dataset:  # SOF0: height, width
    return codestream_claiming("konica_cr_mono1_jpeg.dcm", b"\xff\xc0", 5, ">HH", 60000)


def rows_not_a_number() -> Dataset:
    """Rows written as text with a text VR (explicit VR lets a buggy writer do that)."""
    dataset = chest()
    dataset[0x00280010] = DataElement(0x00280010, "LO", "abc")
    return dataset


def bits_allocated_7() -> Dataset:
    dataset = chest()
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit = 7, 7, 6
    return dataset


def bits_stored_over_allocated() -> Dataset:
    dataset = chest()
    dataset.BitsStored, dataset.HighBit = 12, 11  # BitsAllocated stays 8
    return dataset


def rescale_slope_not_a_number() -> Dataset:
    dataset = chest()
    dataset[0x00281053] = DataElement(0x00281053, "LO", "abc")  # RescaleSlope
    dataset.RescaleIntercept, dataset.RescaleType = "0", "US"
    return dataset


def voi_lut_shorter_than_described() -> Dataset:
    """A VOI LUT whose descriptor promises 256 entries and whose data holds 3."""
    dataset = chest()
    item = Dataset()
    item.LUTDescriptor, item.LUTData = [256, 0, 16], struct.pack("<3H", 1, 2, 3)
    dataset.VOILUTSequence = [item]
    return dataset


def structured_report() -> Dataset:
    dataset = set_class(chest(), BasicTextSRStorage)
    dataset.Modality = "SR"
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"):
        delattr(dataset, keyword)
    return dataset


def lateral() -> Dataset:
    dataset = chest()
    dataset.ViewPosition = "LL"
    return dataset


def skull() -> Dataset:
    dataset = chest()
    dataset.BodyPartExamined = "SKULL"
    return dataset


def pixel_data_short() -> Dataset:
    """Rows x Columns say 50176 bytes, the element holds 1000 (its own length is consistent)."""
    dataset = chest()
    dataset.PixelData = dataset.PixelData[:1000]
    return dataset


# (build, state, reason, decoded): `decoded` False means refused on the header alone.
STORED_THEN_JUDGED = {
    "no pixel data": (no_pixel_data, InstanceState.FAILED, "no pixel data", False),
    "CT image": (ct_image, InstanceState.IGNORED,
                 "not a radiograph: SOP class CT Image Storage (Modality CT)", False),
    "multi-frame": (multi_frame, InstanceState.IGNORED,
                    "not a single image: multi-frame image (3 frames)", False),
    "RGB": (rgb, InstanceState.IGNORED, "not a grayscale image: RGB, SamplesPerPixel 3", False),
    "1x1 pixels": (one_pixel, InstanceState.FAILED, "image too small: 1x1 pixels (minimum 32x32)", False),
    "20000x20000 declared": (declared_huge, InstanceState.FAILED,
                             "image too large: declared 20000x20000 pixels exceeds the limit of "
                             "67108864 pixels (8192x8192)", False),
    "corrupt JPEG 2000": (corrupt_j2k, InstanceState.FAILED,
                          "pixel data could not be decoded (JPEG 2000 Image Compression (Lossless Only))",
                          True),
    "JPEG 2000 codestream larger than the header": (
        j2k_bomb, InstanceState.FAILED, "compressed image does not match the header: its codestream "
        "declares 40000x40000 pixels, the header 1841x1955", False),
    "JPEG codestream larger than the header": (
        jpeg_bomb, InstanceState.FAILED, "compressed image does not match the header: its codestream "
        "declares 60000x60000 pixels, the header 2010x2446", False),
    "Rows not a number": (rows_not_a_number, InstanceState.FAILED,
                          "invalid image header: Rows is missing or not a number", False),
    "BitsAllocated 7": (bits_allocated_7, InstanceState.FAILED,
                        "invalid image header: BitsAllocated 7 (expected 8, 16 or 32)", False),
    "BitsStored > BitsAllocated": (bits_stored_over_allocated, InstanceState.FAILED,
                                   "invalid image header: BitsStored 12 with BitsAllocated 8", False),
    "RescaleSlope not a number": (rescale_slope_not_a_number, InstanceState.FAILED,
                                  "invalid image header: RescaleSlope is not a number", False),
    "VOI LUT shorter than described": (voi_lut_shorter_than_described, InstanceState.FAILED,
                                       "modality or VOI LUT could not be applied: ", True),
    "SR sent to us": (structured_report, InstanceState.IGNORED,
                      "not a radiograph: SOP class Basic Text SR Storage (Modality SR)", False),
    "lateral view": (lateral, InstanceState.IGNORED,
                     "not a frontal view: lateral view (ViewPosition LL)", False),
    "not a chest": (skull, InstanceState.IGNORED, "not a chest image: body part SKULL", False),
    "pixel data shorter than declared": (pixel_data_short, InstanceState.FAILED,
                                         "pixel data could not be decoded (Explicit VR Little Endian): "
                                         "The number of bytes of pixel data is less than expected "
                                         "(1000 vs", True),
}


@pytest.mark.parametrize("kind", list(STORED_THEN_JUDGED))
def test_stored_then_ignored_or_failed_with_reason(
    kind: str, node: Node, classifier, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stored (the node does not judge images), then a terminal state with a readable reason.

    Header problems are refused before any pixel data is decoded: the decoder is watched.
    """
    build, state, reason, decoded = STORED_THEN_JUDGED[kind]
    decode_calls: list[str] = []

    def watched(dataset: Dataset) -> np.ndarray:
        decode_calls.append(str(dataset.SOPInstanceUID))
        return decode(dataset)

    decode = classify.grayscale_pixels
    monkeypatch.setattr(classify, "grayscale_pixels", watched)
    before, bad, after = chest(IMAGES[0]), build(), chest(IMAGES[1])

    assert send_all(node, [before, bad, after]) == [SUCCESS, SUCCESS, SUCCESS]
    states = classify_queued(node, classifier)

    instance = instances(node)[bad.SOPInstanceUID]
    assert (states[bad.SOPInstanceUID], instance.state) == (state, state)
    assert instance.reason.startswith(reason)
    assert (bad.SOPInstanceUID in decode_calls) == decoded
    assert_goods_classified(states, [before, after])
    assert not spool_files(node)


# --- kinds the node refuses: nothing stored, the reason in the C-STORE log line -----------------

def not_dicom(folder: Path) -> Path:
    return part10(folder, b"%PDF-1.4 this is a scanned letter, not DICOM\n" * 60, chest().SOPClassUID)


def truncated_in_pixel_data(folder: Path) -> Path:
    dataset = chest()
    return part10(folder, encoded(dataset)[:-1000], dataset.SOPClassUID, dataset.SOPInstanceUID)


def truncated_in_header(folder: Path) -> Path:
    """Cut 5 bytes into the Study Instance UID's value."""
    dataset = chest()
    body = encoded(dataset)
    cut = body.index(dataset.StudyInstanceUID.encode()) + 5
    return part10(folder, body[:cut], dataset.SOPClassUID, dataset.SOPInstanceUID)


def empty_dataset(folder: Path) -> Path:
    return part10(folder, b"", chest().SOPClassUID)


def without(keyword: str) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        dataset = chest()
        uid = dataset.SOPInstanceUID
        delattr(dataset, keyword)
        return part10(folder, encoded(dataset), dataset.SOPClassUID, uid)
    return build


def letters_in_study_uid(folder: Path) -> Path:
    dataset = chest()
    dataset.StudyInstanceUID = "1.2.840.10008.abc"
    return part10(folder, encoded(dataset), dataset.SOPClassUID, dataset.SOPInstanceUID)


def with_uid(keyword: str, uid: str) -> Callable[[Path], Path]:
    """The data set's `keyword` set to `uid`; for the SOP Instance UID the request's too."""
    def build(folder: Path) -> Path:
        dataset = chest()
        setattr(dataset, keyword, uid)
        return part10(folder, encoded(dataset), dataset.SOPClassUID, dataset.SOPInstanceUID)
    return build


def class_differs_from_context(folder: Path) -> Path:
    """Negotiated and requested as DX; the data set inside says CT."""
    dataset = set_class(chest(), CTImageStorage)
    return part10(folder, encoded(dataset), chest().SOPClassUID, dataset.SOPInstanceUID)


def deflate_bomb(folder: Path) -> Path:
    """Deflated (the node accepts that syntax): a chest image, then 600 MiB of zeros in a private
    element; 0.6 MB on the wire. pydicom inflates a deflated data set whole to read its header."""
    dataset = chest()
    size = 600 << 20
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    parts = [compressor.compress(encoded(dataset)),
             compressor.compress(struct.pack("<HH2sHI", 0x7FE1, 0x1010, b"OB", 0, size))]
    zeros = bytes(1 << 20)
    parts += [compressor.compress(zeros) for _ in range(size >> 20)]
    parts.append(compressor.flush())
    return part10(folder, b"".join(parts), dataset.SOPClassUID, dataset.SOPInstanceUID,
                  DeflatedExplicitVRLittleEndian)


INVALID_UID = "not a valid UID (digits and dots, no leading zero in a component, at most 64 characters)"
REFUSED = {
    "not DICOM": (not_dicom, CANNOT_UNDERSTAND, "not a DICOM dataset: no SOP Class, SOP Instance"),
    "truncated in pixel data": (truncated_in_pixel_data, CANNOT_UNDERSTAND,
                                "dataset truncated: element (7FE0,0010) declares"),
    "truncated in header": (truncated_in_header, CANNOT_UNDERSTAND,
                            "dataset truncated: element (0020,000D) declares"),
    "empty dataset": (empty_dataset, CANNOT_UNDERSTAND, "empty dataset: no data elements"),
    "no StudyInstanceUID": (without("StudyInstanceUID"), CANNOT_UNDERSTAND, "missing StudyInstanceUID"),
    "no SeriesInstanceUID": (without("SeriesInstanceUID"), CANNOT_UNDERSTAND, "missing SeriesInstanceUID"),
    "no SOPInstanceUID": (without("SOPInstanceUID"), CANNOT_UNDERSTAND, "missing SOPInstanceUID"),
    "letters in a UID": (letters_in_study_uid, CANNOT_UNDERSTAND, f"invalid StudyInstanceUID: {INVALID_UID}"),
    # Seen in a real run: stored, then copied into an SR that dcmtk's dsrdump rejects.
    "leading zero in a SOP Instance UID component": (
        with_uid("SOPInstanceUID", "999.999.01.23.45.6789"), CANNOT_UNDERSTAND,
        f"invalid SOPInstanceUID: {INVALID_UID}"),
    "Series Instance UID of 65 characters": (
        with_uid("SeriesInstanceUID", "1.2." + "3" * 61), CANNOT_UNDERSTAND,
        f"invalid SeriesInstanceUID: {INVALID_UID}"),
    "empty component in a Study Instance UID": (
        with_uid("StudyInstanceUID", "1.2..840.5"), CANNOT_UNDERSTAND,
        f"invalid StudyInstanceUID: {INVALID_UID}"),
    "space in a Study Instance UID": (
        with_uid("StudyInstanceUID", "1.2.840 .5"), CANNOT_UNDERSTAND,
        f"invalid StudyInstanceUID: {INVALID_UID}"),
    "deflated data set inflating past the limit": (deflate_bomb, CANNOT_UNDERSTAND,
                                                   "deflated data set too large: inflates past 512 MiB"),
    "SOP class differs from the context": (class_differs_from_context, DATASET_DOES_NOT_MATCH_SOP_CLASS,
                                           "dataset does not match the C-STORE request: SOP Class UID "
                                           f"{CTImageStorage}"),
}


@pytest.mark.parametrize("kind", list(REFUSED))
def test_refused_at_the_node_and_nothing_stored(
    kind: str, node: Node, classifier, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """0xC210 for what cannot be read as one whole dataset with valid UIDs, 0xA900 when it
    contradicts its own C-STORE request; the association carries on with the next image."""
    build, status, reason = REFUSED[kind]
    before, bad, after = chest(IMAGES[0]), build(tmp_path), chest(IMAGES[1])

    assert send_all(node, [before, bad, after]) == [SUCCESS, status, SUCCESS]
    assert logged(caplog, f"0x{status:04X} {reason}")
    with node.sessions() as session:  # for the dashboard and /metrics
        refused = session.execute(select(RefusedStore.status, RefusedStore.reason)).one()
    assert refused.status == status and refused.reason.startswith(reason)
    assert set(instances(node)) == {before.SOPInstanceUID, after.SOPInstanceUID}
    assert len(stored_files(node)) == 2 and not spool_files(node)
    assert_goods_classified(classify_queued(node, classifier), [before, after])


# --- kinds the SR must survive: header values copied into it ----------------------------------

# (attribute, value, dropped): every value carries "secret" (no log line may show it). `dropped`:
# not valid for its VR, so left out of the SR (kept empty) and audited; else copied as it is.
# The valid names are single-component ones: highdicom warns, quoting them.
SR_HEADER_KINDS = {
    "birth date 01/02/1970": ("PatientBirthDate", "01/02/1970 secret", True),
    "birth date, a 56-character hash (966_fixed)": (
        "PatientBirthDate", "secret" + "26eae465a3069d7d94e44c519d9c7aae430455e0ae7ac52d7d76", True),
    "birth date 1970-01-02": ("PatientBirthDate", "secret1970-01-02", True),
    "single-component patient name": ("PatientName", "SECRETONE", False),
    "patient name component over 64 characters": ("PatientName", "Secret" * 11 + "^Doe", True),
    "patient ID over 64 characters": ("PatientID", "PID-SECRET-" * 6, True),
    "accession number over 16 characters": ("AccessionNumber", "ACC-SECRET-12345678", True),
    "single-component referring physician": ("ReferringPhysicianName", "DRSECRET", False),
    "study date with dashes": ("StudyDate", "2024-01-02", True),
    "study time 25 o'clock": ("StudyTime", "256100", True),
    "patient sex in lower case": ("PatientSex", "secret", True),
}


@pytest.mark.parametrize("kind", list(SR_HEADER_KINDS))
def test_sr_built_whatever_the_header_values(
    kind: str, node: Node, classifier, caplog: pytest.LogCaptureFixture
) -> None:
    """Stored and classified as usual; the SR is built and valid DICOM (dcmtk's dsrdump reads
    it), with the invalid value left out and the attribute named in the audit, never the value.
    A birth date of '01/02/1970' or a hash made highdicom raise "Unable to convert ... to 'DA'"
    and the delivery stayed pending forever; highdicom's person-name warning and pydicom's
    invalid-value warnings quoted the values into the worker's log."""
    phi.install()  # as every worker and node process does at start
    keyword, value, dropped = SR_HEADER_KINDS[kind]
    before, bad, after = chest(IMAGES[0]), chest(), chest(IMAGES[1])
    setattr(bad, keyword, value)
    assert send_all(node, [before, bad, after]) == [SUCCESS, SUCCESS, SUCCESS]
    assert_goods_classified(classify_queued(node, classifier), [before, bad, after])

    node.settings.quiet_seconds = 0
    deliveries: list[int] = []
    housekeeping.finalise_stable_studies(node.sessions, node.settings, deliveries.append)
    assert len(deliveries) == 3
    for delivery_id in deliveries:
        outcome = sr_delivery.attempt_delivery(node.sessions, delivery_id, node.settings, None)
        assert outcome.state == "stored locally"
    with node.sessions() as session:
        delivery = session.scalar(select(Delivery).join(Study).where(
            Study.study_instance_uid == bad.StudyInstanceUID))
        events = session.execute(select(AuditEvent.event, AuditEvent.detail).where(
            AuditEvent.entity == "delivery", AuditEvent.entity_id == delivery.id)).all()
    report = dcmread(delivery.sr_path)
    dump = subprocess.run([dcmtk("dsrdump"), delivery.sr_path], capture_output=True, text=True)
    assert dump.returncode == 0 and not dump.stderr, dump.stderr
    audited = [detail for event, detail in events if event == "sr_values_dropped"]
    if dropped:
        assert not report.get(keyword)
        assert audited == [f"not valid for their VR, left out of the SR: {keyword} (1 image(s))"]
    else:
        assert str(report.get(keyword)) == value and not audited
    lines = [logging.Formatter().format(record) for record in caplog.records]
    assert not [line for line in lines if value.lower() in line.lower()]


# --- association level ----------------------------------------------------------------------------

def test_transfer_syntax_not_accepted(node: Node, classifier, caplog: pytest.LogCaptureFixture) -> None:
    """HTJ2K is not decoded here, so its context is rejected (result 4): the sender has no context
    to send on and must transcode; one proposing only that context aborts the association."""
    dataset = chest()
    dataset.file_meta.TransferSyntaxUID = HTJ2KLossless
    assoc = associate(node, contexts=[(dataset.SOPClassUID, [HTJ2KLossless])])
    assert assoc.is_established
    assert [c.abstract_syntax for c in assoc.accepted_contexts] == [Verification]
    assert [(c.abstract_syntax, c.result) for c in assoc.rejected_contexts] == [
        (dataset.SOPClassUID, 0x04)]  # transfer syntaxes not supported
    with pytest.raises(ValueError, match="No presentation context"):
        assoc.send_c_store(dataset)
    assoc.release()

    ae = AE(ae_title="SENDER")
    ae.add_requested_context(dataset.SOPClassUID, [HTJ2KLossless])
    only = ae.associate("127.0.0.1", node.settings.port, ae_title=node.settings.ae_title)
    assert not only.is_established and only.is_aborted  # no accepted context: the sender aborts
    assert logged(caplog, f"presentation context refused for SENDER: {dataset.SOPClassUID}")

    assert not instances(node) and not stored_files(node) and not spool_files(node)
    good = chest()
    assert send_all(node, [good]) == [SUCCESS]
    assert_goods_classified(classify_queued(node, classifier), [good])


@pytest.mark.parametrize("calling", ["STRANGER", "OTHER"])  # OTHER is allowed only from 10.9.9.9
def test_peer_not_in_the_allow_list_is_rejected(
    calling: str, node: Node, classifier, caplog: pytest.LogCaptureFixture
) -> None:
    """A-ASSOCIATE-RJ: rejected permanent, by the service user, calling AE title not recognised."""
    assoc = associate(node, calling=calling, contexts=[(chest().SOPClassUID, [ExplicitVRLittleEndian])])
    assert assoc.is_rejected
    answer = assoc.acceptor.primitive
    assert (answer.result, answer.result_source, answer.diagnostic) == (0x01, 0x01, 0x03)
    assert logged(caplog, f"association rejected: calling AE '{calling}' from 127.0.0.1 is not in the "
                          "allow-list")
    assert not instances(node)
    good = chest()
    assert send_all(node, [good]) == [SUCCESS]
    assert_goods_classified(classify_queued(node, classifier), [good])


@BOTH_DATABASES
def test_same_sop_instance_uid_with_different_content(
    node: Node, classifier, caplog: pytest.LogCaptureFixture
) -> None:
    """Decision: the first copy is kept and classified once; a different copy under the same SOP
    Instance UID is refused with 0xC211 (failure, "cannot understand" family) and the Error
    Comment "SOP Instance UID already stored with other content", recorded as a refusal and
    audited as `conflicting_duplicate`. An identical re-send stays a plain success.

    Why a failure: the sender's operator must see that this copy was not kept (a corrected image
    under the old UID, two devices issuing one UID). It answered the warning 0xB006 before, which
    PS3.4 defines as "elements discarded", and dcmtk shows it as exactly that. A retry gets the same
    answer; the fix is at the sender (new content, new SOP Instance UID).
    """
    first = chest(IMAGES[0])
    second = chest(IMAGES[1])
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(second, keyword, first.get(keyword))
    second.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID

    assoc = associate(node, contexts=[context_of(first)])
    answers = [assoc.send_c_store(item) for item in (first, first, second)]
    assoc.release()
    assert [a.Status for a in answers] == [SUCCESS, SUCCESS, CONFLICTING_DUPLICATE]
    assert answers[2].ErrorComment == "SOP Instance UID already stored with other content"
    assert logged(caplog, "0xC211 conflicting duplicate: SOP Instance UID already stored with other content")
    (instance,) = instances(node).values()
    assert dcmread(instance.path).PixelData == first.PixelData
    with node.sessions() as session:
        events = session.execute(select(AuditEvent.event, AuditEvent.detail)
                                 .where(AuditEvent.entity_id == instance.id).order_by(AuditEvent.id)).all()
        refused = session.execute(select(RefusedStore.status, RefusedStore.reason)).one()
    assert [e for e, _ in events] == ["received", "duplicate_received", "conflicting_duplicate"]
    assert "refused, the first copy kept" in events[-1].detail
    assert refused.status == CONFLICTING_DUPLICATE
    assert refused.reason.startswith(
        "conflicting duplicate: SOP Instance UID already stored with other content")
    assert len(node.queued) == 1
    assert classify_queued(node, classifier) == {first.SOPInstanceUID: InstanceState.CLASSIFIED}


# --- size, interruption, disk, database ----------------------------------------------------------

def test_huge_private_element_is_stored_with_bounded_memory(
    node: Node, classifier, tmp_path: Path
) -> None:
    """A 50 MB OB private element: the node streams it to the spool and never loads it (pynetdicom
    chunked receive, headers read with large values deferred), stays responsive meanwhile, and
    the worker classifies the image without loading it either."""
    dataset = chest()
    block = dataset.private_block(0x0009, "PNEUMO TEST", create=True)
    block.add_new(0x10, "OB", bytes(50 * 1024 * 1024))
    path = tmp_path / "huge.dcm"
    dataset.save_as(path, enforce_file_format=True)
    sop_uid = str(dataset.SOPInstanceUID)
    del dataset, block

    tracemalloc.start()
    try:
        sender = subprocess.Popen(  # dcmtk: the sender's copy is not in this process's memory
            [dcmtk("storescu"), "-aet", "SENDER", "-aec", "PNEUMO", "127.0.0.1", str(node.settings.port),
             str(path)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        wait_for(lambda: any(p.stat().st_size > 5 << 20 for p in spool_files(node)), 60,
                 "the transfer to be under way", interval_s=0.01)
        assert echo(node) == SUCCESS  # answered while the big transfer is in flight
        output, _ = sender.communicate(timeout=120)
        node_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        states = classify_queued(node, classifier)
        worker_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sender.returncode == 0, output
    assert node_peak < 16 << 20, f"node peak {node_peak >> 20} MB"
    assert worker_peak < 16 << 20, f"worker peak {worker_peak >> 20} MB"
    assert states == {sop_uid: InstanceState.CLASSIFIED}
    assert instances(node)[sop_uid].size_bytes > 50 << 20


@pytest.mark.parametrize("how", ["A-ABORT", "connection dropped"])
def test_transfer_interrupted_halfway(
    how: str, node: Node, classifier, caplog: pytest.LogCaptureFixture
) -> None:
    """The sender stops after 1 MB of a 4 MB image: no status, no row; the partial spool file is
    left for `clean_spool` (the janitor), which removes it."""
    dataset = chest()
    dataset.Rows = dataset.Columns = 2048
    dataset.PixelData = bytes(2048 * 2048)
    assoc = associate(node, contexts=[(dataset.SOPClassUID, [ExplicitVRLittleEndian])])
    transport = assoc.dul.socket
    send_whole = transport.send
    sent, paused, resume = [0], threading.Event(), threading.Event()

    def send_first_megabyte(data: bytes) -> None:
        if sent[0] > 1 << 20:
            paused.set()
            resume.wait(30)
            return  # nothing more goes out
        sent[0] += len(data)
        send_whole(data)

    transport.send = send_first_megabyte
    answer: dict[str, Dataset] = {}
    sender = threading.Thread(target=lambda: answer.update(rsp=assoc.send_c_store(dataset)))
    sender.start()
    assert paused.wait(30)
    raw = transport.socket
    if how == "A-ABORT":
        raw.sendall(A_ABORT_PDU)  # at a PDU boundary: the sender thread is held in send()
    raw.shutdown(socket.SHUT_RDWR)  # "connection dropped": no A-ABORT, the TCP connection just ends
    resume.set()
    sender.join(30)

    assert "Status" not in answer["rsp"]  # the sender got no answer: it will send again
    wait_for(lambda: not node.server.active_associations, 30, "the node to drop the association")
    (partial,) = spool_files(node)
    assert 512 << 10 < partial.stat().st_size < 4 << 20
    assert not instances(node) and not stored_files(node)
    assert scp.clean_spool(node.settings.spool_dir, older_than_s=0) == [partial]
    assert logged(caplog, "removed 1 spool file(s) of interrupted transfers")
    assert not spool_files(node)
    good = chest()
    assert send_all(node, [good]) == [SUCCESS]
    assert_goods_classified(classify_queued(node, classifier), [good])


@pytest.fixture
def small_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A 2 MB tmpfs for the node's home where mounting is allowed (root); elsewhere the spool file
    raises ENOSPC once 2 MB are written. Returns which one this run used."""
    folder = tmp_path / "small"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    if not mounted:
        real = tempfile.NamedTemporaryFile

        def two_megabytes(*args: object, **kwargs: object):
            handle = real(*args, **kwargs)
            write, written = handle.write, [0]

            def limited(data: bytes) -> int:
                written[0] += len(data)
                if written[0] > 2 << 20:
                    raise OSError(errno.ENOSPC, "No space left on device")
                return write(data)

            handle.write = limited
            return handle

        monkeypatch.setattr(tempfile, "NamedTemporaryFile", two_megabytes)
    yield "tmpfs" if mounted else "injected ENOSPC"
    if mounted:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_disk_full_during_receive(
    small_disk: str, tmp_path: Path, sessions, classifier, caplog: pytest.LogCaptureFixture
) -> None:
    """Disk full while the data set streams in: 0xA700 (retry later), the spool file emptied at
    once, nothing stored, and the next image is stored on the same association.

    Real disk full where the test may mount a 2 MB tmpfs as the node's home (root), else an
    injected ENOSPC from the spool file's write. The `min_free_disk_mb` floor is checked too.
    """
    node = start_node(tmp_path / "small", sessions)  # the database stays off the small disk
    try:
        big = chest()
        big.Rows = big.Columns = 2048
        big.PixelData = bytes(2048 * 2048)
        before, after = chest(IMAGES[0]), chest(IMAGES[1])
        assert send_all(node, [before, big, after]) == [SUCCESS, OUT_OF_RESOURCES, SUCCESS], small_disk
        assert logged(caplog, "0xA700 cannot write spool file: No space left on device")
        assert set(instances(node)) == {before.SOPInstanceUID, after.SOPInstanceUID}
        assert len(stored_files(node)) == 2 and not spool_files(node)

        node.settings.min_free_disk_mb = 10**9  # below the floor: refused, the spool copy deleted
        floored = chest()
        assert send_all(node, [floored]) == [OUT_OF_RESOURCES]
        assert logged(caplog, "0xA700 free disk below")
        assert floored.SOPInstanceUID not in instances(node) and not spool_files(node)
    finally:
        node.server.shutdown()
    assert_goods_classified(classify_queued(node, classifier), [before, after])


def test_database_unreachable(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """PostgreSQL on a closed port: 0xA700 so the sender retries, nothing left on disk (storage or
    spool), and the node still answers C-ECHO."""
    broken = session_factory(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none")
    node = start_node(tmp_path / "home", broken)
    try:
        assert send_all(node, [chest(), chest(IMAGES[1])]) == [OUT_OF_RESOURCES, OUT_OF_RESOURCES]
        assert echo(node) == SUCCESS
    finally:
        node.server.shutdown()
    assert logged(caplog, "0xA700 database unavailable: OperationalError")
    assert not stored_files(node) and not spool_files(node) and not node.queued


@BOTH_DATABASES
def test_database_lost_while_recording(
    node: Node, classifier, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The connection drops after the file was renamed into storage: the file is removed again,
    0xA700 answered; once the database is back the same image is stored."""
    record = receive._record

    def connection_lost(*args: object, **kwargs: object) -> int:
        raise OperationalError("INSERT INTO instances", {}, ConnectionError("server closed the connection"))

    dataset = chest()
    monkeypatch.setattr(receive, "_record", connection_lost)
    assert send_all(node, [dataset]) == [OUT_OF_RESOURCES]
    assert logged(caplog, "0xA700 database unavailable: OperationalError")
    assert not instances(node) and not stored_files(node) and not spool_files(node)

    monkeypatch.setattr(receive, "_record", record)
    assert send_all(node, [dataset]) == [SUCCESS]
    assert_goods_classified(classify_queued(node, classifier), [dataset])
