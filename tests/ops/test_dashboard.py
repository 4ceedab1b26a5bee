"""The dashboard, /metrics and /healthz over a real database (SQLite and PostgreSQL) and the
machine's Redis as the broker; the operator actions queue real Celery messages.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from pydantic import SecretStr
from pydicom import dcmread
from starlette.testclient import TestClient

from core import registry
from core.contract import score_histogram
from core.db import (
    Delivery,
    DeliveryState,
    Instance,
    InstanceState,
    Result,
    Series,
    Study,
    audit,
    utcnow,
)
from core.settings import Settings
from dicom_node.receive import record_refusal
from ops.dashboard import create_app
from ops.drift import psi
from ops.send import wrap_image
from tests.conftest import DATA, REDIS_TEST_URL

BROKER = f"{REDIS_TEST_URL}/8"
TOKEN = "operator-secret-7f3a"
PATIENT = "Doe^Secret"


@pytest.fixture
def broker() -> redis.Redis:
    client = redis.Redis.from_url(BROKER)
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture
def served_registry(tmp_path: Path) -> Path:
    """A served model whose card carries a validation score histogram skewed to the ends."""
    import keras

    from training import models

    folder = tmp_path / "models"
    keras.utils.set_random_seed(1)
    histogram = [50] + [2] * 18 + [50]
    registry.register("pneumonia-transfer", models.build_cnn(filters=(4,), dense_units=2),
                      {"threshold": 0.5, "validation_score_histogram": histogram,
                       "metrics": {"test": {"accuracy": 0.917, "roc_auc": 0.97,
                                            "sensitivity": 0.987, "specificity": 0.799}}},
                      folder, version="v-dash")
    return folder


def _image(tmp_path: Path, name: str) -> Path:
    dataset = wrap_image(sorted((DATA / "test" / "NORMAL").iterdir())[0])
    dataset.PatientName = PATIENT
    path = tmp_path / f"{name}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path


def _populate(sessions, tmp_path: Path, probabilities: list[float]) -> dict[str, int]:
    """One delivered study with results, one failed instance, one dead-lettered delivery."""
    now = utcnow()
    ids = {}
    with sessions() as session, session.begin():
        for index, (state, reason) in enumerate([
            (InstanceState.CLASSIFIED, None),
            (InstanceState.FAILED, "cannot decode pixel data: corrupt JPEG 2000 stream"),
        ]):
            study = Study(study_instance_uid=f"1.2.826.0.1.{index}", accession_number=f"ACC{index}",
                          first_received_at=now - timedelta(seconds=30), last_received_at=now)
            session.add(study)
            session.flush()
            series = Series(study_id=study.id, series_instance_uid=f"1.2.826.0.2.{index}", modality="DX")
            session.add(series)
            session.flush()
            instance = Instance(
                study_id=study.id, series_id=series.id, sop_instance_uid=f"1.2.826.0.3.{index}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
                path=str(_image(tmp_path, f"i{index}")), size_bytes=1, sha256="0" * 64,
                calling_ae_title="MODALITY1", state=state, reason=reason, attempts=1,
                received_at=now - timedelta(seconds=30), finished_at=now - timedelta(seconds=28),
            )
            session.add(instance)
            session.flush()
            ids[str(state)] = instance.id
            ids[f"study{index}"], ids[f"series{index}"] = study.id, series.id
        for n, p in enumerate(probabilities):
            # Extra results on the classified instance's study, each on its own instance.
            extra = Instance(
                study_id=ids["study0"], series_id=ids["series0"], sop_instance_uid=f"1.2.826.0.4.{n}",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", transfer_syntax_uid="1.2.840.10008.1.2.1",
                path="/nonexistent", size_bytes=1, sha256="0" * 64, calling_ae_title="MODALITY1",
                state=InstanceState.CLASSIFIED, attempts=1, received_at=now - timedelta(seconds=30),
                finished_at=now - timedelta(seconds=29),
            )
            session.add(extra)
            session.flush()
            session.add(Result(instance_id=extra.id, model_name="pneumonia-transfer", model_version="v-dash",
                               probability=p, threshold=0.5, label="PNEUMONIA" if p >= 0.5 else "NORMAL",
                               decode_ms=1.0, inference_ms=1.0))
        dead = Delivery(study_id=ids["study0"], model_name="pneumonia-transfer", model_version="v-dash",
                        destination="PACS@127.0.0.1:1", sr_sop_instance_uid="1.2.826.0.9", attempts=6,
                        state=DeliveryState.DEAD, last_error="association with PACS failed")
        session.add(dead)
        session.flush()
        audit(session, "delivery", dead.id, "retrying", "down")
        audit(session, "delivery", dead.id, "dead", "down")
        ids["dead"] = dead.id
    return ids


def _settings(tmp_path: Path, database_url: str, models_dir: Path, **extra) -> Settings:
    return Settings(home=tmp_path / "home", database_url=database_url, broker_url=BROKER,
                    models_dir=models_dir, dashboard_token=TOKEN, **extra)


def test_page_lists_studies_failures_and_models_without_patient_names(
    sessions, database_url: str, served_registry: Path, broker, tmp_path: Path
) -> None:
    _populate(sessions, tmp_path, [0.9, 0.2])
    client = TestClient(create_app(_settings(tmp_path, database_url, served_registry)))
    page = client.get("/").text
    assert "1.2.826.0.1.0" in page and "ACC0" in page  # recent study with accession
    assert "corrupt JPEG 2000 stream" in page  # failure reason
    assert "association with PACS failed" in page  # dead delivery with its error
    assert "v-dash" in page and "0.917" in page  # served version and its card's test accuracy
    assert PATIENT not in page

    named = TestClient(create_app(
        _settings(tmp_path, database_url, served_registry, show_patient_names=True)))
    assert PATIENT in named.get("/").text


def test_served_version_shows_a_test_look_recorded_after_registration(
    sessions, database_url: str, served_registry: Path, broker, tmp_path: Path
) -> None:
    """A candidate served by a validation rule has its test figures in test_report.json."""
    from training import models

    later = registry.register("pneumonia-transfer", models.build_cnn(filters=(4,), dense_units=2),
                              {"threshold": 0.184}, served_registry, version="v-later")
    registry.record_test_report(later, {"metrics": {"accuracy": 0.8798, "roc_auc": 0.9704,
                                                    "sensitivity": 0.9923, "specificity": 0.6923}})
    registry.mark_served("pneumonia-transfer", "v-later", served_registry)
    page = TestClient(create_app(_settings(tmp_path, database_url, served_registry))).get("/").text
    row = page.split('id="models"', 1)[1].split("</table>", 1)[0]
    assert "v-later" in row and "0.880" in row and "0.692" in row
    assert "not reported" not in row


def test_state_changing_actions_need_the_token(
    sessions, database_url: str, served_registry: Path, broker, tmp_path: Path
) -> None:
    ids = _populate(sessions, tmp_path, [])
    client = TestClient(create_app(_settings(tmp_path, database_url, served_registry)))
    resend = f"/deliveries/{ids['dead']}/resend"

    assert client.post(resend).status_code == 401
    assert client.post(resend, headers={"Authorization": "Bearer wrong"}).status_code == 401
    refused = client.post("/login", data={"token": "wrong"}, follow_redirects=True)
    assert "Sign-in refused" in refused.text
    with sessions() as session:
        assert session.get(Delivery, ids["dead"]).state == DeliveryState.DEAD
    assert broker.llen("delivery") == 0

    client.post("/login", data={"token": TOKEN})  # the cookie carries the token from now on
    assert client.post(resend, follow_redirects=False).status_code == 303
    with sessions() as session:
        delivery = session.get(Delivery, ids["dead"])
        assert (delivery.state, delivery.attempts) == (DeliveryState.PENDING, 0)
    message = json.loads(broker.lindex("delivery", 0))
    assert message["headers"]["task"] == "pneumo.deliver"
    assert message["headers"]["argsrepr"] == f"[{ids['dead']}]"

    failed = ids[str(InstanceState.FAILED)]
    assert "queued again" in client.post(f"/instances/{failed}/rerun", follow_redirects=True).text
    with sessions() as session:
        instance = session.get(Instance, failed)
        assert (instance.state, instance.reason, instance.attempts) == (InstanceState.QUEUED, None, 0)
    assert broker.llen("inference-cpu") == 1
    classified = ids[str(InstanceState.CLASSIFIED)]
    assert "not a failed instance" in client.post(
        f"/instances/{classified}/rerun", follow_redirects=True).text


def test_actions_disabled_without_a_configured_token(
    sessions, database_url: str, served_registry: Path, broker, tmp_path: Path
) -> None:
    ids = _populate(sessions, tmp_path, [])
    settings = _settings(tmp_path, database_url, served_registry)
    settings.dashboard_token = SecretStr("")
    client = TestClient(create_app(settings))
    page = client.get("/").text
    assert "disabled" in page
    # No button that can only answer 401 (issue 22: Re-run showed with no token configured).
    assert f'id="rerun-{ids[str(InstanceState.FAILED)]}"' not in page
    assert f'id="resend-{ids["dead"]}"' not in page
    with_token = TestClient(create_app(_settings(tmp_path, database_url, served_registry))).get("/").text
    assert f'id="rerun-{ids[str(InstanceState.FAILED)]}"' in with_token
    assert f'id="resend-{ids["dead"]}"' in with_token
    assert client.post(f"/deliveries/{ids['dead']}/resend",
                       headers={"Authorization": "Bearer "}).status_code == 401


def _metric(text: str, prefix: str) -> float:
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(lines) == 1, (prefix, lines)
    return float(lines[0].rsplit(" ", 1)[1])


def test_metrics_export_counts_latency_models_and_drift(
    sessions, database_url: str, served_registry: Path, broker, tmp_path: Path
) -> None:
    # 30 production scores all in the middle: far from the card's validation histogram.
    _populate(sessions, tmp_path, [0.45] * 15 + [0.55] * 15)
    record_refusal(sessions, "MODALITY1", 0xC210, "not a readable DICOM dataset: InvalidDicomError")
    broker.rpush("inference-cpu", "x", "y")
    text = TestClient(create_app(_settings(tmp_path, database_url, served_registry))).get("/metrics").text

    assert _metric(text, 'pneumo_cstore_total{calling_ae="MODALITY1",status="0x0000"}') == 32
    assert _metric(text, 'pneumo_cstore_total{calling_ae="MODALITY1",status="0xC210"}') == 1
    assert _metric(text, 'pneumo_cstore_refused_by_reason_total{reason="not a readable DICOM dataset"}') == 1
    assert _metric(text, 'pneumo_instances{state="failed"}') == 1
    assert _metric(text, 'pneumo_queue_depth{queue="inference-cpu"}') == 2
    assert _metric(text, 'pneumo_deliveries{state="dead"}') == 1
    assert _metric(text, "pneumo_dead_letters_total") == 1
    assert _metric(text, "pneumo_delivery_retries_total") == 1
    assert _metric(text, 'pneumo_results_total{label="PNEUMONIA",model="pneumonia-transfer",'
                         'version="v-dash"}') == 15
    assert _metric(text, 'pneumo_stage_latency_seconds_count{stage="received_to_classified"}') == 31
    assert _metric(text, 'pneumo_stage_latency_seconds_bucket{le="1.0",stage="received_to_classified"}') == 30
    assert 'pneumo_served_model_info{model="pneumonia-transfer"' in text and 'version="v-dash"' in text
    assert _metric(text, 'pneumo_model_positive_rate_24h{model="pneumonia-transfer",version="v-dash"}') == 0.5
    assert _metric(text, 'pneumo_model_score_psi_24h{model="pneumonia-transfer",version="v-dash"}') > 1
    assert _metric(text, 'pneumo_model_drift_alert{model="pneumonia-transfer",version="v-dash"}') == 1
    assert _metric(text, "pneumo_storage_free_bytes") > 0


def test_disk_floor_and_database_outage_are_shown(
    sessions, database_url: str, served_registry: Path, broker, tmp_path: Path
) -> None:
    full = _settings(tmp_path, database_url, served_registry, min_free_disk_mb=10**9)
    client = TestClient(create_app(full))
    assert "Refusing images (0xA700" in client.get("/").text
    assert client.get("/healthz").json()["accepting_images"] is False

    down = _settings(tmp_path, "postgresql+psycopg://nobody@127.0.0.1:1/none", served_registry)
    client = TestClient(create_app(down))
    assert client.get("/healthz").status_code == 503
    assert "Database unreachable" in client.get("/").text
    assert _metric(client.get("/metrics").text, "pneumo_database_up") == 0


def test_psi_is_zero_for_the_same_distribution_and_large_for_a_shift() -> None:
    validation = score_histogram([i / 100 for i in range(100)])
    assert psi(validation, validation) == pytest.approx(0)
    assert psi(validation, score_histogram([i / 200 for i in range(100)])) > 0.25  # all below 0.5
    assert sum(score_histogram([0.0, 0.999, 1.0])) == 3


def test_stored_file_still_has_the_name(tmp_path: Path) -> None:
    """Guard for the test above: the name is in the file, so its absence on the page means something."""
    assert str(dcmread(_image(tmp_path, "x")).PatientName) == PATIENT
