"""`pneumo` commands IT on call runs against a running node: send test images, read the status,
re-send an SR, serve the dashboard, apply the retention policy, migrate the database (`db`)."""

from __future__ import annotations

from pathlib import Path

import typer

from ops.commands.common import command_settings, errors, settings_help, setup_logging

commands = typer.Typer()  # merged into the top level by ops/cli.py
db_app = typer.Typer(help="The database schema (Alembic).", no_args_is_help=True)


@commands.command()
@errors(ConnectionError, ValueError)
def send(
    paths: list[Path] = typer.Argument(..., help="DICOM files, JPEG/PNG images or folders"),
    to: str = typer.Option(..., "--to", help="Destination AE@host:port"),
    calling_ae: str = typer.Option("PNEUMO-SEND", help="Our calling AE title"),
    group: bool = typer.Option(False, help="Wrap all images into one study"),
    tls_ca: Path = typer.Option(None, help="TLS: PEM CA bundle that verifies the node (implies TLS)"),
    tls_cert: Path = typer.Option(None, help="TLS: our PEM client certificate (mutual TLS)"),
    tls_key: Path = typer.Option(None, help="TLS: the unencrypted PEM key of --tls-cert"),
    timeout: float = typer.Option(60, help="Seconds to wait for the connection and each answer"),
) -> None:
    """Send files to a DICOM node over one association; prints one status line per file.

    A file that cannot be read is named with its reason and the others are still sent; the exit
    status is 1 if any file was not stored, 2 if no association could be made.
    """
    from core import tls
    from core.scu import stored
    from core.settings import PeerAddress
    from ops.send import collect
    from ops.send import send as send_files

    total = len(collect(paths))
    failures = 0
    ssl_context = None
    if tls_ca or tls_cert or tls_key:
        ssl_context = tls.client_context(tls_ca, tls_cert, tls_key,
                                         names=("--tls-ca", "--tls-cert", "--tls-key"))
    for index, result in enumerate(
        send_files(paths, PeerAddress(to), calling_ae, group, timeout_s=timeout,
                   ssl_context=ssl_context), start=1
    ):
        failures += result.status is None or not stored(result.status)
        if result.error is not None:
            typer.echo(f"[{index}/{total}] {result.path}: not sent: {result.error}", err=True)
            continue
        status = "no response" if result.status is None else f"0x{result.status:04X}"
        typer.echo(f"[{index}/{total}] {result.path.name}: {status} "
                   f"study {result.study_instance_uid} sop {result.sop_instance_uid}")
    typer.echo(f"sent {total - failures}/{total}")
    raise typer.Exit(1 if failures else 0)


@commands.command()
@errors()
def status(last: int = typer.Option(10, help="How many recent studies to list")) -> None:
    """Queue depths, counts by state and the last studies with label, model and delivery."""
    from ops.status import render

    typer.echo(render(command_settings(), last))


@commands.command()
@errors()
def resend(
    study_instance_uid: str = typer.Argument(..., help="Study whose SR is sent again"),
) -> None:
    """Send a study's SR again (e.g. after a dead-lettered delivery)."""
    from ops.status import resend as resend_study

    count = resend_study(command_settings(), study_instance_uid)
    if not count:
        typer.echo(f"no SR delivery recorded for study {study_instance_uid}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{count} delivery(ies) queued again")


@commands.command(help=settings_help(
    "The web dashboard for IT on call, /metrics for Prometheus and /healthz (one port).",
    "dashboard_host", "dashboard_port", "dashboard_token", "dashboard_token_file",
    "dashboard_tls_cert_file", "dashboard_tls_key_file", "dashboard_trusted_proxies", "home",
    "database_url", "broker_url", "models_dir"))
@errors()
def dashboard() -> None:
    """The web dashboard for IT on call, /metrics for Prometheus and /healthz (one port)."""
    from ops.dashboard import serve

    setup_logging()
    serve(command_settings())


@commands.command()
@errors()
def retention(
    older_than_days: float = typer.Option(..., help="Studies whose SRs were delivered this long ago"),
    apply: bool = typer.Option(False, "--apply", help="Delete; without it, only list (dry run)"),
) -> None:
    """Remove stored images of finished studies (rows, results and SRs stay). Dry run first."""
    from core.db import session_factory
    from ops import retention as policy

    setup_logging()
    settings = command_settings()
    sessions = session_factory(settings.sqlalchemy_url)
    with sessions() as session:
        found = policy.candidates(session, older_than_days)
    reports = policy.old_reports(settings.home_dir, older_than_days)
    total = sum(candidate.size_bytes for candidate in found)
    for candidate in found:
        typer.echo(f"{candidate.study_instance_uid}: {len(candidate.files)} file(s)")
    if not apply:
        typer.echo(f"dry run: {len(found)} study(ies), {total / 1e6:.1f} MB would be removed; "
                   f"{len(reports)} raw HL7 report(s); add --apply to delete")
        return
    settings.spool_dir.mkdir(parents=True, exist_ok=True)
    freed = sum(policy.remove(sessions, candidate, settings.spool_dir, settings.max_inflated_mb << 20)
                for candidate in found)
    for report in reports:
        report.unlink(missing_ok=True)
    typer.echo(f"removed images of {len(found)} study(ies), {freed / 1e6:.1f} MB freed; "
               f"{len(reports)} raw HL7 report(s)")


@db_app.command("upgrade")
@errors()
def db_upgrade() -> None:
    """Create or migrate the tables on PNEUMO_DATABASE_URL (SQLite in PNEUMO_HOME by default)."""
    from core.migrate import upgrade

    settings = command_settings()
    settings.ensure_dirs()
    upgrade(settings.sqlalchemy_url)
    typer.echo(f"database at head: {settings.sqlalchemy_url.split('@')[-1]}")
