"""`pneumo`: the one command-line entry point for operators and developers."""

from __future__ import annotations

import json
import logging
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
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def train(
    model: str = typer.Option(..., help="pneumonia-cnn or pneumonia-transfer"),
    data: Path = typer.Option(DEFAULT_DATA, help="Root of {train,val,test}/{NORMAL,PNEUMONIA}"),
    models_dir: Path = typer.Option(registry.DEFAULT_MODELS_DIR, help="Registry folder"),
    backbone: str = typer.Option("mobilenet_v2", help="mobilenet_v2, mobilenet_v2_0.35, xception"),
    weights: str = typer.Option(
        str(DEFAULT_WEIGHTS), help="Backbone weights: a local .h5 file, or 'imagenet' to download"
    ),
    epochs: int = typer.Option(30, help="Phase 1 epochs (early stopping on validation AUC)"),
    fine_tune_epochs: int = typer.Option(6, help="Phase 2 epochs (transfer model only)"),
    fine_tune_layers: int = typer.Option(40, help="Top backbone layers unfrozen in phase 2"),
    batch_size: int = typer.Option(32),
    learning_rate: float = typer.Option(1e-3, help="Phase 1 learning rate"),
    fine_tune_learning_rate: float = typer.Option(1e-4, help="Phase 2 learning rate"),
    seed: int = typer.Option(1337),
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
        fine_tune_learning_rate=fine_tune_learning_rate, seed=seed,
        max_train_images=max_train_images or None,
    )
    version = run_training(config, data, models_dir, report_test=report_test)
    typer.echo(f"registered {version.label} at {version.path}")


@app.command()
def evaluate(
    model: str = typer.Option(..., help="name[@version]; the served version when none is given"),
    data: Path = typer.Option(DEFAULT_DATA, help="Root of {train,val,test}/{NORMAL,PNEUMONIA}"),
    split: str = typer.Option("test", help="train, val or test"),
    models_dir: Path = typer.Option(registry.DEFAULT_MODELS_DIR),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table"),
    plots: Path = typer.Option(None, help="Folder for the ROC and reliability PNGs"),
) -> None:
    """Evaluate a registered model on a split at its card's threshold."""
    from training.evaluate import evaluate as run_evaluation
    from training.evaluate import format_table

    try:
        result = run_evaluation(model, data, split, models_dir, plots)
    except registry.RegistryError as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2) from error
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        typer.echo(format_table(result))


@models_app.command("list")
def models_list(models_dir: Path = typer.Option(registry.DEFAULT_MODELS_DIR)) -> None:
    """Every registered version, its validation/test metrics and which one is served."""
    served = registry.served_versions(models_dir)
    rows = registry.list_versions(models_dir)
    if not rows:
        typer.echo(f"no models in {models_dir}")
        return
    typer.echo(f"{'model':<22} {'version':<18} {'served':<7} {'threshold':>9} "
               f"{'val AUC':>8} {'test acc':>8} {'test AUC':>8}")
    for row in rows:
        test = row.card.get("metrics", {}).get("test", {})
        validation = row.card.get("metrics", {}).get("validation", {})
        mark = "*" if served.get(row.name) == row.version else ""
        typer.echo(
            f"{row.name:<22} {row.version:<18} {mark:<7} {row.card.get('threshold', 0):>9.4f} "
            f"{validation.get('roc_auc', float('nan')):>8.4f} "
            f"{test.get('accuracy', float('nan')):>8.4f} {test.get('roc_auc', float('nan')):>8.4f}"
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


if __name__ == "__main__":
    app()
