"""PNEUMO_PICTURES off: the classify path keeps nothing for a picture (no grey copy, no map);
on: it keeps both beside the stored image, for delivery to draw from."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from core.db import Instance
from ops.send import wrap_image
from tests.pipeline.test_delivery import store
from tests.worker.test_shadow import IMAGES, served_classifier
from worker import classify, picture


def test_pictures_off_keeps_nothing_beside_the_image(sessions, tiny_registry: Path, tmp_path: Path) -> None:
    model = served_classifier(tiny_registry)
    kept = {}
    for pictures in (False, True):
        instance_id = store(wrap_image(IMAGES[pictures]), sessions, tmp_path)
        assert classify.classify_instance(sessions, instance_id, model, pictures) == "classified"
        with sessions() as session:
            path = Path(session.scalar(select(Instance.path).where(Instance.id == instance_id)))
        kept[pictures] = picture.kept_maps(path)
    assert kept[False] == []
    assert len(kept[True]) == 2  # the map and the grey copy
