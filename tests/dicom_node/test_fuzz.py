"""Fuzzing the node's own parsing of untrusted bytes with hypothesis (issue 23, "every loop an
end"): the deflate loop, the encapsulated-fragment walk, and data sets of nested sequences, whole
and mutated, through `store_instance`.

Each property must hold for every input: the call ends (pytest-timeout bounds a hang), raises
nothing but the errors the node maps to a refusal, reads and writes at most its limit, and a
data set written in any little-endian transfer syntax has one content digest. Examples are
derandomised (the same cases on every run, no example database) and counted in CASES; the whole
file runs in well under a minute on one core.
"""

from __future__ import annotations

import hashlib
import io
import tempfile
import zlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from core.db import session_factory
from core.migrate import upgrade
from dicom_node.checks import inflated_copy, inflates_past
from dicom_node.content import DataSetStream, Malformed, content_digest, hash_fragments
from dicom_node.receive import (
    CANNOT_UNDERSTAND,
    DATASET_DOES_NOT_MATCH_SOP_CLASS,
    SUCCESS,
    StoreOutcome,
    store_instance,
)

CASES = {"deflate": 300, "fragments": 300, "nested_syntaxes": 60, "nested_mutated": 200}
SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # DX for presentation
LIMIT = 1 << 20
DEFLATE_LIMIT = 2 << 20


