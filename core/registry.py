"""The model registry: immutable `models/<name>/<version>/` folders and the served marker.

A version folder holds `model.keras`, `card.json` and the evaluation plots. The card carries the
model file's SHA-256; loading recomputes it and refuses a mismatch, and refuses a card whose
preprocessing contract differs from this code's. Cards are read and written as core.card.ModelCard,
validated both ways; an invalid one is a CardError naming the version and the field.
`models/served.json` names one version per model; `models/roles.json` (absent in older
registries: no roles) names per model a *candidate* (run beside the served version, never sent)
and whether the served version is *silent* (results recorded and scored, nothing sent).
A version's test metrics are written once: into the card at registration (`--report-test`), or
later into `test_report.json` (`pneumo evaluate --split test --record`); never both, never twice.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from core import contract
from core.card import ModelCard, Scope, SplitMetrics

MODEL_FILE = "model.keras"
CARD_FILE = "card.json"
SERVED_FILE = "served.json"
ROLES_FILE = "roles.json"  # {"candidate": {name: version}, "silent": {name: version}}
TEST_REPORT_FILE = "test_report.json"
SCOPE_FILE = "scope.json"  # the scope of a version registered before pixel checks existed
DEFAULT_MODELS_DIR = contract.DEFAULT_MODELS_DIR


class RegistryError(Exception):
    """A model cannot be found, registered or loaded; the message says why and what to do."""


class ModelIntegrityError(RegistryError):
    """The model file's hash differs from its card: it was changed after registration."""


class CardError(RegistryError):
    """A card (or the scope or test report beside it) is not what core.card.ModelCard says."""


def _validated(model: type[Any], data: Any, label: str, source: str) -> Any:
    """`model` from `data`, or a CardError naming the version, the file and every bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as error:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in problem['loc']) or '(top level)'}: {problem['msg']}"
            for problem in error.errors()
        )
        raise CardError(f"{label}: {source} is not a valid model card ({problems})") from None


def load_card(folder: Path, label: str) -> ModelCard:
    """The version's `card.json`, validated; a CardError says which version's card is wrong."""
    path = Path(folder) / CARD_FILE
    return _validated(ModelCard, _read_json(path), label, str(path))


@dataclass(frozen=True)
class ModelVersion:
    name: str
    version: str
    path: Path
    card: ModelCard

    @property
    def model_file(self) -> Path:
        return self.path / MODEL_FILE

    @property
    def threshold(self) -> float:
        return self.card.threshold

    @property
    def label(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def test_metrics(self) -> SplitMetrics | None:
        """The one recorded test evaluation (card or test report); None if test was never read."""
        in_card = self.card.metrics.test
        if in_card is not None and in_card.dump():
            return in_card
        report = _read_json(self.path / TEST_REPORT_FILE).get("metrics") or None
        return _validated(SplitMetrics, report, self.label, TEST_REPORT_FILE) if report else None

    @property
    def scope(self) -> Scope | None:
        """Intended use and pixel check (card, or `scope.json` beside an older card); None if none."""
        if self.card.scope is not None and self.card.scope.dump():
            return self.card.scope
        older = _read_json(self.path / SCOPE_FILE)
        return _validated(Scope, older, self.label, SCOPE_FILE) if older else None


def sha256_file(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def new_version() -> str:
    """Sortable UTC timestamp; unique enough for runs that take minutes."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(temporary, path)


def served_versions(models_dir: Path = DEFAULT_MODELS_DIR) -> dict[str, str]:
    return _read_json(Path(models_dir) / SERVED_FILE)


def list_versions(models_dir: Path = DEFAULT_MODELS_DIR) -> list[ModelVersion]:
    """Every registered version, by name then version."""
    found = []
    for card_path in sorted(Path(models_dir).glob(f"*/*/{CARD_FILE}")):
        folder = card_path.parent
        label = f"{folder.parent.name}@{folder.name}"
        found.append(ModelVersion(folder.parent.name, folder.name, folder, load_card(folder, label)))
    return found


