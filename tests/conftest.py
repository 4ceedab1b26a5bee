"""Shared fixtures: where ../shared is, and small data sets built from it."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PNEUMO_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data" / "chest_xray"
WEIGHTS = SHARED / "weights"
SMALL_MOBILENET = WEIGHTS / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
REAL_DICOM = SHARED / "dicom" / "real"


def pytest_configure(config: pytest.Config) -> None:
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # The unit tier (`make test-unit`, `-m unit`) needs no ../shared; every other run does.
    if not DATA.is_dir() and "unit" not in (config.option.markexpr or ""):
        raise pytest.UsageError(f"shared data not found at {DATA}; set PNEUMO_SHARED")


# --- tiers: markers applied from what a test uses ----------------------------------------------
#
# `make test-unit` runs `-m unit`: the tests that need none of ../shared, PostgreSQL and Redis.
# Nobody marks a test by hand: a test is `shared`, `postgres` or `redis` when it (or a fixture it
# uses, or a tests module it imports from) uses what names them below; the rest are `unit`.
# Full-stack folders (processes, drills) count as needing all three. `make test` deselects nothing.

NEEDS_FIXTURES = {
    "shared": {"tiny_data", "tiny_registry", "classifier"},
    "postgres": {"postgres_url", "database_url_postgres_fresh"},
    "redis": set(),
}
NEEDS_EVERYTHING = ("pipeline", "drills")  # folders under tests/ that run the whole product


def _needs_names() -> dict[str, set[str]]:
    """This module's names that mean a dependency when a test module imports them."""
    return {
        "shared": {"SHARED", "DATA", "WEIGHTS", "SMALL_MOBILENET", "REAL_DICOM", "link_subset",
                   "register_with_scope"},
        "postgres": {"POSTGRES_ADMIN_URL"},
        "redis": {"REDIS_TEST_URL"},
    }


def _module_needs(module: ModuleType, seen: dict[str, set[str]]) -> set[str]:
    """What a tests module needs: conftest names it imports, and (transitively) what the tests
    modules it imports objects from need."""
    name = getattr(module, "__name__", "")
    if name in seen:
        return seen[name]
    seen[name] = needs = set()
    relative = name.split(".")
    if len(relative) > 1 and relative[1] in NEEDS_EVERYTHING:
        needs |= set(NEEDS_FIXTURES)
    this = globals()
    for attribute, value in vars(module).items():
        if name != __name__:
            for need, names in _needs_names().items():
                if attribute in names and this.get(attribute) is value:
                    needs.add(need)
        origin = getattr(value, "__module__", None) or getattr(getattr(value, "__wrapped__", None),
                                                               "__module__", None)
        loaded = _tests_module(origin) if isinstance(origin, str) else None
        if loaded is not None and origin not in (name, __name__):
            needs |= _module_needs(loaded, seen)
    return needs


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seen: dict[str, set[str]] = {}
    for item in items:
        needs: set[str] = set()
        module = getattr(item, "module", None)
        if module is not None:
            needs |= _module_needs(module, seen)
        fixture_info = getattr(item, "_fixtureinfo", None)
        definitions = fixture_info.name2fixturedefs if fixture_info is not None else {}
        params = getattr(getattr(item, "callspec", None), "params", {})
        for fixture in getattr(item, "fixturenames", ()):
            for need, names in NEEDS_FIXTURES.items():
                if fixture in names:
                    needs.add(need)
            if fixture == "database_url" and params.get("database_url") == "postgresql":
                needs.add("postgres")
            for definition in definitions.get(fixture, ()):
                origin = _tests_module(getattr(definition.func, "__module__", ""))
                if origin is not None and origin.__name__ != __name__:
                    needs |= _module_needs(origin, seen)
        for need in sorted(needs):
            item.add_marker(getattr(pytest.mark, need))
        if not needs:
            item.add_marker(pytest.mark.unit)


@pytest.hookimpl(wrapper=True)
def pytest_make_collect_report(collector: pytest.Collector):
    """In the unit tier without ../shared, a module that reads ../shared on import is skipped as
    needing it (it is not a unit test) instead of failing the collection."""
    report = yield
    if (report.failed and isinstance(collector, pytest.Module) and not DATA.is_dir()
            and "unit" in (collector.config.option.markexpr or "") and str(SHARED) in str(report.longrepr)):
        report.outcome = "skipped"
        report.longrepr = (str(collector.path), None, f"Skipped: needs ../shared (reads {SHARED} on import)")
    return report


