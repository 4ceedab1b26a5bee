"""`pneumo` commands for a site's own data: accept versions on it, calibrate a threshold to it,
adapt a version to it. Each decodes DICOM files through the worker's filters."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ops.commands.common import (
    MODELS_DIR_HELP,
    SITE_DATA_HELP,
    errors,
    registry_dir,
    require_keras_backend,
    setup_logging,
)

commands = typer.Typer()  # merged into the top level by ops/cli.py


@commands.command()
@errors()
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
    models_dir = registry_dir(models_dir)
    require_keras_backend()
    setup_logging()
    from training.accept import accept as run_accept
    from training.accept import format_report
    from worker.scope import decode_site_file

    report = run_accept(model, data, models_dir, out, decode_site_file, resamples)
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


@commands.command(help=CALIBRATE_HELP)
@errors()
def calibrate(
    model: str = typer.Option(..., help="NAME@VERSION to calibrate"),
    data: Path = typer.Option(..., help=SITE_DATA_HELP),
    split_seed: int = typer.Option(20261202, help="Seed of the split by patient into halves"),
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print the whole report as JSON"),
    resamples: int = typer.Option(1000, help="Patient bootstrap resamples of the ROC AUC interval"),
) -> None:
    """A site's own threshold as a new version; the rule is in CALIBRATE_HELP (shown by --help)."""
    models_dir = registry_dir(models_dir)
    require_keras_backend()
    setup_logging()
    from training.calibrate import calibrate as run_calibrate
    from training.calibrate import format_report
    from worker.scope import decode_site_file

    _, report = run_calibrate(model, data, models_dir, split_seed, decode_site_file, resamples)
    typer.echo(json.dumps(report, indent=2) if as_json else format_report(report))


@commands.command()
@errors(FileNotFoundError)
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
    models_dir = registry_dir(models_dir)
    require_keras_backend()
    setup_logging()
    from training.adapt import AdaptConfig
    from training.adapt import adapt as run_adapt
    from worker.scope import decode_site_file

    config = AdaptConfig(epochs=epochs, site_validation_fraction=site_validation_fraction,
                         learning_rate=learning_rate, seed=seed, max_base_images=max_base_images)
    version = run_adapt(model, site, data, models_dir, config, decode_site_file)
    by_site = version.card.metrics.validation_by_site or {}
    typer.echo(f"registered {version.label} (not served); threshold {version.threshold:.4f}")
    for name, result in by_site.items():
        typer.echo(f"  validation {name}: n {result.n}, ROC AUC {result.roc_auc:.4f}, "
                   f"accuracy {result.accuracy:.4f}")


