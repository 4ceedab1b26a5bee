"""`pneumo` commands of the model registry: train, ensemble, evaluate and compare versions, list
and serve them (`models`), and fit or refit their pixel check (`scope`)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from core import registry
from core.card import SplitMetrics
from ops.commands.common import (
    DEFAULT_DATA,
    DEFAULT_WEIGHTS,
    MODELS_DIR_HELP,
    errors,
    registry_dir,
    require_keras_backend,
    setup_logging,
)

commands = typer.Typer()  # merged into the top level by ops/cli.py
models_app = typer.Typer(help="The model registry in models/.", no_args_is_help=True)
scope_app = typer.Typer(help="Intended use and pixel check of a model version.", no_args_is_help=True)


@commands.command()
@errors()
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
    models_dir = registry_dir(models_dir)
    require_keras_backend()
    from training.train import TrainConfig
    from training.train import train as run_training

    setup_logging()
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


@commands.command()
@errors()
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
    models_dir = registry_dir(models_dir)
    require_keras_backend()
    from training.ensemble import build_ensemble

    setup_logging()
    version = build_ensemble(model, members, data, models_dir, report_test)
    typer.echo(f"registered {version.label} at {version.path}")


@commands.command()
@errors(FileNotFoundError, ValueError)  # a wrong --data layout, no images
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
    models_dir = registry_dir(models_dir)
    require_keras_backend()
    from training.data import read_split

    if record and split != "test":
        raise ValueError(f"--record is for the test split only, not {split!r}")
    read_split(data, split)  # the data's layout first: a wrong --data is one line before Keras
    from training.evaluate import evaluate as run_evaluation
    from training.evaluate import format_table, record_test

    if record:
        result = record_test(model, data, models_dir)
    else:
        result = run_evaluation(model, data, split, models_dir, plots)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(format_table(result))


@commands.command()
@errors()
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
    models_dir = registry_dir(models_dir)
    require_keras_backend()
    from training.compare import compare as run_compare

    result = run_compare(model, reference, candidate, data, models_dir, resamples)
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
@errors()
def models_list(models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP)) -> None:
    """Every registered version, its validation/test metrics and which one is served."""
    models_dir = registry_dir(models_dir)
    served = registry.served_versions(models_dir)
    rows = registry.list_versions(models_dir)
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
@errors()
def models_serve(
    name: str, version: str, models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP)
) -> None:
    """Mark a version as the one the workers serve."""
    models_dir = registry_dir(models_dir)
    candidate = registry.resolve(f"{name}@{version}", models_dir)
    registry.verify(candidate)
    if candidate.scope is None:
        raise registry.RegistryError(
            f"{candidate.label} has no intended use and pixel check, so the workers could "
            f"not tell what it was validated on; run `pneumo scope fit --model {candidate.label}`")
    registry.mark_served(name, version, models_dir)
    typer.echo(f"{name}@{version} is now served")


@scope_app.command("fit")
@errors()
def scope_fit(
    model: str = typer.Option(..., help="NAME@VERSION registered before pixel checks existed"),
    false_refusal_rate: float = typer.Option(
        0.01, help="Share of held-out in-scope (validation) images the check may refuse"),
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
) -> None:
    """Fit a version's pixel check on its own training split, threshold on its validation split,
    and record it with its intended use in scope.json (once; the card is not changed)."""
    models_dir = registry_dir(models_dir)
    require_keras_backend()
    setup_logging()
    from training.scope import fit_existing

    version = fit_existing(model, models_dir, false_refusal_rate)
    check = version.scope.pixel_check
    typer.echo(f"{version.label}: pixel check threshold {check.threshold:.2f} "
               f"({check.held_out_refused_rate:.1%} of {check.held_out_images} held-out refused)")


@scope_app.command("refit")
@errors(FileNotFoundError, ValueError)
def scope_refit(
    model: str = typer.Option(..., help="NAME or NAME@VERSION whose weights the new version keeps"),
    fullres: Path = typer.Option(..., help="Full-resolution originals: <DIR>/train/{NORMAL,PNEUMONIA}"),
    adults: Path = typer.Option(..., help="Another population's labelled images (labels.csv): "
                                "half shown to the check as out of scope, half reported"),
    models_dir: Path = typer.Option(None, help=MODELS_DIR_HELP),
) -> None:
    """Register a new version with the same weights, the area resize and a pixel check fitted at
    full resolution; its card records the full-resolution validation. Serve it with `models serve`."""
    models_dir = registry_dir(models_dir)
    require_keras_backend()
    setup_logging()
    from training.fullres import refit

    version = refit(model, fullres, adults, models_dir)
    typer.echo(f"registered {version.label} (not served)")