def resolve(spec: str, models_dir: Path = DEFAULT_MODELS_DIR) -> ModelVersion:
    """`name@version`, or `name` for its served version."""
    name, _, version = spec.partition("@")
    if not version:
        version = served_versions(models_dir).get(name, "")
        if not version:
            known = sorted({v.name for v in list_versions(models_dir)})
            raise RegistryError(
                f"model {name!r} has no served version in {models_dir}; known models: {known}. "
                f"Run `pneumo models serve {name} <version>`."
            )
    folder = Path(models_dir) / name / version
    if not (folder / CARD_FILE).exists():
        raise RegistryError(f"no model {name}@{version} in {models_dir} (no {CARD_FILE})")
    return ModelVersion(name, version, folder, load_card(folder, f"{name}@{version}"))


def mark_served(
    name: str, version: str, models_dir: Path = DEFAULT_MODELS_DIR, silent: bool = False
) -> None:
    """Serve `version`; `silent`: its results are recorded, nothing is sent until the site accepts.

    Either write order fails safe: a silent entry names a version, so a stale one only withholds
    SRs of the version it names (written before the served marker when set, after when cleared).
    """
    resolve(f"{name}@{version}", models_dir)
    if silent:
        _set_role("silent", name, version, models_dir)
    served = served_versions(models_dir)
    served[name] = version
    _write_json_atomic(Path(models_dir) / SERVED_FILE, served)
    if not silent:
        _set_role("silent", name, None, models_dir)
    if _roles(models_dir)["candidate"].get(name) == version:
        _set_role("candidate", name, None, models_dir)


def _roles(models_dir: Path) -> dict[str, dict[str, str]]:
    data = _read_json(Path(models_dir) / ROLES_FILE)
    return {role: dict(data.get(role) or {}) for role in ("candidate", "silent")}


def _set_role(role: str, name: str, version: str | None, models_dir: Path) -> None:
    roles = _roles(models_dir)
    if roles[role].get(name) == version:
        return  # unchanged: a registry without roles gets no file
    if version is None:
        roles[role].pop(name, None)
    else:
        roles[role][name] = version
    _write_json_atomic(Path(models_dir) / ROLES_FILE, roles)


def candidate_versions(models_dir: Path = DEFAULT_MODELS_DIR) -> dict[str, str]:
    """Per model name, the version run beside the served one (never the served one itself)."""
    served = served_versions(models_dir)
    return {n: v for n, v in _roles(models_dir)["candidate"].items() if served.get(n) != v}


def silent_versions(models_dir: Path = DEFAULT_MODELS_DIR) -> dict[str, str]:
    """Per model name, its served version while it is silent (not yet accepted by the site)."""
    served = served_versions(models_dir)
    return {n: v for n, v in _roles(models_dir)["silent"].items() if served.get(n) == v}


def withheld_versions(models_dir: Path = DEFAULT_MODELS_DIR) -> set[tuple[str, str]]:
    """(name, version) whose results must never reach a PACS: candidates and silent versions."""
    return {*candidate_versions(models_dir).items(), *silent_versions(models_dir).items()}


def mark_candidate(name: str, version: str, models_dir: Path = DEFAULT_MODELS_DIR) -> ModelVersion:
    """Run `version` beside the served one (one candidate per name; a new one replaces it)."""
    candidate = resolve(f"{name}@{version}", models_dir)
    verify(candidate)
    if served_versions(models_dir).get(name) == version:
        raise RegistryError(f"{candidate.label} is the served version; a candidate runs beside it")
    if candidate.scope is None:
        raise RegistryError(f"{candidate.label} has no pixel check; run `pneumo scope fit`")
    _set_role("candidate", name, version, models_dir)
    return candidate


def clear_candidate(name: str, models_dir: Path = DEFAULT_MODELS_DIR) -> str | None:
    """Stop running `name`'s candidate; the version it was, or None if there was none."""
    version = candidate_versions(models_dir).get(name)
    _set_role("candidate", name, None, models_dir)
    return version


