"""`pneumo`: the one command-line entry point for operators and developers.

The processes of a site are here (run, node, worker, scheduler); the other commands live by area
in ops/commands/ (models, site, operations), each with the one error decorator of
ops/commands/common.py, and are assembled below in the order `pneumo --help` lists them.
"""

from __future__ import annotations

import os

# Before anything imports TensorFlow: its start-up lines (oneDNN, cpu_feature_guard) reached every
# CLI user's terminal. Errors still print; TF_CPP_MIN_LOG_LEVEL=0 in the environment shows them all.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import typer

from ops.commands import labels, models, operations, site
from ops.commands.common import (
    command_settings,
    errors,
    require_keras_backend,
    settings_help,
    setup_logging,
)

app = typer.Typer(help="Pneumonia detection on chest radiographs: DICOM node, workers, training.",
                  no_args_is_help=True)
processes = typer.Typer()  # the site's processes, merged between the site and operations commands


@processes.command(help=settings_help(
    "The embedded default: node, workers and scheduler in one supervised process group, with the "
    "dashboard.", "home", "ae_title", "host", "port", "allowed_peers", "pacs", "dashboard_host",
    "dashboard_port", "dashboard_token", "models_dir", "model_name", "quiet_seconds", "database_url",
    "broker_url"))
@errors(RuntimeError)  # the supervisor's "cannot start" (embedded Redis, a port taken)
def run(
    inference_concurrency: int = typer.Option(
        1, help="Inference worker processes (with PNEUMO_INFERENCE_BATCH_SIZE > 1: one process, threads)"
    ),
) -> None:
    """The embedded default: node, workers and scheduler in one supervised process group."""
    from ops.supervisor import run as run_all

    setup_logging()
    raise typer.Exit(run_all(command_settings(), inference_concurrency))


@processes.command(help=settings_help(
    "The DICOM node alone (production: one per site, behind the PACS).", "ae_title", "host", "port",
    "allowed_peers", "home", "database_url", "broker_url", "inference_queue", "tls_cert_file",
    "tls_key_file", "tls_ca_file", "min_free_disk_mb", "max_associations"))
@errors()
def node() -> None:
    """The DICOM node alone (production: one per site, behind the PACS)."""
    from core.db import session_factory
    from core.queue import CLASSIFY, task_sender
    from dicom_node.scp import start

    setup_logging()
    settings = command_settings()
    # By task name on the workers' queue: the node imports no worker or model code.
    start(settings, session_factory(settings.sqlalchemy_url), task_sender(settings, CLASSIFY),
          block=True)


@processes.command()
@errors()
def worker(
    queues: str = typer.Option("inference-cpu,delivery,housekeeping", help="Queues to consume"),
    concurrency: int = typer.Option(1),
    pool: str = typer.Option(
        "prefork", help="prefork, or threads for batched inference (PNEUMO_INFERENCE_BATCH_SIZE > 1)"
    ),
) -> None:
    """A Celery worker (on a GPU host: `--queues inference-gpu --pool threads`)."""
    settings = command_settings()
    require_keras_backend()  # it serves the model
    from worker.celery_app import make_worker_app

    make_worker_app(settings).worker_main(
        ["worker", "-Q", queues, "-c", str(concurrency), "-P", pool, "--loglevel", "INFO"]
    )


@processes.command()
@errors()
def scheduler() -> None:
    """Celery beat: finalises stable studies and sweeps unqueued instances."""
    from core import phi
    from core.queue import make_app

    settings = command_settings()
    phi.install()  # as in the workers: no header value in its log
    make_app(settings).start(["beat", "--loglevel", "INFO"])  # sends by name: no tasks, no Keras


# Commands first, in this order, then the groups (typer lists merged commands as added).
for commands in (models.commands, site.commands, processes, operations.commands, labels.commands):
    app.add_typer(commands)
app.add_typer(models.models_app, name="models")
app.add_typer(models.scope_app, name="scope")
app.add_typer(operations.db_app, name="db")
app.add_typer(labels.labels_app, name="labels")


def main() -> None:
    """Commands that load a model check the Keras backend themselves; the others (node, run,
    status, send, dashboard, db, resend, retention) start on a host without TensorFlow."""
    app()


if __name__ == "__main__":
    main()
