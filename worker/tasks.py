"""Thin Celery tasks: take ids, call worker.pipeline, leave retries to Celery."""

from __future__ import annotations

import logging
from functools import cache
from pathlib import Path

from sqlalchemy.exc import OperationalError

from core import tls
from core.db import session_factory
from core.settings import PeerAddress
from worker import pipeline
from worker.celery_app import app, settings
from worker.delivery import DeliveryError, send_sr
from worker.inference import served_classifier

log = logging.getLogger(__name__)


@cache
def sessions():
    return session_factory(settings.sqlalchemy_url)


def classifier():
    return served_classifier(settings.model_name, settings.models_dir,
                             settings.inference_batch_size, settings.inference_batch_wait_ms / 1000)


@app.task(name="pneumo.classify", autoretry_for=(OperationalError,), retry_backoff=2,
          max_retries=settings.classify_max_retries)
def classify(instance_id: int) -> str:
    return str(pipeline.classify_instance(sessions(), instance_id, classifier))


@app.task(name="pneumo.finalise")
def finalise() -> list[int]:
    return pipeline.finalise_stable_studies(
        sessions(), settings, lambda delivery_id: deliver.delay(delivery_id)
    )


@app.task(name="pneumo.sweep")
def sweep() -> list[int]:
    return pipeline.sweep(sessions(), lambda instance_id: classify.delay(instance_id))


@app.task(name="pneumo.deliver", bind=True, max_retries=None)
def deliver(self, delivery_id: int) -> str:
    """Build and send one SR; exponential backoff, dead-letter after the last attempt."""
    outcome = pipeline.attempt_delivery(sessions(), delivery_id, settings, _send)
    if outcome.retry_in_s is not None:
        raise self.retry(countdown=outcome.retry_in_s, exc=DeliveryError(outcome.error))
    return outcome.state


def _send(path: Path, destination: str) -> None:
    # Built per try: a TLS file fixed after a failure is picked up without a restart.
    send_sr(path, PeerAddress(destination), settings.ae_title, settings.network_timeout_s,
            tls.pacs_context(settings))
