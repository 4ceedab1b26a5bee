"""Train one model, choose its threshold on validation, report test once, register the version.

Reads top to bottom like a keras-io example: data -> model -> phase 1 -> (phase 2) -> threshold
-> card -> registry.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import numpy as np

from core import contract, registry
from serving import pixelcheck
from serving.image import preprocess_many
from training import data, metrics, models
from training.pipeline import fit_inputs

log = logging.getLogger(__name__)

MODEL_NAMES = ("pneumonia-cnn", "pneumonia-transfer")


@dataclass
class TrainConfig:
    """Hyper-parameters; all land in the card."""

    model_name: str
    backbone: str = "mobilenet_v2"
    backbone_weights: str = "imagenet"
    epochs: int = 30
    fine_tune_epochs: int = 6
    fine_tune_layers: int = 40
    batch_size: int = 32
    learning_rate: float = 1e-3
    fine_tune_learning_rate: float = 1e-4
    dropout_rate: float = 0.3
    label_smoothing: float = 0.05
    augmentation: str = "standard"  # a key of models.AUGMENTATIONS
    early_stopping_patience: int = 4
    early_stopping_monitor: str = "val_auc"  # or val_loss; the best epoch's weights are restored
    validation_fraction: float = 0.15
    seed: int = 1337  # weights, augmentation and batch order
    split_seed: int = 1337  # which patients form validation; kept fixed across ensemble members
    max_train_images: int | None = None  # tests only: cap the training images
    notes: dict[str, Any] = field(default_factory=dict)


@dataclass
class Split:
    images: np.ndarray
    labels: np.ndarray
    samples: list[data.Sample]


def load_split(samples: list[data.Sample]) -> Split:
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return Split(preprocess_many([s.path for s in samples]), labels, samples)


def code_commit() -> str:
    """The git commit of this code, '+dirty' when tracked code (not models/) has changes.

    Where there is no git checkout (a container image, a copy sent to a GPU host), the commit
    the copy was made from comes from PNEUMO_CODE_COMMIT, marked as declared rather than read.
    """
    here = Path(__file__).resolve()
    try:
        # Only a checkout that tracks this very file: an installed copy in site-packages (even one
        # inside some other repository, a venv in a checkout) has no commit of its own.
        subprocess.run(["git", "ls-files", "--error-unmatch", here.name], cwd=here.parent,
                       capture_output=True, check=True)
        root = Path(subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=here.parent, capture_output=True, text=True,
            check=True,
        ).stdout.strip())
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!models"],
            cwd=root, capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        declared = os.environ.get("PNEUMO_CODE_COMMIT")
        return f"{declared} (declared, no git checkout)" if declared else "unknown"
    return commit + ("+dirty" if dirty else "")


def compute_device() -> str:
    """What the training ran on, for the card (wall time means little without it)."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if device.platform != "cpu":
            return f"{device.platform}: {device.device_kind}"
    elif backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if gpus:
            details = tf.config.experimental.get_device_details(gpus[0])
            return f"gpu: {details.get('device_name', gpus[0].name)}"
    elif backend == "torch":
        import torch

        if torch.cuda.is_available():
            return f"gpu: {torch.cuda.get_device_name(0)}"
    return f"cpu: {os.cpu_count()} cores"


def weights_description(weights: str) -> dict[str, str]:
    """Where the backbone weights came from, with the file's hash when it is a local file."""
    if weights == "imagenet":
        return {"source": "imagenet (Keras download)", "sha256": "not recorded"}
    return {"source": Path(weights).name, "sha256": registry.sha256_file(Path(weights))}


def build(config: TrainConfig) -> keras.Model:
    if config.model_name == "pneumonia-cnn":
        return models.build_cnn(dropout_rate=max(config.dropout_rate, 0.0))
    if config.model_name == "pneumonia-transfer":
        return models.build_transfer(config.backbone, config.backbone_weights, config.dropout_rate)
    raise ValueError(f"model_name must be one of {MODEL_NAMES}, got {config.model_name!r}")


def compile_for_training(model: keras.Model, learning_rate: float, smoothing: float) -> None:
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.BinaryCrossentropy(label_smoothing=smoothing),
        metrics=[keras.metrics.BinaryAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
    )