def fuzz(name: str):
    """Hypothesis settings for one property: its number of cases, the same cases every run."""
    return settings(max_examples=CASES[name], deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def part10(meta_syntax: str, body: bytes) -> bytes:
    """A Part 10 file: preamble, a valid file meta naming `meta_syntax`, then `body` as it is."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SOP_CLASS, "1.2.3.4"
    meta.TransferSyntaxUID = meta_syntax
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta)
    return buffer.getvalue() + body


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(6, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def mutate(data: bytes, cuts: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) edits: 0 flips a byte, 1 truncates, 2 inserts, 3 duplicates
    a slice (lengths and tags repeated out of place)."""
    out = bytearray(data)
    for kind, position, value in cuts:
        if not out:
            break
        at = position % len(out)
        if kind == 0:
            out[at] ^= value or 1
        elif kind == 1:
            del out[at:]
        elif kind == 2:
            out[at:at] = bytes([value]) * (1 + value % 7)
        else:
            out[at:at] = out[at:at + 1 + value]
    return bytes(out)


edits = st.lists(st.tuples(st.integers(0, 3), st.integers(0, 1 << 20), st.integers(0, 255)), max_size=4)


# --- deflate ----------------------------------------------------------------------------------

deflate_bodies = st.one_of(
    st.binary(max_size=2048),  # not deflate at all
    st.builds(lambda data, cuts: mutate(raw_deflate(data), cuts), st.binary(max_size=4096), edits),
    # Bombs around the limit, with trailing bytes: past 1 MiB of output a stream's pad byte stays
    # in unconsumed_tail, where the old loop spun for ever (issue 23 row 1).
    st.builds(lambda mib, offset, pad: raw_deflate(bytes(max(0, (mib << 20) + offset))) + pad,
              st.integers(0, 3), st.integers(-4096, 4096), st.binary(max_size=3)),
)


@pytest.mark.timeout(300)
@fuzz("deflate")
@given(body=deflate_bodies)
def test_fuzz_deflate_ends_and_stays_under_its_limit(body: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "spool.dcm"
        path.write_bytes(part10(DeflatedExplicitVRLittleEndian, body))
        try:
            past = inflates_past(path, DEFLATE_LIMIT)
        except zlib.error:
            return  # not deflate: store_instance refuses it as unreadable
        from contextlib import ExitStack

        with ExitStack() as cleanup:
            copy = inflated_copy(path, DEFLATE_LIMIT, cleanup)
            assert (copy is None) == past
            if copy is not None:
                assert copy.stat().st_size <= DEFLATE_LIMIT + 1024  # the file meta comes on top


# --- encapsulated fragments -------------------------------------------------------------------

ITEM_TAGS = st.sampled_from(  # item, sequence delimiter, item delimiter, junk
    [b"\xfe\xff\x00\xe0", b"\xfe\xff\xdd\xe0", b"\xfe\xff\x0d\xe0", b"\x00\x00\x00\x00"])
items = st.lists(st.tuples(ITEM_TAGS, st.one_of(st.integers(0, 64), st.integers(0, 0xFFFFFFFF)),
                           st.binary(max_size=64)), max_size=8)


@pytest.mark.timeout(300)
@fuzz("fragments")
@given(parts=items, tail=st.binary(max_size=16))
def test_fuzz_fragments_end_and_read_at_most_their_limit(parts, tail: bytes) -> None:
    data = b"".join(tag + length.to_bytes(4, "little") + value for tag, length, value in parts) + tail
    stream = DataSetStream(io.BytesIO(data), 0, False, limit=len(data))
    digest = hashlib.sha256()
    try:
        fragments = hash_fragments(stream, digest)
    except Malformed:
        return
    assert 0 <= fragments <= len(parts)
    assert stream.position <= len(data)


# --- data sets of nested sequences ------------------------------------------------------------

TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"), max_size=24)
LEAVES = [  # (tag, VR, values): standard elements of several VRs, and a private one
    (0x00080060, "CS", st.sampled_from(["DX", "CR", "OT"])),
    (0x00081030, "LO", TEXT),
    (0x00204000, "LT", TEXT),
    (0x00280010, "US", st.integers(0, 0xFFFF)),
    (0x00181164, "DS", st.sampled_from(["0.1", "0.139", "1"])),
    (0x00090010, "LO", st.just("PNEUMO FUZZ")),
    (0x00091001, "LO", TEXT),
]
SEQUENCES = [0x00081110, 0x00400275, 0x0040A730]


def leaf() -> st.SearchStrategy[list[tuple[int, str, object]]]:
    return st.lists(st.sampled_from(range(len(LEAVES))).flatmap(
        lambda i: LEAVES[i][2].map(lambda value: (LEAVES[i][0], LEAVES[i][1], value))), max_size=4)


def item_of(children: list[tuple[int, str, object]]) -> Dataset:
    item = Dataset()
    for tag, vr, value in children:
        item.add_new(tag, vr, value)
    return item


nested = st.recursive(
    leaf().map(item_of),
    lambda inner: st.tuples(
        leaf(), st.lists(st.tuples(st.sampled_from(SEQUENCES), st.lists(inner, max_size=3)), max_size=2),
    ).map(lambda parts: _with_sequences(item_of(parts[0]), parts[1])),
    max_leaves=12,
)


def _with_sequences(item: Dataset, sequences) -> Dataset:
    for tag, children in sequences:
        item.add_new(tag, "SQ", Sequence(children))
    return item


def whole(body: Dataset, pixels: bytes) -> Dataset:
    dataset = Dataset()
    dataset.update(body)
    dataset.SOPClassUID, dataset.SOPInstanceUID = SOP_CLASS, generate_uid()
    dataset.StudyInstanceUID, dataset.SeriesInstanceUID = generate_uid(), generate_uid()
    columns = 512 if len(pixels) % 1024 == 0 else len(pixels) // 2
    dataset.Rows, dataset.Columns = len(pixels) // (2 * columns), columns
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.SamplesPerPixel, dataset.PhotometricInterpretation = 1, "MONOCHROME2"
    dataset.PixelData = pixels
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = SOP_CLASS
    dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
    return dataset


def encoded(dataset: Dataset, syntax: str) -> bytes:
    dataset.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


class Store:
    """One SQLite database and storage folder for the module's cases (each data set has its own
    UIDs); a module-scoped fixture, as hypothesis runs every case of a test in one call."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory()
        self.root = Path(self._folder.name)
        url = f"sqlite:///{self.root / 'pneumo.db'}"
        upgrade(url)
        self.sessions = session_factory(url)
        (self.root / "storage").mkdir()

    def put(self, data: bytes, sop_uid: str) -> StoreOutcome:
        spool = self.root / "spool.dcm"
        spool.write_bytes(data)
        try:
            return store_instance(spool, SOP_CLASS, sop_uid, "FUZZ", self.root / "storage", self.sessions,
                                  max_inflated_mb=8, max_dataset_mb=8)
        finally:
            spool.unlink(missing_ok=True)

    def close(self) -> None:
        self.sessions.kw["bind"].dispose()
        self._folder.cleanup()


pixels = st.binary(min_size=2, max_size=64).map(lambda data: data[: len(data) // 2 * 2])
big_pixels = st.integers(1, 3 << 10).map(lambda kib: bytes(kib << 10))  # up to 3 MiB: deferred values


@pytest.fixture(scope="module")
def store():
    store = Store()
    yield store
    store.close()


@pytest.mark.timeout(300)
@fuzz("nested_syntaxes")
@given(body=nested, data=st.one_of(pixels, big_pixels))
def test_fuzz_nested_data_sets_have_one_content_in_every_syntax(
    store: Store, body: Dataset, data: bytes
) -> None:
    """Row 2 generalised: the same data set in Implicit, Explicit or Deflated VR Little Endian is
    stored once and every re-send in another syntax is a success; the content digests agree."""
    dataset = whole(body, data)
    digests = set()
    for syntax in (ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        raw = encoded(dataset, syntax)
        path = store.root / "probe.dcm"
        path.write_bytes(raw)
        digests.add(content_digest(path, dcmread(path, defer_size=1 << 10), LIMIT << 3))
        outcome = store.put(raw, dataset.SOPInstanceUID)
        assert outcome.status == SUCCESS, outcome.reason
    assert len(digests) == 1


@pytest.mark.timeout(300)
@fuzz("nested_mutated")
@given(body=nested, data=pixels, syntax=st.sampled_from(
    [ImplicitVRLittleEndian, ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit]),
    cuts=edits)
def test_fuzz_mutated_data_sets_are_stored_or_refused_never_raise(
    store: Store, body: Dataset, data: bytes, syntax: str, cuts
) -> None:
    dataset = whole(body, data)
    if syntax == JPEGBaseline8Bit:  # encapsulated: the offset table and fragments mutated too
        dataset.PixelData = encapsulate([data, data[::-1]], has_bot=True)
        dataset["PixelData"].VR, dataset["PixelData"].is_undefined_length = "OB", True
        dataset.NumberOfFrames = 2
    raw = encoded(dataset, syntax)
    header = 132  # mutations after the preamble and its magic: the file meta is fair game too
    outcome = store.put(raw[:header] + mutate(raw[header:], cuts), dataset.SOPInstanceUID)
    assert outcome.status in {SUCCESS, CANNOT_UNDERSTAND, DATASET_DOES_NOT_MATCH_SOP_CLASS}, outcome
    assert outcome.reason
