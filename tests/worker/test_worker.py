"""The worker's functions on real files: filters, decoding, results, SR content, idempotence."""

from pathlib import Path

import pytest
from highdicom.sr import srread
from pydicom import dcmread
from sqlalchemy import func, select, update

from core.db import Delivery, DeliveryState, Instance, InstanceState, Result, Study
from core.settings import Settings
from dicom_node.receive import store_instance
from ops.send import wrap_image
from tests.conftest import DATA, REAL_DICOM
from worker import classify, housekeeping
from worker import delivery as sr_delivery

# The README of ../shared/dicom/real: expected handling per file.
EXPECTED = {
    "fuji_cr_chest_mono1_explicit.dcm": (InstanceState.CLASSIFIED, None),
    "nema_rg1_cr_chest_j2k_lossy.dcm": (InstanceState.CLASSIFIED, None),
    "konica_cr_mono1_jpeg.dcm": (InstanceState.CLASSIFIED, None),
    "nih_cxr14_dx_implicit.dcm": (InstanceState.CLASSIFIED, None),
    "dx_16bit_j2k_flipped.dcm": (InstanceState.CLASSIFIED, None),
    "canon_dx_j2k_corrupt.dcm": (InstanceState.FAILED, "could not be decoded"),
    "cr_hip_jpeg_lossless.dcm": (InstanceState.IGNORED, "body part HIP"),
    "canine_dx_thorax.dcm": (InstanceState.CLASSIFIED, None),
}


def store(path_or_dataset, sessions, tmp_path: Path) -> int:
    """Put a file through the node's receive function, as a C-STORE would."""
    spool = tmp_path / "spool.dcm"
    dataset = path_or_dataset if not isinstance(path_or_dataset, Path) else dcmread(path_or_dataset)
    dataset.save_as(spool, enforce_file_format=True)
    storage = tmp_path / "storage"
    storage.mkdir(exist_ok=True)
    outcome = store_instance(spool, dataset.SOPClassUID, dataset.SOPInstanceUID, "TEST", storage,
                             sessions)
    assert outcome.status == 0
    return outcome.instance_id


def test_expected_handling_covers_every_real_file() -> None:
    assert set(EXPECTED) == {p.name for p in REAL_DICOM.glob("*.dcm")}


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_real_file_gets_its_handling(name, sessions, classifier, tmp_path: Path) -> None:
    instance_id = store(REAL_DICOM / name, sessions, tmp_path)
    state = classify.classify_instance(sessions, instance_id, classifier)
    expected_state, expected_reason = EXPECTED[name]
    with sessions() as session:
        instance = session.get(Instance, instance_id)
        results = session.scalars(select(Result).where(Result.instance_id == instance_id)).all()
    assert state == expected_state == instance.state
    if expected_reason:
        assert expected_reason in instance.reason
    assert len(results) == (1 if expected_state == InstanceState.CLASSIFIED else 0)
    if results:
        assert 0.0 <= results[0].probability <= 1.0
        assert results[0].model_version == "test-1"
        assert results[0].label == ("PNEUMONIA" if results[0].probability >= 0.5 else "NORMAL")


def test_classification_is_idempotent(sessions, classifier, tmp_path: Path) -> None:
    instance_id = store(REAL_DICOM / "fuji_cr_chest_mono1_explicit.dcm", sessions, tmp_path)
    classify.classify_instance(sessions, instance_id, classifier)
    classify.classify_instance(sessions, instance_id, classifier)
    with sessions() as session:
        assert session.scalar(select(func.count(Result.id))) == 1


def test_a_run_that_loses_the_race_writes_nothing(sessions, classifier, tmp_path: Path) -> None:
    """Two deliveries of one job (a redelivered message): the one that finishes second must not add
    a result or flip the state the first recorded."""
    instance_id = store(REAL_DICOM / "fuji_cr_chest_mono1_explicit.dcm", sessions, tmp_path)

    def finished_meanwhile():
        with sessions() as session, session.begin():
            session.execute(update(Instance).where(Instance.id == instance_id).values(
                state=InstanceState.FAILED, reason="finished by the other run"))
        return classifier()

    assert classify.classify_instance(sessions, instance_id, finished_meanwhile) == InstanceState.FAILED
    with sessions() as session:
        assert session.get(Instance, instance_id).reason == "finished by the other run"
        assert session.scalar(select(func.count(Result.id))) == 0


