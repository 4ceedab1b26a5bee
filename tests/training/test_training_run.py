"""A tiny but real training run through the CLI: registry entry and evaluation JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from core import registry
from tests.conftest import SMALL_MOBILENET

pytestmark = pytest.mark.slow


def pneumo(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ops.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_tiny_transfer_run_registers_and_evaluates(tiny_data: Path, tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    trained = pneumo(
        "train", "--model", "pneumonia-transfer", "--data", str(tiny_data),
        "--models-dir", str(models_dir), "--backbone", "mobilenet_v2_0.35",
        "--weights", str(SMALL_MOBILENET), "--epochs", "1", "--fine-tune-epochs", "1",
        "--fine-tune-layers", "10",
    )
    assert trained.returncode == 0, trained.stderr[-3000:]

    version = registry.resolve("pneumonia-transfer", models_dir)
    registry.verify(version)
    card = version.card
    assert card.backbone["weights"]["sha256"] == registry.sha256_file(SMALL_MOBILENET)
    assert 0.0 < card.threshold < 1.0
    assert card.data.train_images + card.data.validation_images == 48
    assert card.metrics.test is None  # the test split is only read by the final report
    assert card.training.epochs_run == 2

    evaluated = pneumo(
        "evaluate", "--model", f"pneumonia-transfer@{version.version}", "--data", str(tiny_data),
        "--split", "test", "--models-dir", str(models_dir), "--json",
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout)
    assert result["n"] == 16 and result["version"] == version.version
    for key in ("accuracy", "roc_auc", "sensitivity", "specificity"):
        assert 0.0 <= result[key] <= 1.0
    assert result["threshold"] == card.threshold

    table = pneumo("evaluate", "--model", "pneumonia-transfer", "--data", str(tiny_data),
                   "--models-dir", str(models_dir))
    assert "Test accuracy: " in table.stdout and "Test loss: " in table.stdout

    # The one recorded test look: kept next to the card, listed, and never taken twice.
    record = ("evaluate", "--model", f"pneumonia-transfer@{version.version}", "--data",
              str(tiny_data), "--models-dir", str(models_dir), "--record")
    recorded = pneumo(*record, "--json")
    assert recorded.returncode == 0, recorded.stderr[-3000:]
    report = json.loads((version.path / registry.TEST_REPORT_FILE).read_text())
    assert report["metrics"]["accuracy"] == result["accuracy"]
    assert report["metrics"]["n"] == 16 and len(report["test_fingerprint"]) == 64
    assert all((version.path / Path(p).name).exists() for p in json.loads(recorded.stdout)["plots"])
    assert registry.resolve(version.label, models_dir).card == card  # the card is untouched
    again = pneumo(*record)
    assert again.returncode == 2 and "already has test metrics" in again.stderr
    listed = pneumo("models", "list", "--models-dir", str(models_dir))
    assert f"{result['accuracy']:.4f}" in listed.stdout


def test_evaluate_refuses_a_tampered_model(tiny_data: Path, tmp_path: Path) -> None:
    import keras

    from training import models

    version = registry.register(
        "pneumonia-cnn", models.build_cnn((4,)), {"threshold": 0.5}, tmp_path, version="v1"
    )
    keras.backend.clear_session()
    version.model_file.chmod(0o644)
    version.model_file.write_bytes(version.model_file.read_bytes() + b"x")
    result = pneumo("evaluate", "--model", "pneumonia-cnn", "--data", str(tiny_data),
                    "--models-dir", str(tmp_path))
    assert result.returncode == 2
    assert "changed after registration" in result.stderr


def test_record_is_for_the_test_split_only(tiny_data: Path, tmp_path: Path) -> None:
    result = pneumo("evaluate", "--model", "pneumonia-cnn", "--data", str(tiny_data),
                    "--split", "train", "--record", "--models-dir", str(tmp_path))
    assert result.returncode == 2
    assert "test split only" in result.stderr