def fit_phase(
    training_model: keras.Model,
    train: Split,
    validation: Split,
    config: TrainConfig,
    epochs: int,
    class_weight: dict[int, float] | None,
    verbose: int,
    train_weights: np.ndarray | None = None,
    validation_weights: np.ndarray | None = None,
) -> dict[str, list[float]]:
    """One `fit` with early stopping on a validation metric (best weights restored); per-image
    weights (adapt) instead of class weights when given."""
    callbacks = [
        keras.callbacks.EarlyStopping(
            monitor=config.early_stopping_monitor,
            mode="min" if config.early_stopping_monitor.endswith("loss") else "max",
            patience=config.early_stopping_patience,
            restore_best_weights=True,
        ),
        keras.callbacks.ReduceLROnPlateau(
            monitor="val_loss", factor=0.3, patience=2, min_lr=1e-6
        ),
    ]
    validation_inputs = fit_inputs(validation.images, validation.labels, config.batch_size, 0, False,
                                   validation_weights)
    validation_data = (
        validation_inputs["x"]
        if "y" not in validation_inputs
        else tuple(validation_inputs[k] for k in ("x", "y", "sample_weight") if k in validation_inputs)
    )
    history = training_model.fit(
        **fit_inputs(train.images, train.labels, config.batch_size, config.seed, True, train_weights),
        validation_data=validation_data,
        epochs=epochs,
        class_weight=class_weight,
        callbacks=callbacks,
        verbose=verbose,
    )
    return {key: [float(v) for v in values] for key, values in history.history.items()}


def fit_head_on_features(
    model: keras.Model,
    train: Split,
    validation: Split,
    config: TrainConfig,
    class_weight: dict[int, float],
    verbose: int,
) -> dict[str, list[float]]:
    """Phase 1 of the transfer model: the new head alone, on pooled backbone features."""
    features = keras.Model(model.input, model.get_layer("pool").output)
    head_input = keras.Input(shape=features.output.shape[1:], name="features")
    head_output = model.get_layer("pneumonia_probability")(model.get_layer("head_dropout")(head_input))
    head = keras.Model(head_input, head_output, name="head")  # shares the model's head weights
    compile_for_training(head, config.learning_rate, config.label_smoothing)
    train_features = Split(predict(features, train.images, flatten=False), train.labels, train.samples)
    validation_features = Split(
        predict(features, validation.images, flatten=False), validation.labels, validation.samples
    )
    return fit_phase(
        head, train_features, validation_features, config, config.epochs, class_weight, verbose
    )


def predict(model: keras.Model, images: np.ndarray, flatten: bool = True) -> np.ndarray:
    output = np.asarray(model.predict(images, batch_size=64, verbose=0))
    return output.reshape(-1) if flatten else output


