"""`pneumo`: the one command-line entry point for operators and developers."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path

# Before anything imports TensorFlow: its start-up lines (oneDNN, cpu_feature_guard) reached every
# CLI user's terminal. Errors still print; TF_CPP_MIN_LOG_LEVEL=0 in the environment shows them all.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import typer

from core import registry
from core.card import SplitMetrics

app = typer.Typer(help="Pneumonia detection on chest radiographs: DICOM node, workers, training.",
                  no_args_is_help=True)
models_app = typer.Typer(help="The model registry in models/.", no_args_is_help=True)
app.add_typer(models_app, name="models")

# Training data and backbone weights of a development machine: `../shared` from the checkout's
# root, where commands are run (relative like PNEUMO_HOME's `var`; never found from this file,
# which an installed product keeps in site-packages). --data and --weights say otherwise.
DEFAULT_DATA = Path("..") / "shared" / "data" / "chest_xray"
DEFAULT_WEIGHTS = (
    Path("..") / "shared" / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
)
MODELS_DIR_HELP = "Registry folder [default: PNEUMO_MODELS_DIR, else ./models]"


def settings_help(summary: str, *names: str) -> str:
    """A command's help with the settings it reads (environment variable, default, what), taken
    from core.settings so the list cannot drift; `run`, `node` and `dashboard` listed none."""
    from pydantic import SecretStr

    from core.settings import Settings

    lines = []
    for name in names:
        field = Settings.model_fields[name]
        default = field.default
        shown = "" if default in (None, "") or isinstance(default, SecretStr) else str(default)
        lines.append(f"PNEUMO_{name.upper()}" + (f" ({shown})" if shown else "")
                     + f": {field.description or ''}".rstrip(": "))
    # One paragraph per setting: typer's help keeps paragraphs apart.
    return summary + "\n\nSettings (environment or PNEUMO_SETTINGS_FILE):\n\n" + "\n\n".join(lines)


def _registry(models_dir: Path | None) -> Path:
    """The registry a command uses: --models-dir, else the PNEUMO_MODELS_DIR setting (its env
    file included), so every model command and the workers read the same folder."""
    if models_dir is not None:
        return models_dir
    from core.settings import SettingsError, load_settings

    try:
        return load_settings().models_dir
    except SettingsError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None


def _logging(verbose: bool = False) -> None:
    from core import logsafe, phi

    phi.install()  # library messages and tracebacks quote header values: scrubbed (core.phi)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logsafe.install()


@app.command()
def train(
    model: str = typer.Option(..., help="pneumonia-cnn or pneumonia-transfer"),
    data: Path = typer.Option(DEFAULT_DATA, help="Root of {train,val,test}/{NORMAL,PNEUMONIA}"),
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
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
    models_dir = _registry(models_dir)
    require_keras_backend()
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
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
    report_test: bool = typer.Option(
        False, help="Evaluate the test split once into the card (final report)"
    ),
) -> None:
    """Average registered versions into a new version; threshold chosen on validation."""
    models_dir = _registry(models_dir)
    require_keras_backend()
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
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
    plots: Path = typer.Option(None, help="Folder for the ROC and reliability PNGs"),
    record: bool = typer.Option(
        False, help="With --split test: record this as the version's one test report (once)"
    ),
) -> None:
    """Evaluate a registered model on a split at its card's threshold."""
    models_dir = _registry(models_dir)
    require_keras_backend()
    from training.data import read_split

    if record and split != "test":
        typer.echo(f"error: --record is for the test split only, not {split!r}", err=True)
        raise typer.Exit(2)
    try:  # the data's layout first: a wrong --data is one line before Keras is even imported
        read_split(data, split)
    except (FileNotFoundError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    from training.evaluate import evaluate as run_evaluation
    from training.evaluate import format_table, record_test

    try:
        if record:
            result = record_test(model, data, models_dir)
        else:
            result = run_evaluation(model, data, split, models_dir, plots)
    except (registry.RegistryError, FileNotFoundError, ValueError) as error:  # ValueError: no images
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
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
    resamples: int = typer.Option(2000, help="Paired bootstrap resamples"),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
) -> None:
    """Two versions' validation ROC AUC, the difference and its paired-bootstrap SE, and how firm
    each one's threshold is on the same resamples (no test)."""
    models_dir = _registry(models_dir)
    require_keras_backend()
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