def _tests_module(name: str) -> ModuleType | None:
    """The loaded tests module called `name`; None for library modules."""
    return sys.modules.get(name) if name.startswith("tests.") else None


def link_subset(root: Path, split: str, class_name: str, count: int) -> None:
    """Symlink `count` spread-out images of one class into a Kaggle-layout folder."""
    files = sorted((DATA / split / class_name).iterdir())
    source = files[:: len(files) // count][:count]
    target = root / split / class_name
    target.mkdir(parents=True, exist_ok=True)
    for path in source:
        (target / path.name).symlink_to(path)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A few dozen images in the Kaggle layout (links into ../shared, nothing copied)."""
    root = tmp_path_factory.mktemp("chest_xray")
    for class_name in ("NORMAL", "PNEUMONIA"):
        link_subset(root, "train", class_name, 24)
        link_subset(root, "test", class_name, 8)
    return root


# --- databases and services -------------------------------------------------------------------

POSTGRES_ADMIN_URL = os.environ.get(
    "PNEUMO_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_TEST_URL = os.environ.get("PNEUMO_TEST_REDIS", "redis://127.0.0.1:6379")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    import uuid

    from sqlalchemy import create_engine, text

    name = f"pneumo_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with admin.connect() as connection:
        connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database on each back-end."""

    from core.migrate import upgrade

    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'pneumo.db'}"
    else:
        url = request.getfixturevalue("database_url_postgres_fresh")
    upgrade(url)
    return url


@pytest.fixture
def database_url_postgres_fresh(postgres_url: str) -> str:
    """The session's PostgreSQL database, emptied (not migrated) for this test."""
    from sqlalchemy import text

    from core.db import make_engine

    engine = make_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    return postgres_url


@pytest.fixture
def sessions(database_url: str):
    from core.db import session_factory

    factory = session_factory(database_url)
    yield factory
    factory.kw["bind"].dispose()


@pytest.fixture(scope="session")
def tiny_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A registry with a small untrained CNN served as pneumonia-transfer (fast to load)."""
    import keras

    from training import models

    folder = tmp_path_factory.mktemp("models")
    keras.utils.set_random_seed(1)
    model = models.build_cnn(filters=(4, 8), dense_units=4)
    register_with_scope(model, "pneumonia-transfer", folder, "test-1", accept_all=True)
    return folder


@pytest.fixture
def classifier(tiny_registry: Path):
    """The worker's classifier for tests that call its functions directly (tiny test model)."""
    from worker.inference import Classifier

    model = Classifier("pneumonia-transfer", tiny_registry)
    return lambda: model


def register_with_scope(model, name: str, folder: Path, version: str, accept_all: bool = False,
                        card: dict | None = None, images: int = 24):
    """Register `model` with a pixel check fitted on `images` Kermany train/ images per class and
    held out on as many others. `accept_all`: no age, view or pixel limits, for tests of the
    pipeline's mechanics (tests/worker/test_scope.py tests the refusals with real limits)."""
    import tempfile

    import numpy as np

    from core import registry
    from serving import pixelcheck
    from serving.image import preprocess_many
    from training.scope import fit_detector, kermany_site, scope_card

    files = {c: sorted((DATA / "train" / c).iterdir())[::20][: 2 * images] for c in ("NORMAL", "PNEUMONIA")}
    fit_paths = files["NORMAL"][:images] + files["PNEUMONIA"][:images]
    held_paths = files["NORMAL"][images:] + files["PNEUMONIA"][images:]
    groups = np.array(["kermany/NORMAL"] * images + ["kermany/PNEUMONIA"] * images)
    detector, summary = fit_detector(model, preprocess_many(fit_paths), groups, preprocess_many(held_paths))
    site = kermany_site(len(fit_paths))
    if accept_all:
        detector = pixelcheck.Detector(detector.layers, detector.means, detector.precision, 1e30, 0.0)
        summary = {**summary, "threshold": 1e30, "false_refusal_rate": 0.0}
        site = {**site, "views": [], "age_years": None}
    with tempfile.TemporaryDirectory() as staging:
        detector_file = pixelcheck.save(detector, Path(staging))
        return registry.register(name, model, {"threshold": 0.5, **(card or {}),
                                               "scope": scope_card(summary, [site])},
                                 folder, version=version, detector_file=detector_file)
