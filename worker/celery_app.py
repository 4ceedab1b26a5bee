"""The workers' Celery app: core.queue's configuration with the tasks of worker.tasks.

Built by `make_worker_app(settings)`, never at import: `pneumo worker` and `pneumo scheduler`
pass the settings they loaded; `celery -A worker.celery_app` (what `pneumo run` and the compose
file start) reads the module attribute `app`, made on that first access from the environment.
"""

from __future__ import annotations

import logging
import sys
import weakref
from functools import cache

from celery import Celery
from celery.signals import after_setup_logger, celeryd_init, import_modules

from core import phi
from core.queue import QUEUES, make_app
from core.settings import Settings, SettingsError, load_settings

__all__ = ["QUEUES", "make_worker_app"]


_settings_of: weakref.WeakKeyDictionary[Celery, Settings] = weakref.WeakKeyDictionary()


def make_worker_app(settings: Settings) -> Celery:
    """The app a worker or the beat scheduler runs; its tasks are registered with these settings
    when a worker boots (`_register_tasks`), so `celery inspect` and Flower load no model code."""
    phi.install()  # worker and beat processes: no header value in their logs (see core.phi)
    app = make_app(settings)
    _settings_of[app] = settings
    return app


@import_modules.connect
def _register_tasks(sender: Celery, **_kwargs) -> None:
    """Sent when a worker or beat imports its task modules (Celery's loader, at boot)."""
    settings = _settings_of.pop(sender, None)
    if settings is not None:
        from worker import tasks

        tasks.register(sender, settings)


@celeryd_init.connect
def _preload_model_code(options: dict | None = None, **_kwargs) -> None:
    """A worker consuming an inference queue imports the model code at boot, before its pool
    forks, as it did when worker.tasks imported it; a delivery/housekeeping worker never does."""
    queues = (options or {}).get("queues") or ["inference-cpu"]  # no -Q: the default queue
    if isinstance(queues, str):
        queues = queues.split(",")
    if any(queue.startswith("inference") for queue in queues):
        from worker import classify  # noqa: F401 (the import is the point)


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


@after_setup_logger.connect
def _safe_logs(logger: logging.Logger, **_kwargs) -> None:
    """Workers and beat: control characters escaped in log lines, files created private."""
    from core import logsafe

    logsafe.private_files()
    logsafe.install(logger.handlers)
