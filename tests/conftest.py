"""Shared fixtures: where ../shared is, and small data sets built from it."""

from __future__ import annotations

import os
from pathlib import Path

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
    if not DATA.is_dir():
        raise pytest.UsageError(f"shared data not found at {DATA}; set PNEUMO_SHARED")


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