def accept_silent(name: str, models_dir: Path = DEFAULT_MODELS_DIR) -> str:
    """The site accepts `name`'s silent served version: from now on its SRs are sent."""
    version = silent_versions(models_dir).get(name)
    if version is None:
        raise RegistryError(f"{name} has no silent served version to accept")
    _set_role("silent", name, None, models_dir)
    return version


def _card_fields(card: ModelCard | dict[str, Any]) -> dict[str, Any]:
    return card.dump() if isinstance(card, ModelCard) else dict(card)


def _write_card(folder: Path, card: dict[str, Any], label: str) -> ModelCard:
    """Validate `card` and write its JSON form; the card returned is the one a later load reads."""
    written = _validated(ModelCard, card, label, "the card to register").dump()
    (folder / CARD_FILE).write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    return ModelCard.model_validate(written)


def register(
    name: str,
    model: Any,
    card: ModelCard | dict[str, Any],
    models_dir: Path = DEFAULT_MODELS_DIR,
    extra_files: Sequence[Path] = (),
    version: str | None = None,
    detector_file: Path | None = None,
) -> ModelVersion:
    """Write a new immutable version folder; the first version of a name becomes served.

    With `detector_file`, the card's `scope` records its name and SHA-256 (training.ood).
    `card` (a ModelCard, or a dict of its fields) is validated before anything is written.
    """
    card = _card_fields(card)
    version = version or new_version()
    final = Path(models_dir) / name / version
    if final.exists():
        raise RegistryError(f"{name}@{version} already exists; versions are immutable")
    staging = final.with_name(f".staging-{version}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save(staging / MODEL_FILE)
    for extra in [*extra_files, *([detector_file] if detector_file else [])]:
        shutil.copy2(extra, staging / Path(extra).name)
    if detector_file:
        card = {**card, "scope": {
            **card.get("scope", {}), "detector_file": Path(detector_file).name,
            "detector_sha256": sha256_file(staging / Path(detector_file).name),
        }}
    card = {
        **card,
        "name": name,
        "version": version,
        "model_file": MODEL_FILE,
        "model_sha256": sha256_file(staging / MODEL_FILE),
        "preprocessing": contract.preprocessing_contract(),
    }
    try:
        written = _write_card(staging, card, f"{name}@{version}")
    except CardError:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    for path in staging.iterdir():
        path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
    os.replace(staging, final)
    if name not in served_versions(models_dir):
        mark_served(name, version, models_dir)
    return ModelVersion(name, version, final, written)


def ensure_test_unread(model_version: ModelVersion) -> None:
    """Refuse a second test evaluation of a version that has one recorded."""
    if model_version.test_metrics is not None:
        raise RegistryError(
            f"{model_version.label} already has test metrics recorded; the test split is read "
            f"once per version, for the report"
        )


def record_test_report(
    model_version: ModelVersion, report: dict[str, Any], plots: Sequence[Path] = ()
) -> Path:
    """Add the version's one test evaluation to its folder; refuse if one is already recorded.

    The card stays as registered (its model hash and validation choices predate any test look);
    the report sits next to it, read-only, with the plots it names.
    """
    ensure_test_unread(model_version)
    target = model_version.path / TEST_REPORT_FILE
    read_only = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
    try:
        for plot in plots:
            shutil.copy2(plot, model_version.path / Path(plot).name)
            (model_version.path / Path(plot).name).chmod(read_only)
        _write_json_atomic(target, report)  # last: a report on disk means the plots are too
        target.chmod(read_only)
    except OSError as error:
        raise RegistryError(
            f"cannot record the test report of {model_version.label} in {model_version.path}: "
            f"{error}. Run it where models/ is writable (a checkout, not a deployed image)."
        ) from error
    return target


def record_scope(model_version: ModelVersion, scope: dict[str, Any], detector_file: Path) -> Path:
    """Give a version registered before pixel checks its scope, once: the card stays as it was.

    The detector file is copied next to the card and its hash written into `scope.json`.
    """
    if model_version.scope is not None:
        raise RegistryError(f"{model_version.label} already has a scope; versions are immutable")
    target = model_version.path / Path(detector_file).name
    read_only = stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH
    try:
        shutil.copy2(detector_file, target)
        target.chmod(read_only)
        scope = {**scope, "detector_file": target.name, "detector_sha256": sha256_file(target)}
        _write_json_atomic(model_version.path / SCOPE_FILE, scope)
        (model_version.path / SCOPE_FILE).chmod(read_only)
    except OSError as error:
        raise RegistryError(f"cannot record the scope of {model_version.label}: {error}") from error
    return model_version.path / SCOPE_FILE


def verify(model_version: ModelVersion) -> None:
    """Refuse a model whose file changed since registration or whose contract differs."""
    if not model_version.model_file.exists():
        raise RegistryError(f"{model_version.label}: {model_version.model_file} is missing")
    expected = model_version.card.model_sha256
    actual = sha256_file(model_version.model_file)
    if actual != expected:
        raise ModelIntegrityError(
            f"{model_version.label}: {MODEL_FILE} has SHA-256 {actual[:16]}..., but its card "
            f"records {str(expected)[:16]}...; the file was changed after registration. "
            f"Restore it from git or register a new version."
        )
    try:
        contract.resize_of(model_version.card.preprocessing.dump())
    except ValueError as error:
        raise RegistryError(f"{model_version.label} was trained with another preprocessing "
                            f"contract: {error}") from error


def register_copy(
    parent: ModelVersion,
    card: ModelCard | dict[str, Any],
    models_dir: Path = DEFAULT_MODELS_DIR,
    extra_files: Sequence[Path] = (),
    version: str | None = None,
    detector_file: Path | None = None,
    resize: str | None = None,
) -> ModelVersion:
    """A new immutable version of `parent`'s name with the same model file. Never marked served.

    The parent's model file is verified against its hash and copied byte for byte. By default the
    pixel check and preprocessing are the parent's too (`pneumo calibrate`); `detector_file` (with
    the card's `scope`) and `resize` give the copy a pixel check and input path of its own (a
    refit: `pneumo scope refit`).
    """
    verify(parent)
    if detector_file is None:
        scope = parent.scope or Scope()
        detector = parent.path / str(scope.detector_file or "")
        if not scope.detector_file or not detector.is_file():
            raise RegistryError(f"{parent.label} has no pixel check to copy; run `pneumo scope fit`")
        if sha256_file(detector) != scope.detector_sha256:
            raise ModelIntegrityError(f"{parent.label}: {detector.name} differs from the hash its "
                                      f"scope records; it was changed after it was fitted")
        scope_fields = scope.dump()
    else:
        detector = Path(detector_file)
        scope_fields = dict(_card_fields(card).get("scope") or {}, detector_file=detector.name)
    version = version or new_version()
    final = Path(models_dir) / parent.name / version
    if final.exists():
        raise RegistryError(f"{parent.name}@{version} already exists; versions are immutable")
    staging = final.with_name(f".staging-{version}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        shutil.copyfile(parent.model_file, staging / MODEL_FILE)
        shutil.copyfile(detector, staging / detector.name)
        for extra in extra_files:
            shutil.copy2(extra, staging / Path(extra).name)
        preprocessing = (contract.preprocessing_contract(resize) if resize
                         else parent.card.preprocessing.dump())
        card = {
            **_card_fields(card),
            "scope": {**scope_fields, "detector_sha256": sha256_file(staging / detector.name)},
            "name": parent.name,
            "version": version,
            "model_file": MODEL_FILE,
            "model_sha256": sha256_file(staging / MODEL_FILE),
            "preprocessing": preprocessing,
        }
        if card["model_sha256"] != parent.card.model_sha256:
            raise ModelIntegrityError(f"{parent.label}: the copy of {MODEL_FILE} differs from it")
        written = _write_card(staging, card, f"{parent.name}@{version}")
        for path in staging.iterdir():
            path.chmod(stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        os.replace(staging, final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ModelVersion(parent.name, version, final, written)