def test_instance_that_keeps_killing_workers_fails_with_reason(
    sessions, classifier, tmp_path: Path
) -> None:
    instance_id = store(REAL_DICOM / "fuji_cr_chest_mono1_explicit.dcm", sessions, tmp_path)
    with sessions() as session, session.begin():
        instance = session.get(Instance, instance_id)
        instance.state, instance.attempts = InstanceState.PROCESSING, classify.MAX_WORKER_DEATHS
    assert classify.classify_instance(sessions, instance_id, classifier) == InstanceState.FAILED
    with sessions() as session:
        assert "never finished" in session.get(Instance, instance_id).reason


@pytest.mark.parametrize(
    ("change", "state", "reason"),
    [
        ({"ViewPosition": "LL"}, InstanceState.IGNORED, "lateral view"),
        ({"BodyPartExamined": "SKULL"}, InstanceState.IGNORED, "body part SKULL"),
        ({"Modality": "OT", "SOPClassUID": "1.2.840.10008.5.1.4.1.1.7"}, InstanceState.IGNORED,
         "secondary capture with modality OT"),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.2"}, InstanceState.IGNORED, "not a radiograph"),
    ],
)
def test_filters_record_reasons(change, state, reason, sessions, classifier, tmp_path: Path) -> None:
    dataset = wrap_image(sorted((DATA / "test" / "NORMAL").iterdir())[0])
    for keyword, value in change.items():
        setattr(dataset, keyword, value)
    dataset.file_meta.MediaStorageSOPClassUID = dataset.SOPClassUID
    instance_id = store(dataset, sessions, tmp_path)
    assert classify.classify_instance(sessions, instance_id, classifier) == state
    with sessions() as session:
        assert reason in session.get(Instance, instance_id).reason


def test_finalise_reads_only_studies_with_news_and_refreshes_on_a_late_image(
    sessions, classifier, tmp_path: Path
) -> None:
    """The scheduler runs finalise every second: it must not re-read the whole history, and an
    image arriving after the SR was scheduled must refresh that same SR (same delivery)."""
    images = sorted((DATA / "test" / "NORMAL").iterdir())[:2]
    first = wrap_image(images[0])
    classify.classify_instance(sessions, store(first, sessions, tmp_path), classifier)
    settings = Settings(home=tmp_path / "home", quiet_seconds=0)
    queued: list[int] = []
    housekeeping.finalise_stable_studies(sessions, settings, queued.append)
    assert len(queued) == 1
    with sessions() as session:
        assert session.scalar(select(func.count()).where(Study.report_pending)) == 0

    late = store(wrap_image(images[1], study=first), sessions, tmp_path)
    assert housekeeping.finalise_stable_studies(sessions, settings, queued.append) == []  # still classifying
    classify.classify_instance(sessions, late, classifier)
    assert housekeeping.finalise_stable_studies(sessions, settings, queued.append) == [queued[0]]
    with sessions() as session:
        assert session.get(Delivery, queued[0]).instances_reported == 2
        session.execute(update(Study).values(report_pending=True, changes=Study.changes + 1))
        session.commit()
    assert housekeeping.finalise_stable_studies(sessions, settings, queued.append) == []  # nothing new
    with sessions() as session:
        assert session.scalar(select(func.count()).where(Study.report_pending)) == 0