SITE_DATA_HELP = ("Site folder: labels.csv (file, label, optional patient_id, age, view) and its "
                  "JPEG/PNG/DICOM images, or NORMAL/ and PNEUMONIA/ folders")


@app.command()
def accept(
    model: list[str] = typer.Option(
        ..., help="NAME@VERSION, or NAME for its served version; repeat to compare versions"),
    data: Path = typer.Option(..., help=SITE_DATA_HELP),
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
    out: Path = typer.Option(
        None, help="Folder for the ROC and reliability PNGs (default: ./accept-SITE, SITE the name "
                   "of the --data folder)"),
    as_json: bool = typer.Option(False, "--json", help="Print the whole report as JSON"),
    resamples: int = typer.Option(1000, help="Patient bootstrap resamples of the ROC AUC interval"),
) -> None:
    """Site acceptance report: how many images each version refuses and why, then on the images it
    assesses ROC AUC, accuracy, sensitivity and specificity at its card threshold, overall, per view
    and per age band. 95% intervals: Wilson for proportions, patient bootstrap for the AUC. DICOM
    files go through the worker's filters and decoding."""
    models_dir = _registry(models_dir)
    require_keras_backend()
    _logging()
    from serving.pixelcheck import ScopeError
    from training import site
    from training.accept import accept as run_accept
    from training.accept import format_report
    from worker.scope import decode_site_file

    try:
        report = run_accept(model, data, models_dir, out, decode_site_file, resamples)
    except (registry.RegistryError, site.SiteDataError, ScopeError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))


CALIBRATE_HELP = (
    "Choose a version's threshold on a site's own labelled studies and register it as a new version "
    "(same model file and pixel check, not served).\n\n"
    "The studies are split by patient, stratified by class, into a calibration half and an "
    "evaluation half (--split-seed).\n\n"
    "Threshold rule: Youden's J (sensitivity + specificity - 1) maximised on the calibration half, "
    "the middle of a plateau; on the images the version assesses (not refused), the rule every "
    "version's threshold uses on its validation split.\n\n"
    "The evaluation half is then reported at that threshold as `pneumo accept` reports it, next to "
    "the parent at its own threshold; the evaluation half takes no part in the choice."
)


@app.command(help=CALIBRATE_HELP)
def calibrate(
    model: str = typer.Option(..., help="NAME@VERSION to calibrate"),
    data: Path = typer.Option(..., help=SITE_DATA_HELP),
    split_seed: int = typer.Option(20261202, help="Seed of the split by patient into halves"),
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the whole report as JSON"),
    resamples: int = typer.Option(1000, help="Patient bootstrap resamples of the ROC AUC interval"),
) -> None:
    """A site's own threshold as a new version; the rule is in CALIBRATE_HELP (shown by --help)."""
    models_dir = _registry(models_dir)
    require_keras_backend()
    _logging()
    from serving.pixelcheck import ScopeError
    from training import site
    from training.calibrate import calibrate as run_calibrate
    from training.calibrate import format_report
    from worker.scope import decode_site_file

    try:
        _, report = run_calibrate(model, data, models_dir, split_seed, decode_site_file, resamples)
    except (registry.RegistryError, site.SiteDataError, ScopeError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@models_app.command("list")
def models_list(models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP)) -> None:
    """Every registered version, its validation/test metrics and which one is served."""
    models_dir = _registry(models_dir)
    served = registry.served_versions(models_dir)
    try:
        rows = registry.list_versions(models_dir)
    except registry.CardError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    if not rows:
        typer.echo(f"no models in {models_dir}")
        return
    typer.echo(f"{'model':<22} {'version':<18} {'served':<7} {'threshold':>9} "
               f"{'val AUC':>8} {'test acc':>8} {'test AUC':>8}  ensemble of")
    for row in rows:
        test = row.test_metrics or SplitMetrics()
        validation = row.card.metrics.validation or SplitMetrics()
        mark = "*" if served.get(row.name) == row.version else ""
        members = " ".join(m.label.split("@")[1] for m in row.card.members or [])
        typer.echo(
            f"{row.name:<22} {row.version:<18} {mark:<7} {row.card.threshold:>9.4f} "
            f"{_figure(validation.roc_auc, missing='-')} "
            f"{_figure(test.accuracy)} {_figure(test.roc_auc)}"
            f"  {members}".rstrip()
        )


