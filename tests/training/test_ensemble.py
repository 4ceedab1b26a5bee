"""`pneumo ensemble`: members averaged into one verified version, scored on the shared validation."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from core import registry
from serving.image import preprocess_many
from serving.models import load_version
from tests.training.test_training_run import pneumo
from training import data, models

pytestmark = pytest.mark.slow


def register_member(
    models_dir: Path, tiny_data: Path, version: str, seed: int, split_seed: int
) -> registry.ModelVersion:
    """A small random CNN with the card fields a training run writes (no training needed)."""
    keras.utils.set_random_seed(seed)
    card = {
        "code_commit": "test",
        "architecture": "pneumonia_cnn",
        "hyper_parameters": {"seed": seed, "split_seed": split_seed, "validation_fraction": 0.15},
        "data": {"train_fingerprint": data.fingerprint(data.read_split(tiny_data, "train"), tiny_data)},
        "metrics": {"validation": {"roc_auc": 0.5}},
        "training": {"wall_seconds": 10.0, "epochs_run": 3},
        "threshold": 0.5,
    }
    model = models.build_cnn((4, 8), (1, 1), dense_units=8)
    return registry.register("pneumonia-cnn", model, card, models_dir, version=version)


def test_ensemble_is_the_mean_of_its_members(tiny_data: Path, tmp_path: Path) -> None:
    members = [register_member(tmp_path, tiny_data, f"m{seed}", seed, 1337) for seed in (1, 2)]
    result = pneumo("ensemble", "--model", "pneumonia-cnn", "m1", "m2", "--data", str(tiny_data),
                    "--models-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]

    (ensemble,) = [v for v in registry.list_versions(tmp_path) if v.version not in {"m1", "m2"}]
    registry.verify(ensemble)
    card = ensemble.card
    assert [m.label for m in card.members] == ["pneumonia-cnn@m1", "pneumonia-cnn@m2"]
    assert [m.model_sha256 for m in card.members] == [m.card.model_sha256 for m in members]
    assert card.training.wall_seconds == 20.0 and card.training.epochs_run == 6
    assert card.metrics.test is None and 0.0 <= card.threshold <= 1.0
    assert card.data.train_images + card.data.validation_images == 48

    images = preprocess_many([s.path for s in data.read_split(tiny_data, "test")])
    averaged, _ = load_version(ensemble.label, tmp_path)
    expected = np.mean(
        [load_version(m.label, tmp_path)[0].predict(images, verbose=0) for m in members], axis=0
    )
    np.testing.assert_allclose(averaged.predict(images, verbose=0), expected, atol=1e-6)

    evaluated = pneumo("evaluate", "--model", ensemble.label, "--data", str(tiny_data),
                       "--models-dir", str(tmp_path), "--json")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert json.loads(evaluated.stdout)["threshold"] == card.threshold

    listed = pneumo("models", "list", "--models-dir", str(tmp_path)).stdout.splitlines()
    assert [line.split()[-2:] for line in listed if ensemble.version in line] == [["m1", "m2"]]


@pytest.mark.parametrize(
    ("members", "message"),
    [
        (["m1", "m3"], "validated on different splits"),
        (["m1"], "at least two"),
        (["m1", "m1"], "named twice"),
    ],
)
def test_ensemble_refuses_members_it_cannot_average_honestly(
    tiny_data: Path, tmp_path: Path, members: list[str], message: str
) -> None:
    register_member(tmp_path, tiny_data, "m1", 1, 1337)
    register_member(tmp_path, tiny_data, "m3", 3, 7)  # another validation split
    result = pneumo("ensemble", "--model", "pneumonia-cnn", *members, "--data", str(tiny_data),
                    "--models-dir", str(tmp_path))
    assert result.returncode == 2
    assert message in result.stderr
    assert {v.version for v in registry.list_versions(tmp_path)} == {"m1", "m3"}
