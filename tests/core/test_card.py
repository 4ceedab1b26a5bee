"""core.card.ModelCard: every committed card loads through it unchanged; a bad card names its version."""

import json
from pathlib import Path

import pytest

from core import contract, registry
from core.card import ModelCard, Scope

COMMITTED_CARDS = sorted(contract.DEFAULT_MODELS_DIR.glob(f"*/*/{registry.CARD_FILE}"))


def test_the_registry_holds_committed_cards() -> None:
    assert len(COMMITTED_CARDS) >= 10


@pytest.mark.parametrize("card_path", COMMITTED_CARDS,
                         ids=lambda p: f"{p.parent.parent.name}@{p.parent.name}")
def test_every_committed_card_validates_and_dumps_back_unchanged(card_path: Path) -> None:
    raw = json.loads(card_path.read_text())
    card = ModelCard.model_validate(raw)
    assert card.label == f"{card_path.parent.parent.name}@{card_path.parent.name}"
    assert 0.0 < card.threshold < 1.0
    # Every committed version is served by this code with the resize its card records.
    assert card.preprocessing.dump() == contract.preprocessing_contract(
        contract.resize_of(card.preprocessing.dump()))
    # The same keys and values, byte for byte as JSON: nothing added, dropped or retyped.
    assert json.dumps(card.dump(), sort_keys=True) == json.dumps(raw, sort_keys=True)


def test_every_committed_version_loads_with_its_scope_and_test_look() -> None:
    versions = registry.list_versions()
    assert len(versions) == len(COMMITTED_CARDS)
    for version in versions:
        assert version.card.name == version.name and version.card.version == version.version
        if version.scope is not None:  # in the card, or scope.json beside an older one
            assert isinstance(version.scope, Scope) and version.scope.detector_sha256
        if version.test_metrics is not None:
            assert 0.0 <= version.test_metrics.accuracy <= 1.0


def _write_version(models_dir: Path, name: str, version: str, card: dict) -> Path:
    folder = models_dir / name / version
    folder.mkdir(parents=True)
    (folder / registry.CARD_FILE).write_text(json.dumps(card))
    return folder


def test_a_card_with_a_wrong_field_names_the_version_and_the_field(tmp_path: Path) -> None:
    good = json.loads(COMMITTED_CARDS[0].read_text())
    _write_version(tmp_path, "pneumonia-cnn", "bad", {**good, "threshold": "high"})
    with pytest.raises(registry.CardError, match=r"pneumonia-cnn@bad: .*card\.json.*threshold"):
        registry.resolve("pneumonia-cnn@bad", tmp_path)
    with pytest.raises(registry.CardError, match="pneumonia-cnn@bad"):
        registry.list_versions(tmp_path)


def test_a_card_without_what_serving_needs_is_refused(tmp_path: Path) -> None:
    _write_version(tmp_path, "pneumonia-cnn", "thin", {"name": "pneumonia-cnn", "version": "thin"})
    with pytest.raises(registry.CardError) as raised:
        registry.resolve("pneumonia-cnn@thin", tmp_path)
    for field in ("model_sha256", "preprocessing", "threshold"):
        assert field in str(raised.value)


def test_unknown_fields_are_kept() -> None:
    raw = {**json.loads(COMMITTED_CARDS[0].read_text()), "reviewed_by": {"who": "radiology", "on": 1}}
    card = ModelCard.model_validate(raw)
    assert card.dump()["reviewed_by"] == {"who": "radiology", "on": 1}
    assert card.model_extra["reviewed_by"] == {"who": "radiology", "on": 1}


def test_registering_an_invalid_card_writes_nothing(tmp_path: Path) -> None:
    class Model:
        def save(self, path: Path) -> None:
            Path(path).write_bytes(b"weights")

    with pytest.raises(registry.CardError, match=r"pneumonia-cnn@v1: the card to register.*threshold"):
        registry.register("pneumonia-cnn", Model(), {"threshold": [0.5]}, tmp_path, version="v1")
    assert not list((tmp_path / "pneumonia-cnn").iterdir())
    assert registry.served_versions(tmp_path) == {}


def test_registered_card_is_the_dict_it_was_given_plus_identity(tmp_path: Path) -> None:
    class Model:
        def save(self, path: Path) -> None:
            Path(path).write_bytes(b"weights")

    given = {"threshold": 0.25, "backbone": None, "hyper_parameters": {"seed": 1, "notes": {}},
             "metrics": {"validation": {"roc_auc": float("nan"), "n": 3}}, "extra": (1, 2)}
    version = registry.register("pneumonia-cnn", Model(), given, tmp_path, version="v1")
    written = json.loads((version.path / registry.CARD_FILE).read_text())
    assert set(written) == {*given, "name", "version", "model_file", "model_sha256", "preprocessing"}
    assert written["backbone"] is None and written["extra"] == [1, 2]
    assert written["hyper_parameters"] == {"seed": 1, "notes": {}}
    assert written["preprocessing"] == contract.preprocessing_contract()
    assert version.card.dump(exclude={"metrics"}) == registry.resolve("pneumonia-cnn@v1", tmp_path).card.dump(
        exclude={"metrics"})


def test_a_contract_this_code_does_not_serve_is_refused_by_name() -> None:
    recorded = {**contract.preprocessing_contract(), "resize": "nearest, aspect ratio kept"}
    with pytest.raises(ValueError, match="does not serve"):
        contract.resize_of(recorded)
    assert contract.resize_of(contract.preprocessing_contract("bilinear")) == "bilinear"
    assert contract.resize_of(contract.preprocessing_contract()) == contract.RESIZE == "area"
