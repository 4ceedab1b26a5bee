"""Studies with images and results written straight into a migrated database, for the label and
scorecard tests (the pipeline tests send real images; these measure the arithmetic on rows)."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from datetime import datetime

from sqlalchemy.orm import Session

from core.contract import label_for
from core.db import Instance, InstanceState, ModelVersionRow, Result, Series, Study

_numbers = itertools.count(1)


def add_study(session: Session, probabilities: Sequence[float], *, threshold: float = 0.5,
              model: tuple[str, str] = ("pneumonia-cnn", "v1"), received: datetime | None = None,
              calling_ae: str = "PACS1", accession: str | None = None) -> Study:
    """A study of one image per probability, each classified by `model` at `threshold`."""
    number = next(_numbers)
    study = Study(study_instance_uid=f"1.2.826.0.1.3680043.10.{number}", accession_number=accession,
                  **({"first_received_at": received} if received else {}))
    session.add(study)
    session.flush()
    series = Series(study_id=study.id, series_instance_uid=f"{study.study_instance_uid}.1", modality="DX")
    session.add(series)
    session.flush()
    for index, probability in enumerate(probabilities):
        instance = Instance(study_id=study.id, series_id=series.id,
                            sop_instance_uid=f"{series.series_instance_uid}.{index}",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                            transfer_syntax_uid="1.2.840.10008.1.2.1",
                            path="/nonexistent", size_bytes=1, sha256="0" * 64, calling_ae_title=calling_ae,
                            state=InstanceState.CLASSIFIED)
        session.add(instance)
        session.flush()
        session.add(Result(instance_id=instance.id, model_name=model[0], model_version=model[1],
                           probability=probability, threshold=threshold,
                           label=label_for(probability, threshold), decode_ms=1.0, inference_ms=1.0))
    return study


def add_version(session: Session, name: str, version: str, sensitivity: float, specificity: float,
                threshold: float = 0.5) -> None:
    """A served version whose card's test look measured `sensitivity` and `specificity`."""
    session.add(ModelVersionRow(name=name, version=version, model_sha256="0" * 64, threshold=threshold, card={
        "name": name, "version": version, "threshold": threshold,
        "metrics": {"test": {"n": 624, "sensitivity": sensitivity, "specificity": specificity}},
        "validation_score_histogram": [10, 8, 6, 5, 4, 3, 3, 2, 2, 2, 2, 2, 2, 3, 3, 4, 5, 6, 8, 10]}))