def train(
    config: TrainConfig,
    data_root: Path,
    models_dir: Path = registry.DEFAULT_MODELS_DIR,
    report_test: bool = False,
    verbose: int = 2,
) -> registry.ModelVersion:
    """The whole run; returns the registered version."""
    started = time.monotonic()
    commit = code_commit()  # now: the code that runs, not whatever is checked out at the end
    keras.utils.set_random_seed(config.seed)

    # Data: train/ only, duplicates dropped, validation carved by patient.
    carved = data.carve_validation(data_root, config.validation_fraction, config.split_seed)
    all_train, duplicate_count = carved.all_train, carved.duplicates_dropped
    train_samples, validation_samples = carved.train, carved.validation
    if config.max_train_images:
        rng = np.random.default_rng(config.seed)
        keep = sorted(rng.choice(len(train_samples), config.max_train_images, replace=False))
        train_samples = [train_samples[i] for i in keep]
        validation_samples = validation_samples[:: max(1, len(validation_samples) // 24)]
    class_weight = data.class_weights(train_samples)
    log.info(
        "data: %d train, %d validation images (%d duplicates dropped), class weights %s",
        len(train_samples), len(validation_samples), duplicate_count, class_weight,
    )
    train_split, validation_split = load_split(train_samples), load_split(validation_samples)

    # Model and phase 1.
    model = build(config)
    training_model = models.with_augmentation(model, config.seed, config.augmentation)
    if config.model_name == "pneumonia-transfer":
        # Backbone frozen: train the head on features computed once (no augmentation), which
        # costs one forward pass instead of one per epoch.
        history = {"phase1": fit_head_on_features(
            model, train_split, validation_split, config, class_weight, verbose
        )}
    else:
        compile_for_training(training_model, config.learning_rate, config.label_smoothing)
        history = {"phase1": fit_phase(
            training_model, train_split, validation_split, config, config.epochs, class_weight,
            verbose,
        )}
    epochs_run = len(history["phase1"]["loss"])

    # Phase 2: fine-tune the top backbone blocks at a low learning rate, with augmentation.
    if config.model_name == "pneumonia-transfer" and config.fine_tune_epochs > 0:
        unfrozen = models.unfreeze_top(model, config.fine_tune_layers)
        log.info("phase 2: %d backbone layers with weights unfrozen", unfrozen)
        compile_for_training(
            training_model, config.fine_tune_learning_rate, config.label_smoothing
        )
        history["phase2"] = fit_phase(
            training_model, train_split, validation_split, config,
            config.fine_tune_epochs, class_weight, verbose,
        )
        epochs_run += len(history["phase2"]["loss"])
    train_seconds = time.monotonic() - started

    card: dict[str, Any] = {
        **provenance(model, commit),
        "hyper_parameters": asdict(config),
        "backbone": (
            {"name": config.backbone, "weights": weights_description(config.backbone_weights)}
            if config.model_name == "pneumonia-transfer" else None
        ),
        "data": {
            "root": str(data_root),
            "train_fingerprint": data.fingerprint(all_train, data_root),
            "train_images": len(train_samples),
            "validation_images": len(validation_samples),
            "duplicates_dropped": duplicate_count,
            "validation_split": (
                f"{config.validation_fraction:.0%} of train/ patients per class, "
                f"seed {config.split_seed}"
            ),
        },
        "class_imbalance": "class weights (balanced: n / (2 * n_class))",
        "class_weights": {data.CLASS_NAMES[k]: v for k, v in class_weight.items()},
        "augmentation": models.AUGMENTATIONS[config.augmentation],
        "training": {
            "wall_seconds": round(train_seconds, 1),
            "epochs_run": epochs_run,
            "history": history,
        },
        "dataset_licence": (
            "Kermany, Zhang, Goldbaum (2018), Mendeley Data v2, doi:10.17632/rscbjbr9sj.2, CC BY 4.0"
        ),
    }
    # The pixel check: fitted on the training images, threshold on validation (training.scope).
    from training.scope import fit_detector, kermany_groups, kermany_site, scope_card

    detector, summary = fit_detector(model, train_split.images, kermany_groups(train_samples),
                                     validation_split.images)
    card["scope"] = scope_card(summary, [kermany_site(len(train_samples))])
    return register_evaluated(
        config.model_name, model, card, validation_split, data_root, models_dir, report_test,
        detector,
    )


def provenance(model: keras.Model, commit: str) -> dict[str, Any]:
    """What produced a version: when, from which code, on which Keras and backend."""
    return {
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "code_commit": commit,
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "device": compute_device(),
        "architecture": model.name,
        "parameters": int(model.count_params()),
    }


def register_evaluated(
    name: str,
    model: keras.Model,
    card: dict[str, Any],
    validation: Split,
    data_root: Path,
    models_dir: Path,
    report_test: bool,
    detector: Any = None,
) -> registry.ModelVersion:
    """Threshold and metrics on validation, the test split once if asked, then register.

    Shared by `train` and `ensemble`, so every version is scored and recorded the same way.
    With `detector` (serving.pixelcheck), its file is registered with the card's scope.
    """
    validation_probabilities = predict(model, validation.images)
    threshold = metrics.choose_threshold(validation.labels, validation_probabilities)
    card = {
        **card,
        "threshold": threshold,
        "threshold_rule": "Youden's J on the validation split",
        "validation_score_histogram": contract.score_histogram(validation_probabilities),
        "metrics": {
            "validation": metrics.compute_metrics(
                validation.labels, validation_probabilities, threshold
            )
        },
    }
    plots: list[Path] = []
    staging = Path(models_dir) / ".plots"
    if report_test:
        # The one look at the test split, for the report; nothing above depends on it.
        test_split = load_split(data.read_split(data_root, "test"))
        test_probabilities = predict(model, test_split.images)
        card["metrics"]["test"] = metrics.compute_metrics(
            test_split.labels, test_probabilities, threshold
        )
        card["data"]["test_fingerprint"] = data.fingerprint(test_split.samples, data_root)
        plots = metrics.save_plots(test_split.labels, test_probabilities, threshold, staging, "test")
    with tempfile.TemporaryDirectory() as folder:
        detector_file = pixelcheck.save(detector, Path(folder)) if detector is not None else None
        model_version = registry.register(name, model, card, models_dir, plots,
                                          detector_file=detector_file)
    for plot in plots:
        plot.unlink(missing_ok=True)
    log.info("registered %s in %s", model_version.label, model_version.path)
    log.info("card metrics: %s", json.dumps(card["metrics"], indent=1))
    return model_version
