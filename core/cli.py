"""`pneumo`: the one command-line entry point for operators and developers."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

import typer

from core import registry

app = typer.Typer(help="Pneumonia detection on chest radiographs: DICOM node, workers, training.",
                  no_args_is_help=True)
models_app = typer.Typer(help="The model registry in models/.", no_args_is_help=True)
app.add_typer(models_app, name="models")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"
DEFAULT_WEIGHTS = (
    Path(__file__).resolve().parents[2] / "shared" / "weights"
    / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
)


def _logging(verbose: bool = False) -> None:
    from core import logsafe

    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logsafe.install()


@app.command()
def train(
    model: str = typer.Option(..., help="pneumonia-cnn or pneumonia-transfer"),
    data: Path = typer.Option(DEFAULT_DATA, help="Root of {train,val,test}/{NORMAL,PNEUMONIA}"),
    models_dir: Path = typer.Option(registry.DEFAULT_MODELS_DIR, help="Registry folder"),
    backbone: str = typer.Option("mobilenet_v2", help="mobilenet_v2, mobilenet_v2_0.35, xception"),
    weights: str = typer.Option(
        str(DEFAULT_WEIGHTS), help="Backbone weights: a local .h5 file, or 'imagenet' to download"
    ),
    epochs: int = typer.Option(30, help="Phase 1 epochs (then early stopping ends a phase)"),
    fine_tune_epochs: int = typer.Option(6, help="Phase 2 epochs (transfer model only)"),
    fine_tune_layers: int = typer.Option(40, help="Top backbone layers unfrozen in phase 2"),
    batch_size: int = typer.Option(32),
    learning_rate: float = typer.Option(1e-3, help="Phase 1 learning rate"),
    fine_tune_learning_rate: float = typer.Option(1e-4, help="Phase 2 learning rate"),
    seed: int = typer.Option(1337, help="Seed of weights, augmentation and batch order"),
    split_seed: int = typer.Option(
        1337, help="Seed of the patient-level validation split (keep it for ensemble members)"
    ),
    early_stopping_monitor: str = typer.Option(
        "val_auc", help="val_auc or val_loss: the validation metric that stops a phase"
    ),
    augmentation: str = typer.Option(
        "standard", help="standard, or robust (adds gamma, blur, noise and an erased patch)"
    ),
    max_train_images: int = typer.Option(0, help="Cap on training images (smoke runs only)"),
    report_test: bool = typer.Option(
        False, help="Evaluate the test split once, after training, into the card (final report)"
    ),
) -> None:
    """Train a model, choose its threshold on validation and register a new version."""
    from training.train import TrainConfig
    from training.train import train as run_training

    _logging()
    config = TrainConfig(
        model_name=model, backbone=backbone, backbone_weights=weights, epochs=epochs,
        fine_tune_epochs=fine_tune_epochs, fine_tune_layers=fine_tune_layers,
        batch_size=batch_size, learning_rate=learning_rate,
        fine_tune_learning_rate=fine_tune_learning_rate, seed=seed, split_seed=split_seed,
        early_stopping_monitor=early_stopping_monitor, augmentation=augmentation,
        max_train_images=max_train_images or None,
    )
    import sys

    verbose = 1 if sys.stdout.isatty() else 2  # a progress bar on a terminal, a line per epoch in logs
    version = run_training(config, data, models_dir, report_test=report_test, verbose=verbose)
    typer.echo(f"registered {version.label} at {version.path}")


@app.command()
def ensemble(
    model: str = typer.Option(..., help="pneumonia-cnn or pneumonia-transfer"),
    members: list[str] = typer.Argument(..., help="Versions to average (same --split-seed)"),
    data: Path = typer.Option(DEFAULT_DATA, help="Root of {train,val,test}/{NORMAL,PNEUMONIA}"),
    models_dir: Path = typer.Option(registry.DEFAULT_MODELS_DIR, help="Registry folder"),
    report_test: bool = typer.Option(
        False, help="Evaluate the test split once into the card (final report)"
    ),
) -> None:
    """Average registered versions into a new version; threshold chosen on validation."""
    from training.ensemble import build_ensemble

    _logging()
    try:
        version = build_ensemble(model, members, data, models_dir, report_test)
    except registry.RegistryError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    typer.echo(f"registered {version.label} at {version.path}")


@app.command()
def evaluate(
    model: str = typer.Option(..., help="name[@version]; the served version when none is given"),
    data: Path = typer.Option(DEFAULT_DATA, help="Root of {train,val,test}/{NORMAL,PNEUMONIA}"),
    split: str = typer.Option("test", help="train, val or test"),
    models_dir: Path = typer.Option(registry.DEFAULT_MODELS_DIR),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
    plots: Path = typer.Option(None, help="Folder for the ROC and reliability PNGs"),
    record: bool = typer.Option(
        False, help="With --split test: record this as the version's one test report (once)"
    ),
) -> None:
    """Evaluate a registered model on a split at its card's threshold."""
    from training.evaluate import evaluate as run_evaluation
    from training.evaluate import format_table, record_test

    if record and split != "test":
        typer.echo(f"error: --record is for the test split only, not {split!r}", err=True)
        raise typer.Exit(2)
    try:
        if record:
            result = record_test(model, data, models_dir)
        else:
            result = run_evaluation(model, data, split, models_dir, plots)
    except registry.RegistryError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(format_table(result))


