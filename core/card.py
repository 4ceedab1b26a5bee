"""The model card: what a registered version's `card.json` says, as a validated value object.

Every reader goes through `ModelCard` (core.registry validates a card when it loads or writes one),
so a missing or mistyped field fails once, at the registry, naming the version, instead of as a
KeyError wherever it is read. Cards are written once and hashed, so the model is open: every
part allows fields it does not name (`extra="allow"`), and a card is written back with only the
fields it was given (`dump()`, i.e. `exclude_unset`), so old cards load unchanged and new ones
carry the same keys and values the dicts they were built from had.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class CardPart(BaseModel):
    """A part of a card: named fields typed, any other field kept as it is."""

    model_config = ConfigDict(extra="allow")

    def dump(self, **kwargs: Any) -> dict[str, Any]:
        """The JSON form, with exactly the fields this part was given (explicit nulls kept)."""
        return self.model_dump(mode="json", exclude_unset=True, **kwargs)


class Preprocessing(CardPart):
    """The model contract the version was trained with (core.contract.preprocessing_contract)."""

    input_shape: list[int] | None = None
    dtype: str | None = None
    resize: str | None = None
    normalisation: str | None = None
    photometric: str | None = None
    output: str | None = None


class SplitMetrics(CardPart):
    """training.metrics.compute_metrics on one split (or one site's images) at a threshold."""

    n: int | None = None
    threshold: float | None = None
    accuracy: float | None = None
    loss: float | None = None
    sensitivity: float | None = None
    specificity: float | None = None
    ppv: float | None = None
    npv: float | None = None
    f1: float | None = None
    roc_auc: float | None = None
    pr_auc: float | None = None
    brier: float | None = None
    ece: float | None = None
    confusion_matrix: dict[str, int] | None = None
    ci95: dict[str, Any] | None = None


class Metrics(CardPart):
    """Validation (always), the one test look (when read at registration), per-site validation."""

    validation: SplitMetrics | None = None
    test: SplitMetrics | None = None
    validation_by_site: dict[str, SplitMetrics] | None = None


class Site(CardPart):
    """A population a version was trained and validated on (core.scope, training.site)."""

    name: str | None = None
    population: str | None = None
    views: list[str] | None = None
    age_years: list[int] | None = None
    training_images: int | None = None
    validation_images: int | None = None
    images: int | None = None
    fingerprint: str | None = None
    data: str | None = None


class IntendedUse(CardPart):
    """What the header check compares an image against (core.scope.intended_use writes it)."""

    modalities: list[str] | None = None
    body_part: str | None = None
    views: list[str] | None = None
    age_years: list[int] | None = None
    sites: list[Site] | None = None
    population: str | None = None


class PixelCheck(CardPart):
    """The pixel check's summary (training.ood.fit); its threshold is also in the detector file."""

    method: str | None = None
    layers: list[str] | None = None
    groups: list[str] | None = None
    fit_images: int | None = None
    held_out_images: int | None = None
    false_refusal_rate: float | None = None
    threshold: float | None = None
    threshold_rule: str | None = None
    held_out_refused_rate: float | None = None


class Scope(CardPart):
    """Intended use and pixel check: in the card, or in `scope.json` beside an older card."""

    intended_use: IntendedUse | None = None
    pixel_check: PixelCheck | None = None
    detector_file: str | None = None
    detector_sha256: str | None = None


class HyperParameters(CardPart):
    """The training configuration; only what other code reads is named."""

    model_name: str | None = None
    seed: int | None = None
    split_seed: int | None = None  # absent on cards written before it: they split with `seed`
    validation_fraction: float | None = None
    augmentation: str | None = None
    members: list[str] | None = None

    def validation_split(self) -> tuple[float, int] | None:
        """(validation fraction, split seed) the version was validated on; None if not recorded.
        Cards written before split_seed existed split with `seed`; ensembles carry no `seed`."""
        split_seed = self.split_seed if self.split_seed is not None else self.seed
        if self.validation_fraction is None or split_seed is None:
            return None
        return float(self.validation_fraction), int(split_seed)


class Data(CardPart):
    """Which images the version was trained and validated on."""

    root: str | None = None
    train_fingerprint: str | None = None
    test_fingerprint: str | None = None
    train_images: int | None = None
    validation_images: int | None = None
    duplicates_dropped: int | None = None
    validation_split: str | None = None
    site: Site | None = None


class Training(CardPart):
    wall_seconds: float | None = None
    epochs_run: int | None = None
    history: dict[str, Any] | None = None


class Member(CardPart):
    """One member of an ensemble (training.ensemble.member_summary)."""

    label: str
    model_sha256: str | None = None
    code_commit: str | None = None
    architecture: str | None = None
    seed: int | None = None
    hyper_parameters: HyperParameters | None = None
    validation_roc_auc: float | None = None
    wall_seconds: float | None = None
    epochs_run: int | None = None


class ModelCard(CardPart):
    """One version's card. Required: what serving needs (identity, hash, contract, threshold)."""

    name: str
    version: str
    model_file: str = "model.keras"
    model_sha256: str
    preprocessing: Preprocessing
    threshold: float
    threshold_rule: str | None = None

    created: str | None = None
    code_commit: str | None = None
    keras_version: str | None = None
    backend: str | None = None
    device: str | None = None
    architecture: str | None = None
    parameters: int | None = None
    backbone: dict[str, Any] | None = None
    augmentation: str | None = None
    class_imbalance: str | None = None
    class_weights: dict[str, float] | None = None
    dataset_licence: str | None = None

    hyper_parameters: HyperParameters = Field(default_factory=HyperParameters)
    data: Data = Field(default_factory=Data)
    training: Training | None = None
    metrics: Metrics = Field(default_factory=Metrics)
    # 20 equal-width bins of the validation probabilities on [0, 1] (core.contract.SCORE_BINS).
    validation_score_histogram: list[int] | None = None
    scope: Scope | None = None
    members: list[Member] | None = None  # ensembles only

    parent: str | None = None  # adapted (training.adapt) or calibrated (training.calibrate) versions
    adapted_to: Site | None = None
    calibration: dict[str, Any] | None = None
    parent_metrics: Metrics | None = None

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"
