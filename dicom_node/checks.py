"""Checks on a received data set before it is kept: whole, parseable, bounded when deflated.

Plain functions on untrusted bytes: each is bounded in time and memory (issue 23 row 1 and 5),
and says why a data set cannot be kept in words the sender's operator can act on.
"""

from __future__ import annotations

import contextlib
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.tag import BaseTag
from pydicom.uid import UID, ExplicitVRLittleEndian

UNDEFINED_LENGTH = 0xFFFFFFFF
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
INVALID_UID = "not a valid UID (digits and dots, no leading zero in a component, at most 64 characters)"


def valid_uid(value: object) -> bool:
    """PS3.5 9.1: digits and dots, no empty component, no leading zero in a component, at most 64
    characters (pydicom's check). `999.999.01.23.45.6789` passed a looser check, was stored and
    copied into an SR that dcmtk's dsrdump then rejected ("Invalid Value")."""
    return bool(value) and UID(str(value)).is_valid



def _inflated(path: Path, limit_bytes: int) -> Iterator[bytes]:
    """The deflated data set of the Part 10 file at `path`, inflated 1 MiB at a time; raises
    InflatesPast once more than `limit_bytes` came out. Ends at the end of the deflate stream:
    what follows it (the even-length pad byte) stays in `unconsumed_tail` once the stream has
    ended and `decompress` returns b'' for ever, which spun a node thread at 100% CPU holding its
    association slot (issue 23 row 1)."""
    meta = read_file_meta_info(path)
    inflater, total = zlib.decompressobj(-zlib.MAX_WBITS), 0
    with path.open("rb") as handle:
        handle.seek(132 + 12 + int(meta.FileMetaInformationGroupLength))  # after the file meta
        while not inflater.eof and (chunk := handle.read(1 << 16)):
            while chunk and not inflater.eof:
                inflated = inflater.decompress(chunk, 1 << 20)
                total += len(inflated)
                if total > limit_bytes:
                    raise InflatesPast
                yield inflated
                if not inflated and len(inflater.unconsumed_tail) == len(chunk):
                    return  # no progress: never expected, but this loop must end on any input
                chunk = inflater.unconsumed_tail


class InflatesPast(Exception):
    """A deflated data set inflates past the node's limit."""


def inflated_copy(path: Path, limit_bytes: int, cleanup: contextlib.ExitStack,
                  folder: Path | None = None) -> Path | None:
    """`path` itself, or for a deflated data set a copy in Explicit VR Little Endian beside it (or
    in `folder`: a stored file's goes to the spool), removed by `cleanup`, so it is read with
    deferred values like any other: pydicom inflates a deflated data set whole in memory. None if
    it inflates past `limit_bytes`."""
    meta = read_file_meta_info(path)
    if not meta.TransferSyntaxUID.is_deflated:
        return path
    # A unique name: two re-sends of one stored instance may inflate its file at once.
    copy = (folder or path.parent) / f"{path.stem}.{uuid.uuid4().hex[:12]}.inflated{path.suffix}"
    cleanup.callback(copy.unlink, missing_ok=True)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    with copy.open("wb") as handle:
        handle.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(DicomFileLike(handle), meta, enforce_standard=False)
        try:
            for chunk in _inflated(path, limit_bytes):
                handle.write(chunk)
        except InflatesPast:
            return None
    return copy


def inflates_past(path: Path, limit_bytes: int) -> bool:
    """Whether the Part 10 file's data set is deflated and inflates past `limit_bytes`.

    Why: pydicom inflates a deflated data set whole, in memory, to read even its header, so
    `DEFER_SIZE` bounds nothing there: a 1.2 MB file inflating to 1 GiB took the node 2.1 GB and
    6-7 s to read. Here it is inflated 1 MiB at a time and thrown away, stopping past the limit.
    """
    if not read_file_meta_info(path).TransferSyntaxUID.is_deflated:
        return False
    try:
        for _ in _inflated(path, limit_bytes):
            pass
    except InflatesPast:
        return True
    return False


def dataset_problem(dataset: Dataset, size: int) -> str | None:
    """Why a parsed spool file is not a whole DICOM dataset, or None.

    pydicom stops quietly at the end of the file, so a truncated data set reads "fine": its last
    element claims more bytes than arrived, or a few bytes of a cut-off element header remain.
    """
    if len(dataset) == 0:
        return "empty dataset: no data elements after the file meta information"
    if not any(keyword in dataset for keyword in ("SOPClassUID", *UID_KEYWORDS)):
        return "not a DICOM dataset: no SOP Class, SOP Instance, Study or Series UID found"
    if dataset.file_meta.TransferSyntaxUID.is_deflated:
        return None  # positions refer to the inflated stream
    tag = max(dataset.keys())
    # keep_deferred: without it the last element, Pixel Data as a rule, was read whole into memory
    # (a 640 MB C-STORE took the node from 106 to 718 MB; issue 23 row 5).
    element = dataset.get_item(tag, keep_deferred=True)
    value_tell, length = getattr(element, "value_tell", None), getattr(element, "length", None)
    if value_tell is None or length is None or length == UNDEFINED_LENGTH:
        return None
    end = value_tell + length
    if end > size:
        return f"dataset truncated: element {tag} declares {length} bytes, {size - value_tell} received"
    if end < size:
        return f"dataset truncated: {size - end} bytes of an incomplete element after {tag}"
    return None


TEXT_VRS = frozenset(
    {"AE", "AS", "CS", "DA", "DS", "DT", "IS", "LO", "LT", "PN", "SH", "ST", "TM", "UC", "UI", "UR", "UT"})
NUMBER_VRS = frozenset({"DS", "IS"})


def nul_problem(dataset: Dataset) -> str | None:
    """Why a text value cannot be kept: a NUL inside it (trailing NULs are padding), or None.

    PostgreSQL refuses NUL in text, so a NUL in a value the node stores (Accession Number,
    Modality) answered 0xA700 "database unavailable" on every retry, and one the worker stores
    (Body Part Examined in a reason) left the image in `processing`. No DICOM text VR allows it.
    Only text elements are converted (a deferred pixel or private value is never read); private
    elements are not read by pneumo and not checked.
    """
    for tag in sorted(dataset.keys()):
        raw = dataset.get_item(tag, keep_deferred=True)  # not `elements()`: it reads deferred values
        if raw.tag.is_private:
            continue
        vr = raw.VR or _dictionary_vr(raw.tag)
        if vr == "SQ":
            for item in dataset[raw.tag].value or []:
                if (problem := nul_problem(item)) is not None:
                    return problem
            continue
        if vr not in TEXT_VRS:
            continue
        # No NUL byte at all: nothing to find, and no conversion (most of this check's CPU;
        # issue 21). No DICOM character set encodes a character other than NUL as a 0x00 byte.
        # DS and IS are still converted: a value that is no number is refused as before.
        if vr not in NUMBER_VRS and isinstance(raw.value, bytes) and b"\x00" not in raw.value:
            continue
        element = dataset[raw.tag]
        values = element.value if element.VM > 1 else [element.value]
        if any("\x00" in str(value).rstrip("\x00 ") for value in values if value is not None):
            return f"invalid value: NUL character in {element.keyword or element.tag}"
    return None


def _dictionary_vr(tag: BaseTag) -> str | None:
    try:
        return dictionary_VR(tag)
    except KeyError:
        return None