def _figure(value: float | None, missing: str = "not read") -> str:
    """A metric in an 8-wide column; a test split never read is said so, not printed as `nan`."""
    return f"{value:>8.4f}" if value is not None else f"{missing:>8}"


@models_app.command("serve")
def models_serve(
    name: str, version: str, models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP)
) -> None:
    """Mark a version as the one the workers serve."""
    models_dir = _registry(models_dir)
    try:
        candidate = registry.resolve(f"{name}@{version}", models_dir)
        registry.verify(candidate)
        if candidate.scope is None:
            raise registry.RegistryError(
                f"{candidate.label} has no intended use and pixel check, so the workers could "
                f"not tell what it was validated on; run `pneumo scope fit --model {candidate.label}`")
        registry.mark_served(name, version, models_dir)
    except registry.RegistryError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    typer.echo(f"{name}@{version} is now served")


scope_app = typer.Typer(help="Intended use and pixel check of a model version.", no_args_is_help=True)
app.add_typer(scope_app, name="scope")


@scope_app.command("fit")
def scope_fit(
    model: str = typer.Option(..., help="NAME@VERSION registered before pixel checks existed"),
    false_refusal_rate: float = typer.Option(
        0.01, help="Share of held-out in-scope (validation) images the check may refuse"),
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
) -> None:
    """Fit a version's pixel check on its own training split, threshold on its validation split,
    and record it with its intended use in scope.json (once; the card is not changed)."""
    models_dir = _registry(models_dir)
    require_keras_backend()
    _logging()
    from training.scope import fit_existing

    try:
        version = fit_existing(model, models_dir, false_refusal_rate)
    except registry.RegistryError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    check = version.scope.pixel_check
    typer.echo(f"{version.label}: pixel check threshold {check.threshold:.2f} "
               f"({check.held_out_refused_rate:.1%} of {check.held_out_images} held-out refused)")


