"""Issue 20's first done-when, as users run it: a study through `pneumo run` (embedded defaults,
the served model of models/) to dcmtk's storescp yields the SR and a picture series in the same
study; the picture decodes, shows the heat map and the burned-in words; the refused image's
picture says why; the SR names the version with its device UID and dsrdump reads it cleanly.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import SecondaryCaptureImageStorage
from sqlalchemy import select

from core.db import Instance, Result, session_factory
from ops.send import wrap_image
from tests.conftest import DATA, REPO
from tests.helpers import dcmtk, echo, wait_for
from tests.pipeline.conftest import embedded_env, sr_files, stop_pneumo_run
from worker import picture
from worker.report import device_uid

pytestmark = pytest.mark.slow

SERVED = ("pneumonia-transfer", "20261207T171404Z")


@pytest.fixture
def running_served(tmp_path: Path, pacs):
    """`pneumo run` on embedded defaults with the served models (the real heat map)."""
    env = embedded_env(tmp_path / "home", pacs["ae"], REPO / "models")
    process = subprocess.Popen([sys.executable, "-m", "ops.cli", "run"], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for(lambda: echo(env["PNEUMO_PORT"]), 90, "the node to answer C-ECHO")
        yield env
    finally:
        stop_pneumo_run(process, Path(env["PNEUMO_HOME"]))


def _band(rgb: np.ndarray) -> int:
    return rgb.shape[0] // 5


def _coloured(rgb: np.ndarray) -> np.ndarray:
    return (rgb.max(axis=2).astype(int) - rgb.min(axis=2).astype(int)) > 40


def test_a_study_gets_its_sr_and_a_picture_series(running_served, pacs, tmp_path: Path) -> None:
    child = wrap_image(sorted((DATA / "test" / "PNEUMONIA").iterdir())[0])
    adult = wrap_image(sorted((DATA / "test" / "NORMAL").iterdir())[0], study=child)
    adult.PatientAge = "045Y"  # outside the served version's 1-5 years: refused, still pictured
    outgoing = tmp_path / "outgoing"
    outgoing.mkdir()
    for name, dataset in (("child", child), ("adult", adult)):
        dataset.save_as(outgoing / f"{name}.dcm", enforce_file_format=True)
    started = time.monotonic()
    subprocess.run([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1",
                    running_served["PNEUMO_PORT"], *map(str, sorted(outgoing.iterdir()))],
                   check=True, capture_output=True)
    (sr_path,) = wait_for(lambda: sr_files(pacs["folder"]), 180, "the SR at the PACS")
    print(f"storescu to the SR at the PACS: {time.monotonic() - started:.1f} s")
    pictures = {dcmread(p).SourceImageSequence[0].ReferencedSOPInstanceUID: dcmread(p)
                for p in pacs["folder"].glob("SC.*")}
    assert set(pictures) == {child.SOPInstanceUID, adult.SOPInstanceUID}

    report = dcmread(sr_path)
    referenced = {str(sop.ReferencedSOPInstanceUID)
                  for study in report.CurrentRequestedProcedureEvidenceSequence
                  for series in study.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence
                  if sop.ReferencedSOPClassUID == SecondaryCaptureImageStorage}
    assert referenced == {p.SOPInstanceUID for p in pictures.values()}
    for shown in pictures.values():
        assert shown.StudyInstanceUID == child.StudyInstanceUID
        assert shown.SeriesInstanceUID not in (child.SeriesInstanceUID, report.SeriesInstanceUID)
    assert len({p.SeriesInstanceUID for p in pictures.values()}) == 1  # one picture series
    dump = subprocess.run(["/usr/bin/dsrdump", str(sr_path)], capture_output=True, text=True)
    assert dump.returncode == 0 and not dump.stderr, dump.stderr
    assert "Illustration of Finding" in dump.stdout and "Intended use and limitations" in dump.stdout
    (ours,) = [e for e in report.ContributingEquipmentSequence if "DeviceUID" in e]
    card_sha = json.loads((REPO / "models" / SERVED[0] / SERVED[1] / "card.json").read_text())["model_sha256"]
    assert (ours.ManufacturerModelName, ours.SoftwareVersions, ours.DeviceUID) == (
        *SERVED, device_uid(*SERVED, card_sha))

    # The classified image: the map coloured in, the words burned in exactly as drawn from the
    # grey image and map kept beside the stored image, the same as from the original (another
    # text, or none, gives other pixels).
    shown = pictures[child.SOPInstanceUID].pixel_array
    band = _band(shown)
    assert _coloured(shown[band:]).mean() > 0.01
    sessions = session_factory(f"sqlite:///{running_served['PNEUMO_HOME']}/pneumo.db")
    with sessions() as session:
        path, result = session.execute(select(Instance.path, Result).join(Result).where(
            Instance.sop_instance_uid == child.SOPInstanceUID)).one()
    stored = Path(path)
    cam, grey = picture.load_map(stored, *SERVED), picture.load_grey(stored)
    assert cam is not None and grey is not None  # both kept at classify time
    lines = picture.picture_lines(picture.Version(*SERVED, result.threshold), result.probability,
                                  result.label == "PNEUMONIA", None)
    drawn = picture.render(None, cam, lines, grey)
    assert (drawn == shown).all()
    assert (picture.render(dcmread(stored), cam, lines) == shown).all()  # as from the original
    assert (picture.render(dcmread(stored), cam, lines[:2])[:band] != shown[:band]).any()
    # The refused image: its picture says why, and carries no map.
    refused = pictures[adult.SOPInstanceUID].pixel_array
    assert not _coloured(refused[_band(refused):]).any()
