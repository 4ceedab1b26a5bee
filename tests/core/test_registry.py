import json
from pathlib import Path

import keras
import numpy as np
import pytest

from core import registry
from serving.models import load_version
from training import models


@pytest.fixture
def registered(tmp_path: Path) -> registry.ModelVersion:
    keras.utils.set_random_seed(0)
    model = models.build_cnn(filters=(4, 8), dense_units=4)
    return registry.register("pneumonia-cnn", model, {"threshold": 0.5}, tmp_path, version="v1")


def test_save_load_round_trip_gives_identical_predictions(
    registered: registry.ModelVersion, tmp_path: Path
) -> None:
    images = np.random.default_rng(0).random((3, 224, 224, 1), dtype=np.float32)
    original = keras.saving.load_model(registered.model_file, compile=False)
    loaded, version = load_version("pneumonia-cnn", tmp_path)
    assert version.version == "v1"
    np.testing.assert_array_equal(original.predict(images, verbose=0), loaded.predict(images, verbose=0))


def test_first_version_is_served_and_serving_switches(
    registered: registry.ModelVersion, tmp_path: Path
) -> None:
    assert registry.served_versions(tmp_path) == {"pneumonia-cnn": "v1"}
    model = models.build_cnn(filters=(4,), dense_units=2)
    registry.register("pneumonia-cnn", model, {"threshold": 0.4}, tmp_path, version="v2")
    assert registry.resolve("pneumonia-cnn", tmp_path).version == "v1"
    registry.mark_served("pneumonia-cnn", "v2", tmp_path)
    assert registry.resolve("pneumonia-cnn", tmp_path).threshold == 0.4


def test_versions_are_immutable(registered: registry.ModelVersion, tmp_path: Path) -> None:
    with pytest.raises(registry.RegistryError, match="immutable"):
        registry.register("pneumonia-cnn", models.build_cnn((4,)), {"threshold": 0.5}, tmp_path, version="v1")


def test_hash_mismatch_is_refused(registered: registry.ModelVersion, tmp_path: Path) -> None:
    registered.model_file.chmod(0o644)
    with open(registered.model_file, "ab") as handle:
        handle.write(b"tampered")
    with pytest.raises(registry.ModelIntegrityError, match="changed after registration"):
        load_version("pneumonia-cnn@v1", tmp_path)


def test_other_preprocessing_contract_is_refused(
    registered: registry.ModelVersion, tmp_path: Path
) -> None:
    card_path = registered.path / registry.CARD_FILE
    card = json.loads(card_path.read_text())
    card["preprocessing"]["input_shape"] = [299, 299, 3]
    card_path.chmod(0o644)
    card_path.write_text(json.dumps(card))
    with pytest.raises(registry.RegistryError, match="another preprocessing contract"):
        load_version("pneumonia-cnn@v1", tmp_path)


def test_unknown_model_names_what_exists(registered: registry.ModelVersion, tmp_path: Path) -> None:
    with pytest.raises(registry.RegistryError, match="known models: \\['pneumonia-cnn'\\]"):
        registry.resolve("pneumonia-transfer", tmp_path)
    with pytest.raises(registry.RegistryError, match="no model pneumonia-cnn@v9"):
        registry.resolve("pneumonia-cnn@v9", tmp_path)


def test_committed_served_models_verify_and_carry_their_contract() -> None:
    """What `make run` serves: both models registered, hashes intact, contract current."""
    served = registry.served_versions()
    assert set(served) == {"pneumonia-cnn", "pneumonia-transfer"}
    for name in served:
        version = registry.resolve(name)
        registry.verify(version)
        assert 0.0 < version.threshold < 1.0
        assert version.model_file.stat().st_size < 25 * 1024 * 1024
        assert version.card.metrics.validation is not None
        # A refit keeps its parent's weights, so the weights' one test look and training record
        # are the parent's (the refit read no test split; the first refit cards, session 11, left
        # the training record out).
        parent = registry.resolve(version.card.parent) if version.card.parent else version
        assert (version.test_metrics or parent.test_metrics).n == 624
        training = version.card.training or parent.card.training
        assert training.wall_seconds < 3600


def test_test_report_is_recorded_once(registered: registry.ModelVersion, tmp_path: Path) -> None:
    assert registered.test_metrics is None
    registry.record_test_report(registered, {"metrics": {"accuracy": 0.9, "n": 624}})
    version = registry.resolve("pneumonia-cnn@v1", tmp_path)
    assert version.test_metrics.dump() == {"accuracy": 0.9, "n": 624}
    with pytest.raises(registry.RegistryError, match="already has test metrics"):
        registry.record_test_report(version, {"metrics": {"accuracy": 0.95}})
    assert registry.resolve("pneumonia-cnn@v1", tmp_path).test_metrics.accuracy == 0.9


def test_a_card_with_test_metrics_takes_no_second_report(tmp_path: Path) -> None:
    card = {"threshold": 0.5, "metrics": {"test": {"accuracy": 0.8}}}
    version = registry.register("pneumonia-cnn", models.build_cnn((4,)), card, tmp_path, version="v1")
    with pytest.raises(registry.RegistryError, match="read once per version"):
        registry.record_test_report(version, {"metrics": {"accuracy": 0.95}})
    assert not (version.path / registry.TEST_REPORT_FILE).exists()


def test_unwritable_registry_gives_a_clear_error(
    registered: registry.ModelVersion, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(path: Path, data: dict) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(registry, "_write_json_atomic", refuse)
    with pytest.raises(registry.RegistryError, match=r"cannot record the test report.*writable"):
        registry.record_test_report(registered, {"metrics": {"accuracy": 0.9}})
    assert registered.test_metrics is None
