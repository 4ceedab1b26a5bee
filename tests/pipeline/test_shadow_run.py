"""Shadow and silent as a site runs them: `pneumo run` (embedded), dcmtk storescu as the modality
and storescp as the PACS. With a candidate in shadow every in-scope image has two results, the
PACS receives only the served version's objects, and the dashboard shows the agreement; a silent
version sends nothing until the site accepts it."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from core import registry
from core.db import AuditEvent, Delivery, Instance, Result, session_factory
from ops.send import wrap_image
from tests.helpers import dcmtk, wait_for
from tests.ops.test_cli import pneumo
from tests.pipeline.conftest import database_url, embedded_env
from tests.worker.test_shadow import IMAGES, NAME, shadow_registry

pytestmark = pytest.mark.slow


@pytest.fixture
def pipeline_env(tmp_path: Path, tiny_registry: Path, pacs_address) -> dict[str, str]:
    """The embedded run on a registry with test-1 served and test-2 (another threshold) beside it."""
    models = shadow_registry(tiny_registry, tmp_path / "models")
    return embedded_env(tmp_path / "home", pacs_address["ae"], models)


def send(env: dict[str, str], tmp_path: Path, images: list[Path], per_study: int) -> list[str]:
    """Store `images` through storescu, `per_study` to a study; their SOP Instance UIDs."""
    outgoing = tmp_path / f"outgoing-{time.monotonic_ns()}"
    outgoing.mkdir()
    first, uids = None, []
    for index, image in enumerate(images):
        first = None if index % per_study == 0 else first
        dataset = wrap_image(image, study=first)
        first = first or dataset
        dataset.save_as(outgoing / f"{index}.dcm", enforce_file_format=True)
        uids.append(dataset.SOPInstanceUID)
    subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1",
                    env["PNEUMO_PORT"], *map(str, sorted(outgoing.iterdir()))],
                   check=True, capture_output=True)
    return uids


def received(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def algorithm(path: Path) -> list[tuple[str, str]]:
    """The model name and version an object names as its processing algorithm (IHE AIR)."""
    dataset = dcmread(path)
    return [(e.ManufacturerModelName, e.SoftwareVersions) for e in dataset.ContributingEquipmentSequence
            if e.get("Manufacturer") == "Pneumo"]


def withheld(sessions) -> list[str]:
    with sessions() as session:
        return list(session.scalars(select(AuditEvent.detail).where(AuditEvent.event == "withheld")))


def test_a_candidate_in_shadow_is_recorded_and_never_sent(
    running: dict[str, str], pacs, tmp_path: Path
) -> None:
    models = Path(running["PNEUMO_MODELS_DIR"])
    result = pneumo("models", "candidate", NAME, "test-2", env=running)
    assert result.returncode == 0, result.stderr
    uids = send(running, tmp_path, IMAGES[:4], per_study=2)  # two studies of two images
    sessions = session_factory(database_url(running))

    wait_for(lambda: len(withheld(sessions)) >= 2, 120, "both studies finalised")
    wait_for(lambda: len([p for p in received(pacs["folder"]) if p.name.startswith("SR")]) >= 2,
             60, "the served version's two SRs at the PACS")
    time.sleep(3)  # finalise runs every few seconds: nothing more may arrive
    with sessions() as session:
        results = session.execute(select(Instance.sop_instance_uid, Result.model_version)
                                  .join(Result, Result.instance_id == Instance.id)).all()
        deliveries = session.scalars(select(Delivery)).all()
    by_image: dict[str, set[str]] = {}
    for uid, version in results:
        by_image.setdefault(uid, set()).add(version)
    assert by_image == {uid: {"test-1", "test-2"} for uid in uids}
    assert sorted((d.model_version, d.instances_reported, d.state) for d in deliveries) == [
        ("test-1", 2, "delivered"), ("test-1", 2, "delivered")]
    assert sorted(withheld(sessions)) == [f"{NAME}@test-2: 2 image(s), candidate or silent, not sent"] * 2

    objects = received(pacs["folder"])
    sr_uids = sorted(d.sr_sop_instance_uid for d in deliveries)
    assert sorted(p.name.split(".", 1)[1] for p in objects if p.name.startswith("SR")) == sr_uids
    for path in objects:  # SRs and any picture series: the served version's, never the candidate's
        assert algorithm(path) == [(NAME, "test-1")], path.name

    page = f"http://127.0.0.1:{running['PNEUMO_DASHBOARD_PORT']}"
    with urllib.request.urlopen(f"{page}/shadow.json", timeout=30) as response:
        (row,) = json.load(response)["candidates"]
    assert (row["model_name"], row["served_version"], row["candidate_version"], row["images"]) == (
        NAME, "test-1", "test-2", 4)
    assert row["percent_agree"] is not None and row["served_only"] == 0
    with urllib.request.urlopen(page, timeout=30) as response:
        html = response.read().decode()
    assert f"<td>{NAME}@test-2</td><td>test-1</td><td>4</td><td>{row['percent_agree']:.1f}%</td>" in html
    assert registry.candidate_versions(models) == {NAME: "test-2"}


def test_a_silent_version_sends_nothing_until_accepted(
    running: dict[str, str], pacs, tmp_path: Path
) -> None:
    result = pneumo("models", "serve", NAME, "test-1", "--silent", env=running)
    assert result.returncode == 0 and "silently" in result.stdout, result.stderr
    sessions = session_factory(database_url(running))
    send(running, tmp_path, IMAGES[:1], per_study=1)
    wait_for(lambda: withheld(sessions), 120, "the silent study finalised")
    time.sleep(3)
    assert received(pacs["folder"]) == []
    with sessions() as session:
        assert session.scalars(select(Result.model_version)).all() == ["test-1"]
        assert session.scalars(select(Delivery)).all() == []

    result = pneumo("models", "accept-silent", NAME, env=running)
    assert result.returncode == 0, result.stderr
    send(running, tmp_path, IMAGES[1:2], per_study=1)
    wait_for(lambda: [p for p in received(pacs["folder"]) if p.name.startswith("SR")], 120,
             "an SR once the site accepted the version")
    with sessions() as session:
        assert [d.instances_reported for d in session.scalars(select(Delivery))] == [1]
