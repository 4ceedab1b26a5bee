"""`pneumo` commands of the site's labels and the running scorecard: `labels import` (a CSV),
`labels listen` (the RIS's reports over HL7 MLLP) and `scorecard`."""

from __future__ import annotations

import getpass
import json
from pathlib import Path

import typer

from ops.commands.common import command_settings, errors, settings_help, setup_logging
from ops.labels import LabelError

commands = typer.Typer()  # merged into the top level by ops/cli.py (scorecard)
labels_app = typer.Typer(help="Labels from the site: what each study showed.", no_args_is_help=True)


@labels_app.command("import")
@errors(LabelError, FileNotFoundError, IsADirectoryError)
def import_(
    file: Path = typer.Argument(..., help="CSV: study_instance_uid and/or accession_number, label "
                                          "(pneumonia/normal), optional who"),
    who: str = typer.Option("", help="Who gives these labels [default: the signed-in user]"),
) -> None:
    """Record the labels of a CSV; a bad row is one line on stderr, the others are kept."""
    from ops.labels import import_csv
    from ops.status import open_database

    sessions = open_database(command_settings())
    report = import_csv(sessions, file, who or f"{getpass.getuser()} (pneumo labels import)")
    for line in report.errors:
        typer.echo(f"{file.name} {line}", err=True)
    typer.echo(f"imported {report.imported} label(s), refused {len(report.errors)} row(s)")
    raise typer.Exit(1 if report.errors else 0)


@labels_app.command(help=settings_help(
    "The HL7 v2 MLLP listener for the RIS's final reports (ORU^R01), answering AA/AE.", "hl7_host",
    "hl7_port", "hl7_allowed_peers", "home", "database_url"))
@errors()
def listen(port: int = typer.Option(0, help="Port [default: PNEUMO_HL7_PORT]")) -> None:
    """The HL7 v2 MLLP listener for the RIS's final reports (ORU^R01)."""
    import asyncio

    from core.db import session_factory
    from core.lifecycle import EXIT_CANNOT_START, notify_ready
    from ops.dashboard import beyond_loopback
    from ops.hl7_listener import allowed_networks, serve

    setup_logging()
    settings = command_settings()
    if not (port or settings.hl7_port):
        raise typer.BadParameter("no port: set PNEUMO_HL7_PORT or give --port")
    try:
        allowed = allowed_networks(settings.hl7_allowed_peers)
    except ValueError as error:
        typer.echo(f"error: PNEUMO_HL7_ALLOWED_PEERS: {error}", err=True)
        raise typer.Exit(EXIT_CANNOT_START) from None
    if not allowed and beyond_loopback(settings.hl7_host):
        # Labels decide promotions and alerts: an open port would take them from any host.
        typer.echo(f"error: the HL7 listener would take labels from any host on {settings.hl7_host}: set "
                   "PNEUMO_HL7_ALLOWED_PEERS to the RIS interface engine's address(es), or "
                   "PNEUMO_HL7_HOST=127.0.0.1", err=True)
        raise typer.Exit(EXIT_CANNOT_START)
    started = asyncio.Event()

    async def main() -> None:
        task = asyncio.create_task(serve(settings, session_factory(settings.sqlalchemy_url), started,
                                         port or None))
        waiter = asyncio.create_task(started.wait())
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if started.is_set():
            notify_ready()
        await task

    try:
        asyncio.run(main())
    except OSError as error:  # the port is taken: restarting will not help
        typer.echo(f"error: cannot listen for HL7 on port {port or settings.hl7_port}: "
                   f"{error.strerror or error}", err=True)
        raise typer.Exit(EXIT_CANNOT_START) from None
    except KeyboardInterrupt:
        pass


@commands.command(help=settings_help(
    "Sensitivity, specificity, PPV, AUC and calibration of each version on the site's labelled "
    "studies, per ISO week and overall, with intervals and alerts.", "home", "database_url",
    "models_dir", "scorecard_alert_p"))
@errors()
def scorecard(as_json: bool = typer.Option(False, "--json", help="Machine-readable output")) -> None:
    """The running scorecard of each version on the site's labelled studies."""
    from ops.scorecard import build, render_text
    from ops.status import open_database

    settings = command_settings()
    cards = build(open_database(settings), settings)
    if as_json:
        typer.echo(json.dumps([card.as_dict() for card in cards], indent=1))
    else:
        typer.echo(render_text(cards))
