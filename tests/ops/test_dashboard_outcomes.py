"""What the dashboard and `pneumo status` say about a study that gets no SR, an SR only written to
the folder, and which served model the workers run (issue 16, defects 5 and 11)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from starlette.testclient import TestClient

from core import registry
from core.db import Delivery, DeliveryState, Instance, InstanceState, Result, Series, Study, utcnow
from ops import status
from ops.dashboard import create_app
from tests.ops.test_dashboard import _settings, broker, served_registry  # noqa: F401

IGNORED = "not a chest radiograph: Body Part Examined is SKULL"
FAILED = "cannot decode pixel data: corrupt JPEG 2000 stream"


def _study(session, index: int, states: list[tuple[str, str | None]]) -> int:
    now = utcnow()
    study = Study(study_instance_uid=f"1.2.826.0.1.3680043.10.{index}", accession_number=f"A{index}",
                  first_received_at=now - timedelta(seconds=30),
                  last_received_at=now - timedelta(seconds=index))
    session.add(study)
    session.flush()
    series = Series(study_id=study.id, series_instance_uid=f"1.2.826.0.2.{index}", modality="DX")
    session.add(series)
    session.flush()
    for n, (state, reason) in enumerate(states):
        instance = Instance(
            study_id=study.id, series_id=series.id, sop_instance_uid=f"1.2.826.0.3.{index}.{n}",
            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
            path="/nonexistent", size_bytes=1, sha256="0" * 64, calling_ae_title="MODALITY1",
            state=state, reason=reason, attempts=1, received_at=now - timedelta(seconds=30),
            finished_at=now - timedelta(seconds=29))
        session.add(instance)
        session.flush()
        if state == InstanceState.CLASSIFIED:
            session.add(Result(instance_id=instance.id, model_name="pneumonia-transfer",
                               model_version="v-dash", probability=0.8, threshold=0.5,
                               label="PNEUMONIA", decode_ms=1.0, inference_ms=1.0))
    return study.id


def _populate(sessions) -> None:
    with sessions() as session, session.begin():
        _study(session, 1, [(InstanceState.IGNORED, IGNORED), (InstanceState.IGNORED, IGNORED),
                            (InstanceState.FAILED, FAILED)])
        local = _study(session, 2, [(InstanceState.CLASSIFIED, None)])
        session.add(Delivery(study_id=local, model_name="pneumonia-transfer", model_version="v-dash",
                             destination="local", sr_sop_instance_uid="1.2.826.0.9.2", attempts=1,
                             state=DeliveryState.DELIVERED, delivered_at=utcnow()))
        _study(session, 3, [(InstanceState.CLASSIFIED, None)])  # quiet period not over yet


def test_why_a_study_gets_no_sr_is_shown(
    sessions, database_url: str, served_registry: Path, broker, tmp_path: Path  # noqa: F811
) -> None:
    _populate(sessions)
    settings = _settings(tmp_path, database_url, served_registry)
    page = TestClient(create_app(settings)).get("/").text
    studies = page.split('id="studies"', 1)[1]
    rows = {uid: row for row in studies.split("<tr>")[1:]
            for uid in [f"1.2.826.0.1.3680043.10.{i}" for i in (1, 2, 3)] if uid in row}
    assert f"ignored: {IGNORED} (2 images)" in rows["1.2.826.0.1.3680043.10.1"]
    assert f"failed: {FAILED}" in rows["1.2.826.0.1.3680043.10.1"]
    assert "no SR will be sent: no image was classified" in rows["1.2.826.0.1.3680043.10.1"]
    assert "SR written to folder" in rows["1.2.826.0.1.3680043.10.2"]
    assert ">SR delivered<" not in rows["1.2.826.0.1.3680043.10.2"]
    assert "no SR yet" in rows["1.2.826.0.1.3680043.10.3"]

    text = status.render(settings)
    line = next(line for line in text.splitlines() if "1.2.826.0.1.3680043.10.1" in line)
    assert "no SR will be sent" in line and IGNORED in line and FAILED in line
    assert "SR written to folder" in next(
        line for line in text.splitlines() if "1.2.826.0.1.3680043.10.2" in line)


def test_served_models_say_which_one_the_workers_run(
    sessions, database_url: str, served_registry: Path, broker, tmp_path: Path  # noqa: F811
) -> None:
    """The CNN was listed under "Served models" as if it ran; only PNEUMO_MODEL_NAME runs."""
    import keras

    from training import models

    keras.utils.set_random_seed(1)
    registry.register("pneumonia-cnn", models.build_cnn(filters=(4,), dense_units=2),
                      {"threshold": 0.5}, served_registry, version="c-1")
    registry.mark_served("pneumonia-cnn", "c-1", served_registry)
    page = TestClient(create_app(_settings(tmp_path, database_url, served_registry))).get("/").text
    table = page.split('id="models"', 1)[1].split("</table>", 1)[0]
    rows = {name: row for row in table.split("<tr>")[1:]
            for name in ("pneumonia-transfer", "pneumonia-cnn") if f"<td>{name}</td>" in row}
    assert "run by the workers" in rows["pneumonia-transfer"]
    assert "run by the workers" not in rows["pneumonia-cnn"]
    assert "not run (workers run pneumonia-transfer)" in rows["pneumonia-cnn"]
    assert 'id="model-missing"' not in page

    other = _settings(tmp_path, database_url, served_registry, model_name="pneumonia-ensemble")
    assert "which has no served version" in TestClient(create_app(other)).get("/").text
