"""The one Celery app; all configuration here, with the reasons.

Queues: inference-cpu / inference-gpu (the same task; a GPU worker is started with
`-Q inference-gpu`), delivery (SR C-STOREs, slow peers must not block inference) and
housekeeping (finalise stable studies, the sweep).
"""

from __future__ import annotations

import logging

from celery import Celery
from celery.signals import after_setup_logger

from core import phi
from core.settings import Settings

QUEUES = ("inference-cpu", "inference-gpu", "delivery", "housekeeping")


def make_app(settings: Settings) -> Celery:
    app = Celery("pneumo", broker=settings.celery_broker_url, include=["worker.tasks"])
    app.conf.update(
        # JSON only: whoever can write to the broker must not be able to run code (no pickle).
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        # Ack after the task finishes, requeue if the worker dies: a killed job is redelivered.
        # Tasks are idempotent (unique result per instance and model version), so that is safe.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        # Redelivery of an unacked message after a worker vanishes without closing its channel.
        broker_transport_options={"visibility_timeout": 600},
        broker_connection_retry_on_startup=True,
        task_default_queue="inference-cpu",
        task_routes={
            "pneumo.classify": {"queue": settings.inference_queue},
            "pneumo.deliver": {"queue": "delivery"},
            "pneumo.finalise": {"queue": "housekeeping"},
            "pneumo.sweep": {"queue": "housekeeping"},
        },
        beat_schedule={
            "finalise-stable-studies": {
                "task": "pneumo.finalise",
                "schedule": settings.finalise_interval_s,
                "options": {"expires": settings.finalise_interval_s * 5},
            },
            "sweep-unqueued-instances": {
                "task": "pneumo.sweep",
                "schedule": settings.sweep_interval_s,
                "options": {"expires": settings.sweep_interval_s * 5},
            },
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
    )
    return app


@after_setup_logger.connect
def _quiet_task_trace(**_kwargs) -> None:
    """Per-task 'received'/'succeeded' lines drown the log at one finalise a second; our
    modules log what matters (state changes, failures) themselves."""
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
    logging.getLogger("celery.worker.strategy").setLevel(logging.WARNING)


phi.install()  # worker and beat processes: no header value in their logs (see core.phi)


@after_setup_logger.connect
def _safe_logs(logger: logging.Logger, **_kwargs) -> None:
    """Workers and beat: control characters escaped in log lines, files created private."""
    from core import logsafe

    logsafe.private_files()
    logsafe.install(logger.handlers)


settings = Settings()
app = make_app(settings)
