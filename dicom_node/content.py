"""What an image is, whatever transfer syntax carried it: the digest a re-send is compared on.

A PACS re-sends in whatever syntax it negotiates, so the same image arrives as Implicit VR, then
Explicit VR (or deflated, or big endian): the bytes differ, the content does not. Hashing the
received file refused 41 of 41 such re-sends as conflicting duplicates (issue 23 row 2).

The content digest covers
- every element outside the file meta, group lengths and trailing padding, re-encoded one
  canonical way (pydicom, Implicit VR Little Endian: values and nesting, not VRs or the
  sender's choice of defined or undefined lengths), and
- each large (deferred) value, Pixel Data above all, streamed from the file and never held in
  memory: native values as little-endian bytes, encapsulated ones as the bytes of their fragments
  (the Basic Offset Table and fragment boundaries are the encoder's choice, not the image's).

A compressed image re-sent decompressed is not the same content here: comparing decoded pixels
would make the node decode every image it receives (the worker's job, on untrusted bytes).
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from pathlib import Path
from typing import BinaryIO, Protocol

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

CHUNK = 1 << 20
UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM, SEQUENCE_DELIMITER = 0xFFFEE000, 0xFFFEE0DD
TRAILING_PADDING = 0xFFFCFFFC
SWAP_SIZE = {"OW": 2, "US": 2, "SS": 2, "OL": 4, "OF": 4, "UL": 4, "SL": 4, "FL": 4,
             "OD": 8, "OV": 8, "FD": 8, "SV": 8, "UV": 8}
VERSION = b"pneumo content digest 1\n"


class Digest(Protocol):
    """What the walk over deferred values feeds: a hashlib digest, or `_Discard`."""

    def update(self, data: bytes, /) -> None: ...


class Malformed(ValueError):
    """The file's bytes do not hold what its parsed header says (truncated, not in items)."""


class DataSetStream:
    """The data set's bytes after the file meta, read forward only: the file itself, or inflated
    `CHUNK` at a time for a deflated one (whose element positions refer to the inflated stream).
    Reading past `limit` bytes raises Malformed: bounded memory and time on any input."""

    def __init__(self, handle: BinaryIO, start: int, deflated: bool, limit: int) -> None:
        self._handle, self._deflated, self._limit = handle, deflated, limit
        self._inflater = zlib.decompressobj(-zlib.MAX_WBITS) if deflated else None
        self._buffer, self._tail = b"", b""
        self.position = 0 if deflated else start  # as pydicom counts value_tell
        handle.seek(start)

    def _more(self, wanted: int) -> bytes:
        if self._inflater is None:
            return self._handle.read(min(wanted, CHUNK))
        while True:
            if self._inflater.eof:
                return b""
            data = self._tail or self._handle.read(CHUNK)
            if not data:
                return b""
            out = self._inflater.decompress(data, CHUNK)
            self._tail = self._inflater.unconsumed_tail
            if out:
                return out
            if self._tail == data:
                return b""  # no progress: treat as the end (no loop without an end)

    def read(self, size: int) -> bytes:
        """Exactly `size` bytes (at most `CHUNK` at once), or Malformed at the end of the data."""
        if size > CHUNK:
            raise ValueError("read at most CHUNK bytes at once")
        while len(self._buffer) < size:
            if self.position + len(self._buffer) > self._limit:
                raise Malformed("data set longer than its limit")
            more = self._more(size - len(self._buffer))
            if not more:
                raise Malformed("data ends inside an element")
            self._buffer += more
        data, self._buffer = self._buffer[:size], self._buffer[size:]
        self.position += size
        return data

    def skip_to(self, position: int) -> None:
        if position < self.position:
            raise Malformed("elements out of order")
        while self.position < position:
            self.read(min(CHUNK, position - self.position))


def _swapped(data: bytes, size: int) -> bytes:
    """Big-endian words to little-endian (a trailing odd byte, never valid, is kept as is)."""
    whole = len(data) - len(data) % size
    if size == 1 or not whole:
        return data
    swapped = bytearray(data[:whole])
    for offset in range(size):
        swapped[offset::size] = data[size - 1 - offset:whole:size]
    return bytes(swapped) + data[whole:]


def _hash_defined(stream: DataSetStream, length: int, swap: int, digest: Digest) -> None:
    remaining = length
    while remaining:
        size = min(CHUNK - CHUNK % 8, remaining)
        data = stream.read(size)
        digest.update(_swapped(data, swap) if swap > 1 else data)
        remaining -= size


