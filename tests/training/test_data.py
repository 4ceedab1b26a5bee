from pathlib import Path

import pytest

from tests.conftest import DATA
from training import data


@pytest.fixture(scope="module")
def train_samples() -> list[data.Sample]:
    return data.read_split(DATA, "train")


@pytest.mark.parametrize(
    ("name", "class_name", "expected"),
    [
        ("person1000_bacteria_2931.jpeg", "PNEUMONIA", "PNEUMONIA/person1000"),
        ("person1000_virus_1681.jpeg", "PNEUMONIA", "PNEUMONIA/person1000"),
        ("IM-0115-0001.jpeg", "NORMAL", "NORMAL/IM-0115"),
        ("NORMAL2-IM-1427-0001.jpeg", "NORMAL", "NORMAL/NORMAL2-IM-1427"),
        ("odd name.jpeg", "NORMAL", "NORMAL/odd name"),
    ],
)
def test_patient_id_from_name(name: str, class_name: str, expected: str) -> None:
    assert data.patient_id_from_name(name, class_name) == expected


def test_reads_official_train_split(train_samples: list[data.Sample]) -> None:
    labels = [s.label for s in train_samples]
    assert labels.count(0) == 1341 and labels.count(1) == 3875


def test_patient_split_has_no_patient_on_both_sides(train_samples: list[data.Sample]) -> None:
    train, validation = data.patient_split(train_samples, 0.15, seed=7)
    assert {s.patient_id for s in train}.isdisjoint({s.patient_id for s in validation})
    assert len(train) + len(validation) == len(train_samples)
    # stratified: each class keeps roughly its share of patients in validation
    for label in (0, 1):
        patients = {s.patient_id for s in train_samples if s.label == label}
        held_out = {s.patient_id for s in validation if s.label == label}
        assert abs(len(held_out) / len(patients) - 0.15) < 0.01


def test_patient_split_is_reproducible_by_seed(train_samples: list[data.Sample]) -> None:
    first = data.patient_split(train_samples, 0.15, seed=1)[1]
    again = data.patient_split(train_samples, 0.15, seed=1)[1]
    other = data.patient_split(train_samples, 0.15, seed=2)[1]
    assert [s.path for s in first] == [s.path for s in again]
    assert [s.path for s in first] != [s.path for s in other]


def test_patient_split_draws_a_patient_with_both_classes_once() -> None:
    """Site data can hold one patient's normal and pneumonia films: all of them on one side, and
    the second class's draw is over the patients still free (the held share stays near the goal)."""
    samples = [data.Sample(Path(f"{p}-{label}.png"), label, p)
               for p in [f"p{i}" for i in range(40)] for label in (0, 1)]
    samples += [data.Sample(Path(f"q{i}.png"), 1, f"q{i}") for i in range(40)]
    train, held = data.patient_split(samples, 0.5, seed=3)
    assert {s.patient_id for s in train}.isdisjoint({s.patient_id for s in held})
    assert len(train) + len(held) == len(samples)
    assert len({s.patient_id for s in held}) == 20 + 30  # half of the 40 normal, then of the 60 left


def test_byte_identical_duplicates_are_dropped(tmp_path: Path) -> None:
    folder = tmp_path / "train" / "NORMAL"
    folder.mkdir(parents=True)
    (tmp_path / "train" / "PNEUMONIA").mkdir()
    source = sorted((DATA / "train" / "NORMAL").iterdir())[:2]
    (folder / "IM-0001-0001.jpeg").write_bytes(source[0].read_bytes())
    (folder / "IM-0002-0001.jpeg").write_bytes(source[0].read_bytes())
    (folder / "IM-0003-0001.jpeg").write_bytes(source[1].read_bytes())
    kept, dropped = data.drop_duplicates(data.read_split(tmp_path, "train"))
    assert dropped == 1
    assert [s.path.name for s in kept] == ["IM-0001-0001.jpeg", "IM-0003-0001.jpeg"]


def test_fingerprint_changes_with_content(tmp_path: Path) -> None:
    folder = tmp_path / "train" / "NORMAL"
    folder.mkdir(parents=True)
    (tmp_path / "train" / "PNEUMONIA").mkdir()
    image = folder / "IM-0001-0001.jpeg"
    image.write_bytes(b"one")
    before = data.fingerprint(data.read_split(tmp_path, "train"), tmp_path)
    image.write_bytes(b"two")
    assert data.fingerprint(data.read_split(tmp_path, "train"), tmp_path) != before


def test_class_weights_are_balanced(train_samples: list[data.Sample]) -> None:
    weights = data.class_weights(train_samples)
    counts = {0: 1341, 1: 3875}
    assert weights[0] * counts[0] == pytest.approx(weights[1] * counts[1])
    assert weights[0] > 1 > weights[1]


def test_missing_split_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no 'test' folder"):
        data.read_split(tmp_path, "test")
