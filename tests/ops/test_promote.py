"""`pneumo models candidate`, `shadow` and `promote` as an operator runs them, on a database of
classified, labelled studies: a candidate that misses the positives is refused unless forced, one
no worse is promoted; both outcomes are audited, a promotion is recorded with its evidence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from core import registry
from core.db import AuditEvent, Label
from ops import shadow
from ops.send import wrap_image
from tests.conftest import DATA
from tests.ops.test_cli import pneumo
from tests.pipeline.test_delivery import store
from tests.worker.test_shadow import NAME, served_classifier, shadow_registry
from worker import classify

POSITIVE = sorted((DATA / "test" / "PNEUMONIA").iterdir())[:6]  # exact p of 6 of 6 discordant: 1/64
NEGATIVE = sorted((DATA / "test" / "NORMAL").iterdir())[:1]


def labelled_studies(sessions, classifier, tmp_path: Path) -> None:
    """One study per image, classified, each labelled by its Kermany folder (a CSV import's row)."""
    with sessions() as session, session.begin():
        for image in [*POSITIVE, *NEGATIVE]:
            dataset = wrap_image(image)
            classify.classify_instance(sessions, store(dataset, sessions, tmp_path), classifier)
            session.add(Label(study_instance_uid=dataset.StudyInstanceUID, label=image.parent.name,
                              source="csv", who="test", evidence=f"labels.csv:{image.name}"))


def promotion_events(sessions) -> list[tuple[str, str]]:
    with sessions() as session:
        return session.execute(select(AuditEvent.event, AuditEvent.detail)
                               .where(AuditEvent.entity == "model").order_by(AuditEvent.id)).all()


@pytest.mark.parametrize("threshold", [0.9, 0.5], ids=["misses positives", "no worse"])
def test_promote_refuses_a_worse_candidate_unless_forced(
    sessions, database_url: str, tiny_registry: Path, tmp_path: Path, threshold: float
) -> None:
    models = shadow_registry(tiny_registry, tmp_path / "models", threshold, resize=None)
    env = {"PNEUMO_HOME": str(tmp_path / "home"), "PNEUMO_DATABASE_URL": database_url,
           "PNEUMO_MODELS_DIR": str(models)}
    result = pneumo("models", "candidate", NAME, "test-2", env=env)
    assert result.returncode == 0, result.stderr
    labelled_studies(sessions, served_classifier(models), tmp_path)

    result = pneumo("models", "shadow", "--json", env=env)
    assert result.returncode == 0, result.stderr
    (figures,) = json.loads(result.stdout)["candidates"]
    worse = threshold == 0.9  # every probability of the tiny model is about 0.5: all called negative
    assert (figures["images"], figures["percent_agree"]) == (7, 0.0 if worse else 100.0)
    assert figures["labelled"]["studies"] == 7 and figures["labelled"]["positives"] == 6
    assert figures["labelled"]["candidate_sensitivity"] == (0.0 if worse else 1.0)
    listed = pneumo("models", "list", env=env).stdout
    assert any(line.split()[1:3] == ["test-2", "cand"] for line in listed.splitlines()[1:])

    result = pneumo("models", "promote", f"{NAME}@test-2", "--by", "alice", env=env)
    if worse:
        assert result.returncode == 2
        assert "refused: candidate's sensitivity worse beyond noise; --force" in result.stderr
        assert "Traceback" not in result.stderr
        assert registry.served_versions(models) == {NAME: "test-1"}
        assert shadow.promotions(models) == []
        assert [e for e, _ in promotion_events(sessions)] == ["promotion refused"]
        result = pneumo("models", "promote", f"{NAME}@test-2", "--by", "alice", "--force", env=env)
    assert result.returncode == 0, result.stderr
    assert f"{NAME}@test-2 is now served in place of {NAME}@test-1" in result.stdout
    assert registry.served_versions(models) == {NAME: "test-2"}
    assert registry.candidate_versions(models) == {}
    (record,) = shadow.promotions(models)
    assert (record["by"], record["from_version"], record["to_version"], record["forced"]) == (
        "alice", "test-1", "test-2", worse)
    assert record["check"]["studies"] == 7 and record["check"]["refuse"] == worse
    assert record["agreement"]["images"] == 7
    event, detail = promotion_events(sessions)[-1]
    assert event == "promotion promoted"
    assert detail.startswith(f"{NAME}@test-1 -> @test-2 by alice" + (" (forced)" if worse else ""))


def test_promote_without_labels_needs_force(sessions, database_url: str, tiny_registry: Path,
                                            tmp_path: Path) -> None:
    models = shadow_registry(tiny_registry, tmp_path / "models", 0.5, resize=None)
    registry.mark_candidate(NAME, "test-2", models)
    env = {"PNEUMO_HOME": str(tmp_path / "home"), "PNEUMO_DATABASE_URL": database_url,
           "PNEUMO_MODELS_DIR": str(models)}
    result = pneumo("models", "promote", f"{NAME}@test-2", env=env)
    assert result.returncode == 2
    assert "0 positive and 0 negative labelled studies" in result.stderr
    assert registry.served_versions(models) == {NAME: "test-1"}
    result = pneumo("models", "promote", NAME, env=env)
    assert result.returncode == 2 and "NAME@VERSION" in result.stderr