@scope_app.command("refit")
def scope_refit(
    model: str = typer.Option(..., help="NAME or NAME@VERSION whose weights the new version keeps"),
    fullres: Path = typer.Option(..., help="Full-resolution originals: <DIR>/train/{NORMAL,PNEUMONIA}"),
    adults: Path = typer.Option(..., help="Another population's labelled images (labels.csv): "
                                "half shown to the check as out of scope, half reported"),
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
) -> None:
    """Register a new version with the same weights, the area resize and a pixel check fitted at
    full resolution; its card records the full-resolution validation. Serve it with `models serve`."""
    models_dir = _registry(models_dir)
    require_keras_backend()
    _logging()
    from training.fullres import refit

    try:
        version = refit(model, fullres, adults, models_dir)
    except (registry.RegistryError, FileNotFoundError, ValueError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    typer.echo(f"registered {version.label} (not served)")


@app.command()
def adapt(
    model: str = typer.Option(..., help="Model name; its served version is the base"),
    site: str = typer.Option(..., help="The site's name, recorded in the card"),
    data: Path = typer.Option(..., help="Site folder: labels.csv (file, label, patient_id, age, view) "
                                        "and the JPEG/PNG/DICOM images it names"),
    epochs: int = typer.Option(10, help="Fine-tuning epochs at most (early stopping on validation)"),
    site_validation_fraction: float = typer.Option(0.25, help="Site patients held for validation"),
    learning_rate: float = typer.Option(3e-5, help="Fine-tuning learning rate"),
    seed: int = typer.Option(1337, help="Weights, augmentation and batch order (not the split)"),
    max_base_images: int = typer.Option(None, hidden=True),
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
) -> None:
    """A new version for the base population and the site's: fine-tuned on both, threshold on
    both sites' validation patients, pixel check refitted on both. Registered, not served:
    accept it on the site's held-back studies (`pneumo accept`), then `pneumo models serve`."""
    models_dir = _registry(models_dir)
    require_keras_backend()
    _logging()
    from training.adapt import AdaptConfig
    from training.adapt import adapt as run_adapt
    from training.site import SiteDataError
    from worker.scope import decode_site_file

    config = AdaptConfig(epochs=epochs, site_validation_fraction=site_validation_fraction,
                         learning_rate=learning_rate, seed=seed, max_base_images=max_base_images)
    try:
        version = run_adapt(model, site, data, models_dir, config, decode_site_file)
    except (registry.RegistryError, SiteDataError, FileNotFoundError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    by_site = version.card.metrics.validation_by_site or {}
    typer.echo(f"registered {version.label} (not served); threshold {version.threshold:.4f}")
    for name, result in by_site.items():
        typer.echo(f"  validation {name}: n {result.n}, ROC AUC {result.roc_auc:.4f}, "
                   f"accuracy {result.accuracy:.4f}")


db_app = typer.Typer(help="The database schema (Alembic).", no_args_is_help=True)
app.add_typer(db_app, name="db")


def _settings():
    """The settings, loaded once here at the start of a command and passed down; invalid ones are
    one line on stderr and exit status 2, the same for every command (no traceback). A command
    that handles patient data creates its files private."""
    from core import logsafe
    from core.settings import SettingsError, load_settings

    logsafe.private_files()  # stored images, SRs, the database, logs (not models: `train` keeps 022)

    try:
        return load_settings()
    except SettingsError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from None


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Create or migrate the tables on PNEUMO_DATABASE_URL (SQLite in PNEUMO_HOME by default)."""
    from core.migrate import upgrade

    settings = _settings()
    settings.ensure_dirs()
    upgrade(settings.sqlalchemy_url)
    typer.echo(f"database at head: {settings.sqlalchemy_url.split('@')[-1]}")


@app.command(help=settings_help(
    "The embedded default: node, workers and scheduler in one supervised process group, with the "
    "dashboard.", "home", "ae_title", "host", "port", "allowed_peers", "pacs", "dashboard_host",
    "dashboard_port", "dashboard_token", "models_dir", "model_name", "quiet_seconds", "database_url",
    "broker_url"))
def run(
    inference_concurrency: int = typer.Option(
        1, help="Inference worker processes (with PNEUMO_INFERENCE_BATCH_SIZE > 1: one process, threads)"
    ),
) -> None:
    """The embedded default: node, workers and scheduler in one supervised process group."""
    from ops.supervisor import run as run_all

    _logging()
    settings = _settings()  # outside the try: typer's Exit is a RuntimeError too
    try:
        code = run_all(settings, inference_concurrency)
    except RuntimeError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    raise typer.Exit(code)


@app.command(help=settings_help(
    "The DICOM node alone (production: one per site, behind the PACS).", "ae_title", "host", "port",
    "allowed_peers", "home", "database_url", "broker_url", "inference_queue", "tls_cert_file",
    "tls_key_file", "tls_ca_file", "min_free_disk_mb", "max_associations"))
def node() -> None:
    """The DICOM node alone (production: one per site, behind the PACS)."""
    from core.db import session_factory
    from core.lifecycle import EXIT_CANNOT_START
    from core.queue import CLASSIFY, task_sender
    from core.tls import TLSConfigError
    from dicom_node.scp import CannotListen, start

    _logging()
    settings = _settings()
    try:
        # By task name on the workers' queue: the node imports no worker or model code.
        start(settings, session_factory(settings.sqlalchemy_url), task_sender(settings, CLASSIFY),
              block=True)
    except TLSConfigError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    except CannotListen as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(EXIT_CANNOT_START) from None


@app.command()
def worker(
    queues: str = typer.Option("inference-cpu,delivery,housekeeping", help="Queues to consume"),
    concurrency: int = typer.Option(1),
    pool: str = typer.Option(
        "prefork", help="prefork, or threads for batched inference (PNEUMO_INFERENCE_BATCH_SIZE > 1)"
    ),
) -> None:
    """A Celery worker (on a GPU host: `--queues inference-gpu --pool threads`)."""
    settings = _settings()
    require_keras_backend()  # it serves the model
    from worker.celery_app import make_worker_app

    make_worker_app(settings).worker_main(
        ["worker", "-Q", queues, "-c", str(concurrency), "-P", pool, "--loglevel", "INFO"]
    )


@app.command()
def scheduler() -> None:
    """Celery beat: finalises stable studies and sweeps unqueued instances."""
    from core import phi
    from core.queue import make_app

    settings = _settings()
    phi.install()  # as in the workers: no header value in its log
    make_app(settings).start(["beat", "--loglevel", "INFO"])  # sends by name: no tasks, no Keras


@app.command()
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
    try:
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
    except (ConnectionError, ValueError, tls.TLSConfigError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    typer.echo(f"sent {total - failures}/{total}")
    raise typer.Exit(1 if failures else 0)


@app.command()
def status(last: int = typer.Option(10, help="How many recent studies to list")) -> None:
    """Queue depths, counts by state and the last studies with label, model and delivery."""
    from ops.status import DatabaseNotFound, render

    try:
        typer.echo(render(_settings(), last))
    except DatabaseNotFound as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None


@app.command()
def resend(
    study_instance_uid: str = typer.Argument(..., help="Study whose SR is sent again"),
) -> None:
    """Send a study's SR again (e.g. after a dead-lettered delivery)."""
    from ops.status import BrokerDown, DatabaseNotFound
    from ops.status import resend as resend_study

    try:
        count = resend_study(_settings(), study_instance_uid)
    except (DatabaseNotFound, BrokerDown) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(1) from None
    if not count:
        typer.echo(f"no SR delivery recorded for study {study_instance_uid}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{count} delivery(ies) queued again")


@app.command(help=settings_help(
    "The web dashboard for IT on call, /metrics for Prometheus and /healthz (one port).",
    "dashboard_host", "dashboard_port", "dashboard_token", "dashboard_token_file",
    "dashboard_tls_cert_file", "dashboard_tls_key_file", "dashboard_trusted_proxies", "home",
    "database_url", "broker_url", "models_dir"))
def dashboard() -> None:
    """The web dashboard for IT on call, /metrics for Prometheus and /healthz (one port)."""
    from core.lifecycle import EXIT_CANNOT_START
    from ops.dashboard import CannotListen, serve

    _logging()
    try:
        serve(_settings())
    except CannotListen as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(EXIT_CANNOT_START) from None


@app.command()
def retention(
    older_than_days: float = typer.Option(..., help="Studies whose SRs were delivered this long ago"),
    apply: bool = typer.Option(False, "--apply", help="Delete; without it, only list (dry run)"),
) -> None:
    """Remove stored images of finished studies (rows, results and SRs stay). Dry run first."""
    from core.db import session_factory
    from ops import retention as policy

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
    """Commands that load a model check the Keras backend themselves; the others (node, run,
    status, send, dashboard, db, resend, retention) start on a host without TensorFlow."""
    app()


if __name__ == "__main__":
    main()