def test_stable_study_gets_one_sr_with_every_classified_image(
    sessions, classifier, tmp_path: Path
) -> None:
    images = sorted((DATA / "test" / "PNEUMONIA").iterdir())[:2]
    first = wrap_image(images[0])
    second = wrap_image(images[1], study=first)
    ids = [store(d, sessions, tmp_path) for d in (first, second)]
    for instance_id in ids:
        classify.classify_instance(sessions, instance_id, classifier)

    settings = Settings(home=tmp_path / "home", quiet_seconds=0)
    queued: list[int] = []
    assert housekeeping.finalise_stable_studies(sessions, settings, queued.append) == queued
    assert len(queued) == 1
    assert housekeeping.finalise_stable_studies(sessions, settings, queued.append) == []  # once

    path = sr_delivery.write_sr(sessions, queued[0], tmp_path / "sr")
    report = srread(path)
    assert report.StudyInstanceUID == first.StudyInstanceUID
    assert report.SeriesInstanceUID != first.SeriesInstanceUID
    assert report.VerificationFlag == "UNVERIFIED"
    groups = report.content.get_image_measurement_groups()
    assert len(groups) == 2
    with sessions() as session:
        results = {r.instance.sop_instance_uid: r for r in session.scalars(select(Result))}
        delivery = session.get(Delivery, queued[0])
    assert delivery.state == DeliveryState.PENDING
    assert delivery.sr_sop_instance_uid == report.SOPInstanceUID
    for group in groups:
        source = group.source_images[0].referenced_sop_instance_uid
        result = results[source]
        evaluation = group.get_qualitative_evaluations()[0]
        assert evaluation.name.value == "233604007"
        assert evaluation.value.value == ("52101004" if result.label == "PNEUMONIA" else "272519000")
        assert group.get_measurements()[0].value == pytest.approx(result.probability, abs=1e-6)
        texts = {item.ConceptNameCodeSequence[0].CodeMeaning: item.get("TextValue")
                 for item in group[0].ContentSequence}
        assert texts["Algorithm Name"] == "pneumonia-transfer"
        assert texts["Algorithm Version"] == "test-1"
    ours = [e for e in report.ContributingEquipmentSequence if e.Manufacturer == "Pneumo"]
    assert [(e.ManufacturerModelName, e.SoftwareVersions) for e in ours] == [
        ("pneumonia-transfer", "test-1")]

    # Re-building gives the same UIDs: a re-send replaces the SR at the PACS.
    again = dcmread(sr_delivery.write_sr(sessions, queued[0], tmp_path / "sr2"))
    assert (again.SOPInstanceUID, again.SeriesInstanceUID) == (
        report.SOPInstanceUID, report.SeriesInstanceUID)


def test_sweep_requeues_recorded_but_unqueued_instances(sessions, tmp_path: Path) -> None:
    from datetime import timedelta

    from core.db import utcnow

    instance_id = store(REAL_DICOM / "fuji_cr_chest_mono1_explicit.dcm", sessions, tmp_path)
    with sessions() as session, session.begin():  # as the node leaves it when its publish failed
        session.get(Instance, instance_id).state = InstanceState.RECEIVED
    queued: list[int] = []
    assert housekeeping.sweep(sessions, queued.append) == []  # too fresh: the node may still queue it
    with sessions() as session, session.begin():
        session.get(Instance, instance_id).received_at = utcnow() - timedelta(seconds=30)
    assert housekeeping.sweep(sessions, queued.append) == [instance_id] == queued
    with sessions() as session:
        assert session.get(Instance, instance_id).state == InstanceState.QUEUED


@pytest.mark.parametrize("syntax", ["RLELossless", "DeflatedExplicitVRLittleEndian"])
def test_transcoded_real_file_is_classified(syntax, sessions, classifier, tmp_path: Path) -> None:
    """Syntaxes no real file here uses: transcoded from the Fuji CR with pydicom."""
    import pydicom.uid

    dataset = dcmread(REAL_DICOM / "fuji_cr_chest_mono1_explicit.dcm")
    uid = getattr(pydicom.uid, syntax)
    if syntax == "RLELossless":
        dataset.compress(uid)
    else:
        dataset.file_meta.TransferSyntaxUID = uid
    instance_id = store(dataset, sessions, tmp_path)
    with sessions() as session:
        assert session.get(Instance, instance_id).transfer_syntax_uid == uid
    assert classify.classify_instance(sessions, instance_id, classifier) == InstanceState.CLASSIFIED
