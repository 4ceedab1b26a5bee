"""Re-sends under one SOP Instance UID, with the content digest computed only when one arrives.

The node no longer digests every image it receives (issue 21): the same answers as before, the
stored instance's digest computed from its file when a re-send needs it, and kept in its row.
"""

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy import select

from core.db import AuditEvent, Instance
from dicom_node.content import content_digest
from dicom_node.receive import CANNOT_UNDERSTAND, CONFLICTING_DUPLICATE, SUCCESS, StoreOutcome, store_instance
from ops.send import wrap_image
from tests.conftest import DATA

IMAGES = sorted((DATA / "test" / "NORMAL").iterdir())[:2]


def put(tmp_path: Path, sessions, dataset, syntax: str = ExplicitVRLittleEndian) -> StoreOutcome:
    """One C-STORE's data set, as pynetdicom leaves it in the spool, through `store_instance`."""
    spool = tmp_path / "spool" / "received.dcm"
    spool.parent.mkdir(exist_ok=True)
    (tmp_path / "storage").mkdir(exist_ok=True)
    dataset.file_meta.TransferSyntaxUID = syntax
    dataset.save_as(spool, enforce_file_format=True)
    try:
        return store_instance(spool, str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), "SENDER",
                              tmp_path / "storage", sessions)
    finally:
        spool.unlink(missing_ok=True)


def row(sessions) -> Instance:
    with sessions() as session:
        return session.scalars(select(Instance)).one()


def events(sessions) -> list[str]:
    with sessions() as session:
        return list(session.scalars(select(AuditEvent.event).order_by(AuditEvent.id)))


def test_a_resend_in_other_syntaxes_is_a_duplicate_and_the_digest_is_kept(tmp_path: Path, sessions) -> None:
    dataset = wrap_image(IMAGES[0])
    first = put(tmp_path, sessions, dataset, ImplicitVRLittleEndian)
    assert first.status == SUCCESS and not first.duplicate
    assert row(sessions).content_sha256 is None  # not computed on receipt
    again = put(tmp_path, sessions, dataset, ImplicitVRLittleEndian)  # the same bytes
    assert (again.status, again.duplicate) == (SUCCESS, True)
    assert row(sessions).content_sha256 is None  # the file's sha256 sufficed
    for syntax in (ExplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        outcome = put(tmp_path, sessions, dataset, syntax)
        assert (outcome.status, outcome.duplicate) == (SUCCESS, True), outcome.reason
    path = Path(row(sessions).path)
    expected = content_digest(path, dcmread(path, defer_size=1 << 20), path.stat().st_size)
    assert row(sessions).content_sha256 == expected
    assert events(sessions) == ["received", *["duplicate_received"] * 3]
    assert not list((tmp_path / "spool").iterdir())  # no inflated copy left behind


def test_a_deflated_first_copy_is_inflated_to_compare(tmp_path: Path, sessions) -> None:
    dataset = wrap_image(IMAGES[0])
    assert put(tmp_path, sessions, dataset, DeflatedExplicitVRLittleEndian).status == SUCCESS
    outcome = put(tmp_path, sessions, dataset, ImplicitVRLittleEndian)
    assert (outcome.status, outcome.duplicate) == (SUCCESS, True), outcome.reason
    assert row(sessions).content_sha256 is not None
    assert not list((tmp_path / "spool").iterdir())


@pytest.mark.parametrize("stored_file", ["kept", "gone"])
def test_other_content_under_the_same_uid_is_a_conflict(tmp_path: Path, sessions, stored_file: str) -> None:
    """A stored file gone (retention) leaves the sha256 to compare on: still a conflict."""
    first, second = wrap_image(IMAGES[0]), wrap_image(IMAGES[1])
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        setattr(second, keyword, first.get(keyword))
    second.file_meta.MediaStorageSOPInstanceUID = first.SOPInstanceUID
    assert put(tmp_path, sessions, first).status == SUCCESS
    if stored_file == "gone":
        Path(row(sessions).path).unlink()
    outcome = put(tmp_path, sessions, second)
    assert (outcome.status, outcome.duplicate) == (CONFLICTING_DUPLICATE, True)
    assert events(sessions) == ["received", "conflicting_duplicate"]


def test_broken_fragments_are_still_refused_on_receipt(tmp_path: Path, sessions) -> None:
    """The digest's walk over deferred (over 1 MiB) encapsulated pixel data still runs on every
    receipt, unhashed."""
    dataset = wrap_image(IMAGES[0])
    dataset.PixelData = encapsulate([bytes(600 << 10), bytes(600 << 10)], has_bot=True)  # deferred
    dataset["PixelData"].VR, dataset["PixelData"].is_undefined_length = "OB", True
    dataset.NumberOfFrames = 2
    spool = tmp_path / "spool" / "received.dcm"
    spool.parent.mkdir()
    (tmp_path / "storage").mkdir()
    dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.50"
    dataset.save_as(spool, enforce_file_format=True)
    raw = bytearray(spool.read_bytes())
    item = raw.rindex(b"\xfe\xff\x00\xe0")  # the last fragment's item tag, made something else
    raw[item:item + 4] = b"\x08\x00\x16\x00"
    spool.write_bytes(bytes(raw))
    outcome = store_instance(spool, str(dataset.SOPClassUID), str(dataset.SOPInstanceUID), "SENDER",
                             tmp_path / "storage", sessions)
    assert outcome.status == CANNOT_UNDERSTAND
    assert outcome.reason == "dataset malformed: encapsulated data not in items"


def test_a_resend_after_retention_is_still_a_duplicate(tmp_path: Path, sessions) -> None:
    """Retention removes the file the digest is computed from: it records the digest first."""
    from ops import retention

    dataset = wrap_image(IMAGES[0])
    assert put(tmp_path, sessions, dataset, ImplicitVRLittleEndian).status == SUCCESS
    stored = row(sessions)
    retention.remove(sessions, retention.Candidate(stored.study_id, "1.2.3", [Path(stored.path)]))
    assert not Path(stored.path).exists() and row(sessions).content_sha256 is not None
    outcome = put(tmp_path, sessions, dataset, ExplicitVRLittleEndian)
    assert (outcome.status, outcome.duplicate) == (SUCCESS, True), outcome.reason
    assert events(sessions)[-1] == "duplicate_received"
