"""Shadow and silent versions through the worker's own functions: a candidate gets a result on
every image the served version classified and no delivery; a silent served version gets results
and no delivery until accepted; agreement is computed on exactly those rows."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from sqlalchemy import select

from core import registry
from core.db import AuditEvent, Delivery, Instance, Result
from core.settings import Settings
from ops import shadow
from ops.send import wrap_image
from tests.conftest import DATA
from tests.pipeline.test_delivery import store
from worker import classify, housekeeping

NAME = "pneumonia-transfer"
# The tiny test model's probabilities on these images lie between 0.5000 and 0.5003: the served
# copy (threshold 0.5) calls every one positive, a candidate at this threshold splits them.
CANDIDATE_THRESHOLD = 0.50018
IMAGES = [*sorted((DATA / "test" / "PNEUMONIA").iterdir())[:3],
          *sorted((DATA / "test" / "NORMAL").iterdir())[:3]]


def shadow_registry(tiny_registry: Path, folder: Path, threshold: float = CANDIDATE_THRESHOLD,
                    resize: str | None = "bilinear") -> Path:
    """A copy of the tests' registry (test-1 served) with test-2: the same weights at another
    threshold and, by default, another resize (so the candidate decodes the image itself)."""
    shutil.copytree(tiny_registry, folder)
    parent = registry.resolve(f"{NAME}@test-1", folder)
    registry.register_copy(parent, {**parent.card.dump(), "threshold": threshold}, folder,
                           version="test-2", resize=resize)
    return folder


@pytest.fixture
def models(tiny_registry: Path, tmp_path: Path) -> Path:
    return shadow_registry(tiny_registry, tmp_path / "models")


def served_classifier(models: Path):
    from worker.inference import Classifier

    model = Classifier(NAME, models)
    return lambda: model


def classify_study(sessions, classifier, tmp_path: Path, images=IMAGES) -> list[int]:
    """Store `images` as one study and classify each; their instance ids."""
    first, ids = None, []
    for image in images:
        dataset = wrap_image(image, study=first)
        first = first or dataset
        instance_id = store(dataset, sessions, tmp_path)
        classify.classify_instance(sessions, instance_id, classifier)
        ids.append(instance_id)
    return ids


def results_by_instance(sessions) -> dict[int, dict[str, Result]]:
    found: dict[int, dict[str, Result]] = {}
    with sessions() as session:
        for row in session.scalars(select(Result)):
            found.setdefault(row.instance_id, {})[row.model_version] = row
    return found


def finalise(sessions, models: Path, tmp_path: Path) -> list[int]:
    queued: list[int] = []
    settings = Settings(home=tmp_path / "home", quiet_seconds=0, pacs="PACS@127.0.0.1:1",
                        models_dir=models)
    housekeeping.finalise_stable_studies(sessions, settings, queued.append)
    return queued


def withheld_events(sessions) -> list[str]:
    with sessions() as session:
        return list(session.scalars(select(AuditEvent.detail).where(AuditEvent.event == "withheld")))


def test_a_candidate_gets_a_result_on_each_image_and_no_delivery(
    sessions, models: Path, tmp_path: Path
) -> None:
    registry.mark_candidate(NAME, "test-2", models)
    ids = classify_study(sessions, served_classifier(models), tmp_path)
    results = results_by_instance(sessions)
    assert set(results) == set(ids)
    for instance_id in ids:
        served, candidate = results[instance_id]["test-1"], results[instance_id]["test-2"]
        assert set(results[instance_id]) == {"test-1", "test-2"}
        assert served.threshold == 0.5 and candidate.threshold == CANDIDATE_THRESHOLD
        assert candidate.label == ("PNEUMONIA" if candidate.probability >= CANDIDATE_THRESHOLD else "NORMAL")
        # The same weights on the same image (these are 224 px: no resize to differ); its own
        # resize, so it decoded the image itself rather than reuse the served version's input.
        assert candidate.probability == pytest.approx(served.probability, abs=1e-6)
        assert candidate.decode_ms != served.decode_ms
    labels = {v: [results[i][v].label for i in ids] for v in ("test-1", "test-2")}
    assert len(set(labels["test-2"])) == 2, "the threshold should split the candidate's calls"

    queued = finalise(sessions, models, tmp_path)
    with sessions() as session:
        deliveries = session.scalars(select(Delivery)).all()
    assert [(d.model_version, d.instances_reported) for d in deliveries] == [("test-1", len(IMAGES))]
    assert queued == [deliveries[0].id]
    assert withheld_events(sessions) == [
        f"{NAME}@test-2: {len(IMAGES)} image(s), candidate or silent, not sent"]

    with sessions() as session:
        figures = shadow.agreement(session, NAME, "test-1", "test-2")
        assert shadow.shadow_report(session, models) == [figures]
    agree = sum(s == c for s, c in zip(labels["test-1"], labels["test-2"], strict=True))
    assert (figures.images, figures.agree, figures.served_only) == (len(IMAGES), agree, 0)
    assert figures.percent_agree == pytest.approx(100 * agree / len(IMAGES))
    assert figures.kappa == pytest.approx(0.0)  # the served version said positive throughout
    assert figures.candidate_positive == labels["test-2"].count("PNEUMONIA")


def test_clearing_the_candidate_stops_it(sessions, models: Path, tmp_path: Path) -> None:
    registry.mark_candidate(NAME, "test-2", models)
    assert registry.clear_candidate(NAME, models) == "test-2"
    classify_study(sessions, served_classifier(models), tmp_path, IMAGES[:1])
    assert [set(r) for r in results_by_instance(sessions).values()] == [{"test-1"}]


def test_a_candidate_that_refuses_an_image_leaves_only_the_served_result(
    sessions, models: Path, tmp_path: Path
) -> None:
    """The candidate's own pixel check refuses everything (threshold below any score): the served
    answer stands, the candidate has no row, and agreement counts it as served only."""
    import json

    card = models / NAME / "test-2"
    scope = json.loads((card / "card.json").read_text())["scope"]
    detector = card / scope["detector_file"]
    from serving import pixelcheck

    loaded = pixelcheck.load(card, scope["detector_sha256"])
    for path in card.iterdir():
        path.chmod(0o644)
    refusing = pixelcheck.Detector(loaded.layers, loaded.means, loaded.precision, -1.0, 0.0)
    saved = pixelcheck.save(refusing, tmp_path)
    shutil.copyfile(saved, detector)
    scope["detector_sha256"] = registry.sha256_file(detector)
    (card / "card.json").write_text(json.dumps({**json.loads((card / "card.json").read_text()),
                                                "scope": scope}))
    registry.mark_candidate(NAME, "test-2", models)
    ids = classify_study(sessions, served_classifier(models), tmp_path, IMAGES[:2])
    assert [set(results_by_instance(sessions)[i]) for i in ids] == [{"test-1"}, {"test-1"}]
    with sessions() as session:
        states = session.scalars(select(Instance.state)).all()
        figures = shadow.agreement(session, NAME, "test-1", "test-2")
    assert states == ["classified", "classified"]
    assert (figures.images, figures.served_only, figures.percent_agree) == (0, 2, None)


def test_a_silent_version_is_recorded_but_not_sent_until_accepted(
    sessions, models: Path, tmp_path: Path
) -> None:
    registry.mark_served(NAME, "test-1", models, silent=True)
    assert registry.silent_versions(models) == {NAME: "test-1"}
    classifier = served_classifier(models)
    ids = classify_study(sessions, classifier, tmp_path, IMAGES[:2])
    assert [set(results_by_instance(sessions)[i]) for i in ids] == [{"test-1"}, {"test-1"}]
    assert finalise(sessions, models, tmp_path) == []
    assert withheld_events(sessions) == [f"{NAME}@test-1: 2 image(s), candidate or silent, not sent"]

    assert registry.accept_silent(NAME, models) == "test-1"
    with pytest.raises(registry.RegistryError, match="no silent"):
        registry.accept_silent(NAME, models)
    classify_study(sessions, classifier, tmp_path, IMAGES[2:3])
    queued = finalise(sessions, models, tmp_path)
    with sessions() as session:
        deliveries = session.scalars(select(Delivery)).all()
    assert [(d.id, d.model_version, d.instances_reported) for d in deliveries] == [(queued[0], "test-1", 1)]


def test_roles_in_the_registry(models: Path) -> None:
    assert registry.withheld_versions(models) == set()
    assert not (models / registry.ROLES_FILE).exists()  # an older registry: no roles, no file
    with pytest.raises(registry.RegistryError, match="is the served version"):
        registry.mark_candidate(NAME, "test-1", models)
    registry.mark_candidate(NAME, "test-2", models)
    registry.mark_served(NAME, "test-1", models, silent=True)
    assert registry.withheld_versions(models) == {(NAME, "test-1"), (NAME, "test-2")}
    registry.mark_served(NAME, "test-1", models)  # serving without --silent accepts it
    assert registry.withheld_versions(models) == {(NAME, "test-2")}
    registry.mark_served(NAME, "test-2", models)  # the candidate served: no longer a candidate
    assert registry.candidate_versions(models) == {}
    assert registry.served_versions(models) == {NAME: "test-2"}


def test_the_candidate_batches_as_the_served_version_does(models: Path) -> None:
    from worker.inference import Classifier

    served = Classifier(NAME, models, batch_size=4, batch_wait_s=0.005)
    assert classify._candidate_of(served) is None
    registry.mark_candidate(NAME, "test-2", models)
    candidate = classify._candidate_of(served)
    assert candidate is classify._candidate_of(served)  # loaded once
    assert (candidate.version.label, candidate.batch_size, candidate.batch_wait_s) == (
        f"{NAME}@test-2", 4, 0.005)
    registry.clear_candidate(NAME, models)
    assert classify._candidate_of(served) is None