def hash_fragments(stream: DataSetStream, digest: Digest, little_endian: bool = True) -> int:
    """Encapsulated data (PS3.5 A.4): items up to the sequence delimiter; the first item (the
    Basic Offset Table) is skipped, the other items' bytes hashed. Returns how many fragments."""
    header = struct.Struct("<HHI" if little_endian else ">HHI")
    fragments = -1  # the offset table comes first
    while True:
        group, element, length = header.unpack(stream.read(8))
        tag = group << 16 | element
        if tag == SEQUENCE_DELIMITER:
            return max(fragments, 0)
        if tag != ITEM or length == UNDEFINED_LENGTH:
            raise Malformed("encapsulated data not in items")
        if fragments < 0:
            stream.skip_to(stream.position + length)
        else:
            _hash_defined(stream, length, 1, digest)
        fragments += 1


WORD_VRS = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}  # bytes values pydicom leaves unswapped


# Dataset iteration yields converted elements (reading deferred values): tags are iterated instead.
def _canonical(dataset: Dataset, skip: set[int], big_endian: bool) -> Dataset:
    """A copy without group lengths, trailing padding or `skip`ped tags, items copied likewise;
    from a big-endian data set, word-valued bytes (OW, OL...) in little-endian order (pydicom
    converts numbers, but writes these bytes as they were read)."""
    copy = Dataset()
    for tag in sorted(dataset.keys()):
        if tag.element == 0 or tag == TRAILING_PADDING or tag in skip:
            continue
        element = dataset[tag]
        if element.VR == "SQ":
            items = Sequence([_canonical(item, set(), big_endian) for item in element.value or []])
            element = DataElement(tag, "SQ", items)
        elif big_endian and element.VR in WORD_VRS and isinstance(element.value, bytes):
            element = DataElement(tag, element.VR, _swapped(element.value, WORD_VRS[element.VR]))
        copy.add(element)
    return copy


def _deferred_values(dataset: Dataset) -> list[RawDataElement]:
    """The data set's large values left in the file by `defer_size` (never read into memory)."""
    deferred: list[RawDataElement] = []
    raw: DataElement | RawDataElement
    for tag in sorted(dataset.keys()):
        raw = dataset.get_item(tag, keep_deferred=True)
        if tag.group != 2 and isinstance(raw, RawDataElement) and raw.value is None and raw.length:
            deferred.append(raw)
    return deferred


class _Discard:
    """A digest that keeps nothing: the deferred values walked for their structure only."""

    def update(self, data: bytes, /) -> None:
        pass


def _walk_deferred(path: Path, dataset: Dataset, deferred: list[RawDataElement], limit_bytes: int,
                   digest: Digest) -> None:
    meta = dataset.file_meta
    syntax = meta.TransferSyntaxUID
    start = 132 + 12 + int(meta.FileMetaInformationGroupLength)
    with path.open("rb") as handle:
        stream = DataSetStream(handle, start, syntax.is_deflated, limit_bytes)
        for raw in sorted(deferred, key=lambda element: element.value_tell):
            digest.update(struct.pack("<I", int(raw.tag)))
            stream.skip_to(raw.value_tell)
            if raw.length == UNDEFINED_LENGTH:
                digest.update(b"fragments")
                hash_fragments(stream, digest, syntax.is_little_endian)
            else:
                swap = 1 if syntax.is_little_endian else SWAP_SIZE.get(str(raw.VR), 1)
                _hash_defined(stream, raw.length, swap, digest)


def check_deferred(path: Path, dataset: Dataset, limit_bytes: int) -> None:
    """Raise Malformed where `content_digest` would: a deferred value past the end of the data,
    out of order, or encapsulated data not in items. Why apart: the node refuses such a file on
    receipt, but computes the digest itself only when a re-send needs it (issue 21: the header's
    canonical re-encoding was a quarter of the CPU of storing a file, for every file)."""
    deferred = _deferred_values(dataset)
    if deferred:
        _walk_deferred(path, dataset, deferred, limit_bytes, _Discard())


def content_digest(path: Path, dataset: Dataset, limit_bytes: int) -> str:
    """The content digest (hex) of the Part 10 file at `path`, parsed as `dataset` (read with
    `defer_size`, so its large values are still in the file)."""
    syntax = dataset.file_meta.TransferSyntaxUID
    deferred = _deferred_values(dataset)
    skip = {int(raw.tag) for raw in deferred} | {int(tag) for tag in sorted(dataset.keys()) if tag.group == 2}
    header = _canonical(dataset, skip, not syntax.is_little_endian)
    encoded = DicomBytesIO()
    encoded.is_little_endian, encoded.is_implicit_VR = True, True
    write_dataset(encoded, header)
    digest = hashlib.sha256(VERSION)
    digest.update(struct.pack("<Q", encoded.tell()))
    digest.update(encoded.getvalue())
    if deferred:
        _walk_deferred(path, dataset, deferred, limit_bytes, digest)
    return digest.hexdigest()
