"""`pneumo evaluate`: a registered model on one split, at the threshold its card carries."""

from __future__ import annotations

import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from core import registry
from serving import models
from serving.image import preprocess_many
from training import data, metrics, progress
from training.train import code_commit

REPORT_KEYS = (
    "n", "accuracy", "loss", "sensitivity", "specificity", "ppv", "npv", "f1",
    "roc_auc", "pr_auc", "brier", "ece", "threshold",
)


def evaluate(
    spec: str,
    data_root: Path,
    split: str = "test",
    models_dir: Path = registry.DEFAULT_MODELS_DIR,
    plots_dir: Path | None = None,
) -> dict[str, Any]:
    """Metrics of `spec` (name[@version]) on `<data_root>/<split>`; plots if `plots_dir`.

    The split is listed before the model is loaded: a wrong --data is one line at once, not 9 s
    of loading and a traceback (FileNotFoundError/ValueError, which the CLI prints as one line)."""
    samples = data.read_split(data_root, split)
    model, model_version = models.load_version(spec, models_dir)
    labels = np.array([s.label for s in samples])
    paths = [s.path for s in samples]
    images = np.concatenate([preprocess_many(list(part)) for part in
                             progress.chunks(paths, 32, f"reading {split} images")])
    probabilities = np.concatenate([
        np.asarray(model.predict(batch, batch_size=64, verbose=0)).reshape(-1)
        for batch in progress.chunks(images, 64, f"classifying with {model_version.label}")])
    result = metrics.compute_metrics(labels, probabilities, model_version.threshold)
    result["sensitivity_at_specificity_0.90"] = metrics.sensitivity_at_specificity(
        labels, probabilities, 0.90
    )
    if plots_dir is not None:
        result["plots"] = [
            str(p) for p in metrics.save_plots(
                labels, probabilities, model_version.threshold, Path(plots_dir), split
            )
        ]
    return {
        "model": model_version.name,
        "version": model_version.version,
        "split": split,
        **result,
        "predictions": [
            {"file": s.path.name, "label": s.class_name, "probability": float(p)}
            for s, p in zip(samples, probabilities, strict=True)
        ],
    }


def format_table(result: dict[str, Any]) -> str:
    """Plain text table, then the seed's own two lines."""
    lines = [f"model {result['model']}@{result['version']} on {result['split']}"]
    intervals = result.get("ci95", {})
    for key in (*REPORT_KEYS, "sensitivity_at_specificity_0.90"):
        value = result[key]
        text = f"{value:.4f}" if isinstance(value, float) else f"{value}"
        if key in intervals:
            text += f"  (95% CI {intervals[key][0]:.3f}-{intervals[key][1]:.3f})"
        lines.append(f"  {key:<34} {text}")
    matrix = result["confusion_matrix"]
    lines.append("  confusion matrix (rows true NORMAL/PNEUMONIA, columns predicted):")
    lines.append(f"    {matrix['tn']:>5} {matrix['fp']:>5}")
    lines.append(f"    {matrix['fn']:>5} {matrix['tp']:>5}")
    split_name = result["split"].capitalize()
    lines.append(f"{split_name} loss: {result['loss']}")
    lines.append(f"{split_name} accuracy: {result['accuracy']}")
    return "\n".join(lines)


def record_test(
    spec: str, data_root: Path, models_dir: Path = registry.DEFAULT_MODELS_DIR
) -> dict[str, Any]:
    """Evaluate on test and record it as the version's one test report (refused if it has one).

    For versions whose test split was not read at registration: a candidate served by a rule
    decided on validation gets its one test look here, and the look is kept next to its card.
    """
    model_version = registry.resolve(spec, models_dir)
    registry.ensure_test_unread(model_version)  # before a single test image is read
    with tempfile.TemporaryDirectory() as plots_dir:
        result = evaluate(model_version.label, data_root, "test", models_dir, Path(plots_dir))
        metrics_only = {
            k: v for k, v in result.items() if k not in ("predictions", "plots", "model", "version")
        }
        report = {
            "evaluated": datetime.now(UTC).isoformat(timespec="seconds"),
            "code_commit": code_commit(),
            "test_fingerprint": data.fingerprint(data.read_split(data_root, "test"), data_root),
            "metrics": metrics_only,
        }
        registry.record_test_report(model_version, report, [Path(p) for p in result["plots"]])
    result["plots"] = [str(model_version.path / Path(p).name) for p in result["plots"]]
    return result
