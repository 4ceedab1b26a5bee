"""`pneumo compare` and the robust augmentation: what a candidate version is judged and trained with."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from core import registry
from core.card import ModelCard
from tests.training.test_ensemble import register_member
from tests.training.test_training_run import pneumo
from training import metrics, models
from training.compare import paired_bootstrap_auc, split_of


def test_paired_bootstrap_sees_a_real_gain_and_no_gain_in_a_copy() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1], 200)
    noisy = labels + rng.normal(0, 1.0, labels.size)
    better = labels + rng.normal(0, 0.4, labels.size)

    same = paired_bootstrap_auc(labels, noisy, noisy, resamples=200)
    assert same["difference"] == 0.0 and same["bootstrap_se"] == 0.0

    gain = paired_bootstrap_auc(labels, noisy, better, resamples=500)
    assert gain["difference"] == pytest.approx(
        roc_auc_score(labels, better) - roc_auc_score(labels, noisy)
    )
    assert gain["difference_ci95"][0] > 0 and 0 < gain["bootstrap_se"] < gain["difference"] / 2


def test_paired_bootstrap_gives_each_versions_threshold_a_range() -> None:
    rng = np.random.default_rng(2)
    labels = np.repeat([0, 1], 200)
    scores = 1 / (1 + np.exp(-(4 * labels - 2 + rng.normal(0, 1.0, labels.size))))
    result = paired_bootstrap_auc(labels, scores, scores, resamples=300)
    assert result["reference_threshold_range_90"] == result["candidate_threshold_range_90"]
    low, high = result["candidate_threshold_range_90"]
    assert 0 < low < metrics.choose_threshold(labels, scores) < high < 1


@pytest.mark.slow
def test_compare_reports_both_versions_on_their_shared_validation(
    tiny_data: Path, tmp_path: Path
) -> None:
    for version, seed, split_seed in (("m1", 1, 1337), ("m2", 2, 1337), ("m3", 3, 7)):
        register_member(tmp_path, tiny_data, version, seed, split_seed)
    common = ["--model", "pneumonia-cnn", "--data", str(tiny_data), "--models-dir", str(tmp_path)]

    result = pneumo("compare", *common, "m1", "m2", "--json", "--resamples", "100")
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout)
    assert (report["reference"], report["candidate"]) == ("pneumonia-cnn@m1", "pneumonia-cnn@m2")
    assert report["difference"] == pytest.approx(
        report["candidate_roc_auc"] - report["reference_roc_auc"]
    )
    assert report["non_inferior"] == (report["difference"] >= -report["bootstrap_se"])
    assert report["validation_images"] > 0
    for role in ("reference", "candidate"):
        low, high = report[f"{role}_threshold_range_90"]
        assert 0 <= low <= high <= 1 and 0 < report[f"{role}_threshold"] < 1

    table = pneumo("compare", *common, "m1", "m1", "--resamples", "50")
    assert table.returncode == 0 and "difference +0.0000" in table.stdout
    assert "non-inferior" in table.stdout
    assert "threshold (card; Youden on the same resamples, 5-95%)" in table.stdout

    refused = pneumo("compare", *common, "m1", "m3")
    assert refused.returncode == 2 and "validated on different splits" in refused.stderr


def test_robust_augmentation_changes_images_only_while_training() -> None:
    keras.utils.set_random_seed(0)
    images = np.random.default_rng(0).uniform(0.05, 0.95, (8, 224, 224, 1)).astype("float32")
    standard = models.build_augmentation(5, "standard")
    robust = models.build_augmentation(5, "robust")
    assert len(robust.layers) > len(standard.layers)
    np.testing.assert_array_equal(np.asarray(robust(images, training=False)), images)
    changed = np.asarray(robust(images, training=True))
    assert changed.shape == images.shape and np.abs(changed - images).mean() > 0.01
    with pytest.raises(ValueError, match="augmentation must be one of"):
        models.build_augmentation(5, "heavy")


def test_random_gamma_bends_the_tone_curve_within_its_range() -> None:
    images = np.tile(np.linspace(0.0, 1.0, 224, dtype="float32"), (4, 224, 1))[..., None]
    gamma = models.RandomGamma(0.4, seed=3)
    bent = np.asarray(gamma(images, training=True))
    assert bent.min() >= 0.0 and bent.max() <= 1.0 + 1e-6
    grey = images[0, 0, 112, 0]  # 112/223, not 0.5: the bounds use the pixel's own value
    middle = bent[:, 0, 112, 0]  # grey ** gamma, gamma in [e^-0.4, e^0.4]
    assert np.all(middle >= grey ** np.exp(0.4) - 1e-5) and np.all(middle <= grey ** np.exp(-0.4) + 1e-5)
    assert np.ptp(middle) > 0  # drawn per image
    np.testing.assert_array_equal(np.asarray(gamma(images, training=False)), images)


def test_a_copy_without_git_records_the_declared_commit(monkeypatch: pytest.MonkeyPatch) -> None:
    from training import train

    def no_git(*args, **kwargs):
        raise OSError("git: not found")

    monkeypatch.setattr(train.subprocess, "run", no_git)
    monkeypatch.delenv("PNEUMO_CODE_COMMIT", raising=False)
    assert train.code_commit() == "unknown"
    monkeypatch.setenv("PNEUMO_CODE_COMMIT", "06f5cae")
    assert train.code_commit() == "06f5cae (declared, no git checkout)"


def test_split_of_reads_single_versions_old_cards_and_ensembles() -> None:
    data_part = {"data": {"train_fingerprint": "f"}}
    single = {"hyper_parameters": {"validation_fraction": 0.15, "seed": 2, "split_seed": 7}}
    old = {"hyper_parameters": {"validation_fraction": 0.15, "seed": 7}}  # before --split-seed
    ensemble = {"hyper_parameters": {"validation_fraction": 0.15, "split_seed": 7, "members": []}}
    identity = {"name": "m", "version": "v", "model_sha256": "0", "preprocessing": {}, "threshold": 0.5}
    cards = [ModelCard.model_validate({**identity, **card, **data_part}) for card in (single, old, ensemble)]
    assert {split_of(card) for card in cards} == {(0.15, 7, "f")}
    with pytest.raises(registry.CardError, match="m@v: its card does not say"):
        split_of(ModelCard.model_validate({**identity, **old}))
