"""Queues, task names, the timings they must agree on, and the Celery app they run on.

In the ground so that a producer (the node, `pneumo status`/`resend`, the dashboard) sends a task
by name with the workers' routes without importing the worker or its model code. The worker adds
its tasks to the same configuration (worker.celery_app).

Queues: inference-cpu / inference-gpu (the same task; a GPU worker is started with
`-Q inference-gpu`), delivery (SR C-STOREs, slow peers must not block inference) and
housekeeping (finalise stable studies, the sweep).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from celery import Celery

from core.settings import Settings

QUEUES = ("inference-cpu", "inference-gpu", "delivery", "housekeeping")
CLASSIFY = "pneumo.classify"
DELIVER = "pneumo.deliver"
FINALISE = "pneumo.finalise"
SWEEP = "pneumo.sweep"

# Timings that must agree, each derived from the ones it depends on.
DECODE_TIMEOUT_S = 300  # one image decoded in its own child process (worker.isolation)
BATCH_TIMEOUT_S = 300  # one model call; longer means the model is stuck (worker.inference)
# The longest one classify task can hold its message unacked: a decode, then its batch.
TASK_LIMIT_S = DECODE_TIMEOUT_S + BATCH_TIMEOUT_S
# Redis hands an unacked message to another worker after this (a worker vanished without closing
# its channel); shorter than a task's limit would run a slow but live task twice.
VISIBILITY_TIMEOUT_S = TASK_LIMIT_S
# The sweep re-queues an instance queued or processing this long, and finalise re-queues a
# delivery whose message is this old: by then Redis would have redelivered it, so it was lost.
STALE_INSTANCE_S = VISIBILITY_TIMEOUT_S
LOST_DELIVERY_S = VISIBILITY_TIMEOUT_S
# A classify job redelivered more often than this (attempts that never finished) kills workers
# itself (memory, a decoder crash): it fails instead of taking the next worker down.
MAX_WORKER_DEATHS = 3


def make_app(settings: Settings, include: Sequence[str] = ()) -> Celery:
    """The configured app: a producer as it is, a worker's once its tasks are added; all
    configuration here, with the reasons."""
    app = Celery("pneumo", broker=settings.celery_broker_url, include=list(include))
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
        broker_transport_options={"visibility_timeout": VISIBILITY_TIMEOUT_S},
        broker_connection_retry_on_startup=True,
        task_default_queue="inference-cpu",
        task_routes={
            CLASSIFY: {"queue": settings.inference_queue},
            DELIVER: {"queue": "delivery"},
            FINALISE: {"queue": "housekeeping"},
            SWEEP: {"queue": "housekeeping"},
        },
        beat_schedule={
            "finalise-stable-studies": {
                "task": FINALISE,
                "schedule": settings.finalise_interval_s,
                "options": {"expires": settings.finalise_interval_s * 5},
            },
            "sweep-unqueued-instances": {
                "task": SWEEP,
                "schedule": settings.sweep_interval_s,
                "options": {"expires": settings.sweep_interval_s * 5},
            },
        },
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
    )
    return app


def task_sender(settings: Settings, task_name: str, app: Celery | None = None) -> Callable[[int], None]:
    """Queue a task by name on the broker these settings name (routes as the workers have them)."""
    app = app or make_app(settings)
    return lambda object_id: app.send_task(task_name, args=[object_id])


def queue_depths(settings: Settings) -> dict[str, int | str]:
    """Messages waiting per queue (Redis list lengths); 'unreachable' when the broker is down.

    Here, not in ops/status.py, so monitoring and status both read it without importing each other."""
    try:
        with make_app(settings).connection_for_read() as connection:
            client = connection.default_channel.client
            return {queue: int(client.llen(queue)) for queue in QUEUES}
    except Exception as error:  # the status view must work while the broker is down
        return dict.fromkeys(QUEUES, f"unreachable ({type(error).__name__})")