@app.command()
def compare(
    model: str = typer.Option(..., help="pneumonia-cnn or pneumonia-transfer"),
    reference: str = typer.Argument(..., help="Version to compare against (e.g. the served one)"),
    candidate: str = typer.Argument(..., help="Version that would replace it"),
    data: Path = typer.Option(DEFAULT_DATA, help="Root of {train,val,test}/{NORMAL,PNEUMONIA}"),
    models_dir: Path = typer.Option(registry.DEFAULT_MODELS_DIR),
    resamples: int = typer.Option(2000, help="Paired bootstrap resamples"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
) -> None:
    """Two versions' validation ROC AUC, the difference and its paired-bootstrap SE, and how firm
    each one's threshold is on the same resamples (no test)."""
    from training.compare import compare as run_compare

    try:
        result = run_compare(model, reference, candidate, data, models_dir, resamples)
    except registry.RegistryError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    low, high = result["difference_ci95"]
    verdict = "non-inferior" if result["non_inferior"] else "worse by more than one SE"
    typer.echo(
        f"validation ({result['validation_images']} images) ROC AUC\n"
        f"  reference {result['reference']:<40} {result['reference_roc_auc']:.4f}\n"
        f"  candidate {result['candidate']:<40} {result['candidate_roc_auc']:.4f}\n"
        f"  difference {result['difference']:+.4f}, bootstrap SE {result['bootstrap_se']:.4f}, "
        f"95% CI {low:+.4f} to {high:+.4f}: candidate is {verdict}"
    )
    typer.echo("threshold (card; Youden on the same resamples, 5-95%)")
    for role in ("reference", "candidate"):
        low, high = result[f"{role}_threshold_range_90"]
        typer.echo(f"  {role} {result[f'{role}_threshold']:.3f} ({low:.3f}-{high:.3f})")


@models_app.command("list")
def models_list(models_dir: Path = typer.Option(registry.DEFAULT_MODELS_DIR)) -> None:
    """Every registered version, its validation/test metrics and which one is served."""
    served = registry.served_versions(models_dir)
    rows = registry.list_versions(models_dir)
    if not rows:
        typer.echo(f"no models in {models_dir}")
        return
    typer.echo(f"{'model':<22} {'version':<18} {'served':<7} {'threshold':>9} "
               f"{'val AUC':>8} {'test acc':>8} {'test AUC':>8}  ensemble of")
    for row in rows:
        test = row.test_metrics
        validation = row.card.get("metrics", {}).get("validation", {})
        mark = "*" if served.get(row.name) == row.version else ""
        members = " ".join(m["label"].split("@")[1] for m in row.card.get("members", []))
        typer.echo(
            f"{row.name:<22} {row.version:<18} {mark:<7} {row.card.get('threshold', 0):>9.4f} "
            f"{validation.get('roc_auc', float('nan')):>8.4f} "
            f"{test.get('accuracy', float('nan')):>8.4f} {test.get('roc_auc', float('nan')):>8.4f}"
            f"  {members}".rstrip()
        )


@models_app.command("serve")
def models_serve(
    name: str, version: str, models_dir: Path = typer.Option(registry.DEFAULT_MODELS_DIR)
) -> None:
    """Mark a version as the one the workers serve."""
    try:
        registry.verify(registry.resolve(f"{name}@{version}", models_dir))
        registry.mark_served(name, version, models_dir)
    except registry.RegistryError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    typer.echo(f"{name}@{version} is now served")


db_app = typer.Typer(help="The database schema (Alembic).", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _settings():
    """The settings of a command that handles patient data: its files are created private."""
    from pydantic import ValidationError

    from core import logsafe
    from core.settings import Settings

    logsafe.private_files()  # stored images, SRs, the database, logs (not models: `train` keeps 022)

    try:
        return Settings()
    except ValidationError as error:
        typer.echo(f"error: invalid settings:\n{error}", err=True)
        raise typer.Exit(2) from error


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the tables on PNEUMO_DATABASE_URL (SQLite in PNEUMO_HOME by default)."""
    from core.migrate import upgrade

    settings = _settings()
    settings.ensure_dirs()
    upgrade(settings.sqlalchemy_url)
    typer.echo(f"database at head: {settings.sqlalchemy_url.split('@')[-1]}")


@app.command()
def run(
    inference_concurrency: int = typer.Option(
        1, help="Inference worker processes (with PNEUMO_INFERENCE_BATCH_SIZE > 1: one process, threads)"
    ),
) -> None:
    """The embedded default: node, workers and scheduler in one supervised process group."""
    from core.supervisor import run as run_all

    _logging()
    try:
        code = run_all(_settings(), inference_concurrency)
    except RuntimeError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    raise typer.Exit(code)


@app.command()
def node() -> None:
    """The DICOM node alone (production: one per site, behind the PACS)."""
    from core.db import session_factory
    from core.tls import TLSConfigError
    from dicom_node.scp import start
    from worker.tasks import classify

    _logging()
    settings = _settings()
    try:
        start(settings, session_factory(settings.sqlalchemy_url),
              lambda instance_id: classify.delay(instance_id), block=True)
    except TLSConfigError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error


@app.command()
def worker(
    queues: str = typer.Option("inference-cpu,delivery,housekeeping", help="Queues to consume"),
    concurrency: int = typer.Option(1),
    pool: str = typer.Option(
        "prefork", help="prefork, or threads for batched inference (PNEUMO_INFERENCE_BATCH_SIZE > 1)"
    ),
) -> None:
    """A Celery worker (use `-Q inference-gpu` on a GPU host)."""
    from worker.celery_app import app as celery_app

    celery_app.worker_main(
        ["worker", "-Q", queues, "-c", str(concurrency), "-P", pool, "--loglevel", "INFO"]
    )


@app.command()
def scheduler() -> None:
    """Celery beat: finalises stable studies and sweeps unqueued instances."""
    from worker.celery_app import app as celery_app

    celery_app.start(["beat", "--loglevel", "INFO"])


@app.command()
def send(
    paths: list[Path] = typer.Argument(..., help="DICOM files, JPEG/PNG images or folders"),
    to: str = typer.Option(..., "--to", help="Destination AE@host:port"),
    calling_ae: str = typer.Option("PNEUMO-SEND", help="Our calling AE title"),
    group: bool = typer.Option(False, help="Wrap all images into one study"),
    tls_ca: Path = typer.Option(None, help="TLS: PEM CA bundle that verifies the node (implies TLS)"),
    tls_cert: Path = typer.Option(None, help="TLS: our PEM client certificate (mutual TLS)"),
    tls_key: Path = typer.Option(None, help="TLS: the unencrypted PEM key of --tls-cert"),
) -> None:
    """Send files to a DICOM node over one association; prints one status line per file."""
    from core import tls
    from core.settings import PeerAddress
    from dicom_node.send import collect
    from dicom_node.send import send as send_files

    total = len(collect(paths))
    failures = 0
    try:
        ssl_context = None
        if tls_ca or tls_cert or tls_key:
            ssl_context = tls.client_context(tls_ca, tls_cert, tls_key,
                                             names=("--tls-ca", "--tls-cert", "--tls-key"))
        for index, result in enumerate(
            send_files(paths, PeerAddress(to), calling_ae, group, ssl_context=ssl_context), start=1
        ):
            status = "no response" if result.status is None else f"0x{result.status:04X}"
            failures += result.status is None or not (result.status == 0 or 0xB000 <= result.status <= 0xBFFF)
            typer.echo(f"[{index}/{total}] {result.path.name}: {status} "
                       f"study {result.study_instance_uid} sop {result.sop_instance_uid}")
    except (ConnectionError, ValueError, tls.TLSConfigError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    typer.echo(f"sent {total - failures}/{total}")
    raise typer.Exit(1 if failures else 0)


@app.command()
def status(last: int = typer.Option(10, help="How many recent studies to list")) -> None:
    """Queue depths, counts by state and the last studies with label, model and delivery."""
    from core.status import render

    typer.echo(render(_settings(), last))


@app.command()
def resend(
    study_instance_uid: str = typer.Argument(..., help="Study whose SR is sent again"),
) -> None:
    """Send a study's SR again (e.g. after a dead-lettered delivery)."""
    from core.status import resend as resend_study

    count = resend_study(_settings(), study_instance_uid)
    if not count:
        typer.echo(f"no SR delivery recorded for study {study_instance_uid}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{count} delivery(ies) queued again")


@app.command()
def dashboard() -> None:
    """The web dashboard for IT on call, /metrics for Prometheus and /healthz (one port)."""
    from core.dashboard import serve

    _logging()
    serve(_settings())


@app.command()
def retention(
    older_than_days: float = typer.Option(..., help="Studies whose SRs were delivered this long ago"),
    apply: bool = typer.Option(False, "--apply", help="Delete; without it, only list (dry run)"),
) -> None:
    """Remove stored images of finished studies (rows, results and SRs stay). Dry run first."""
    from core import retention as policy
    from core.db import session_factory

    _logging()
    settings = _settings()
    sessions = session_factory(settings.sqlalchemy_url)
    with sessions() as session:
        found = policy.candidates(session, older_than_days)
    total = sum(candidate.size_bytes for candidate in found)
    for candidate in found:
        typer.echo(f"{candidate.study_instance_uid}: {len(candidate.files)} file(s)")
    if not apply:
        typer.echo(f"dry run: {len(found)} study(ies), {total / 1e6:.1f} MB would be removed; "
                   "add --apply to delete")
        return
    freed = sum(policy.remove(sessions, candidate) for candidate in found)
    typer.echo(f"removed images of {len(found)} study(ies), {freed / 1e6:.1f} MB freed")


def require_keras_backend() -> None:
    """Keras defaults to TensorFlow and, where it is not installed, fails deep inside its own
    import; a JAX or PyTorch host must say which backend to use, so tell the operator that."""
    if os.environ.get("KERAS_BACKEND") or importlib.util.find_spec("tensorflow") is not None:
        return
    raise SystemExit(
        "pneumo: TensorFlow is not installed and KERAS_BACKEND is not set; set KERAS_BACKEND=jax "
        "or KERAS_BACKEND=torch (whichever this host has), or install the project with TensorFlow"
    )


def main() -> None:
    require_keras_backend()
    app()


if __name__ == "__main__":
    main()
