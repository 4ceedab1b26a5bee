"""The workers' Celery app: core.queue's configuration with the tasks of worker.tasks.

Built by `make_worker_app(settings)`, never at import: `pneumo worker` and `pneumo scheduler`
pass the settings they loaded; `celery -A worker.celery_app` (what `pneumo run` and the compose
file start) reads the module attribute `app`, made on that first access from the environment.
"""

from __future__ import annotations

import logging
import sys
from functools import cache

from celery import Celery
from celery.signals import after_setup_logger

from core import phi
from core.queue import QUEUES, make_app
from core.settings import Settings, SettingsError, load_settings

__all__ = ["QUEUES", "make_worker_app"]


def make_worker_app(settings: Settings) -> Celery:
    """The app a worker or the beat scheduler runs, its tasks registered with these settings."""
    from worker import tasks

    phi.install()  # worker and beat processes: no header value in their logs (see core.phi)
    app = make_app(settings)
    tasks.register(app, settings)
    return app


@cache
def _app_from_environment() -> Celery:
    try:
        settings = load_settings()
    except SettingsError as error:  # the one-line message `pneumo` commands give, not a traceback
        print(f"error: {error}", file=sys.stderr, flush=True)
        raise SystemExit(2) from None
    return make_worker_app(settings)


def __getattr__(name: str) -> Celery:
    """`app`: what `celery -A worker.celery_app` looks up, made when first asked for (PEP 562)."""
    if name == "app":
        return _app_from_environment()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@after_setup_logger.connect
def _quiet_task_trace(**_kwargs) -> None:
    """Per-task 'received'/'succeeded' lines drown the log at one finalise a second; our
    modules log what matters (state changes, failures) themselves."""
    logging.getLogger("celery.app.trace").setLevel(logging.WARNING)
    logging.getLogger("celery.worker.strategy").setLevel(logging.WARNING)
