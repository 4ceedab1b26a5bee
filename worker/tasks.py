"""Thin Celery tasks: take ids, call the job's module (classify, housekeeping, delivery).

Registered on an app by `register(app, settings)` (worker.celery_app.make_worker_app): the
settings a worker loaded at start are passed in, none are read at import.
"""

from __future__ import annotations

import logging
from functools import cache

from celery import Celery
from celery.signals import worker_process_shutdown
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from core.db import session_factory
from core.queue import CLASSIFY, DELIVER, FINALISE, SWEEP
from core.settings import Settings
from worker import delivery, housekeeping

log = logging.getLogger(__name__)


@cache
def _sessions(url: str) -> sessionmaker[Session]:
    return session_factory(url)


def register(app: Celery, settings: Settings) -> None:
    """Add the four tasks to `app`, each reading `settings`."""

    def sessions() -> sessionmaker[Session]:
        return _sessions(settings.sqlalchemy_url)

    def classifier():
        from worker.inference import served_classifier

        return served_classifier(settings.model_name, settings.models_dir,
                                 settings.inference_batch_size, settings.inference_batch_wait_ms / 1000)

    @app.task(name=CLASSIFY, autoretry_for=(OperationalError,), retry_backoff=2,
              max_retries=settings.classify_max_retries)
    def classify(instance_id: int) -> str:
        # Imported here, not at the top: the model code (Keras, TensorFlow: ~300 MiB, seconds to
        # import) stays out of the delivery worker, whose children passed
        # delivery_worker_max_memory_mb with it and were replaced after nearly every SR.
        # An inference worker imports it at boot (worker.celery_app._preload_model_code).
        from worker import classify as classify_job

        return str(classify_job.classify_instance(sessions(), instance_id, classifier, settings.pictures))

    @app.task(name=FINALISE)
    def finalise() -> list[int]:
        return housekeeping.finalise_stable_studies(
            sessions(), settings, lambda delivery_id: deliver.delay(delivery_id)
        )

    @app.task(name=SWEEP)
    def sweep() -> list[int]:
        return housekeeping.sweep(sessions(), lambda instance_id: classify.delay(instance_id))

    @app.task(name=DELIVER, bind=True, max_retries=None)
    def deliver(self, delivery_id: int) -> str:
        """Build and send one SR; exponential backoff, dead-letter after the last attempt.

        Not Celery's autoretry_for/retry_backoff: the attempt count, the next try and `dead` live
        in the delivery's row (shown on the dashboard, kept when a retry message is lost and
        finalise re-queues it), so worker.delivery decides the countdown, not the message's count."""
        outcome = delivery.attempt_delivery(sessions(), delivery_id, settings, send)
        if outcome.retry_in_s is not None:
            raise self.retry(countdown=outcome.retry_in_s, exc=delivery.DeliveryError(outcome.error))
        return outcome.state

    # One pool per worker process (Celery forks its children after this; the pool starts afresh in
    # each): associations to the PACS are reused across SRs and released when idle or at shutdown.
    pacs = delivery.pacs_sender(settings)
    send = pacs.send
    worker_process_shutdown.connect(lambda **_kwargs: pacs.close(), weak=False)
