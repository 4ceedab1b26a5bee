"""Issue 19 item 4: full-resolution paediatric films as a modality sends them (DX 8-bit, 12-bit
MONOCHROME1, JPEG 2000) through `pneumo run` with the served models to a PACS (dcmtk storescp):
each comes back classified, Present or Absent, with the label its 224 px copy gets.

The films are held-out originals from ../shared/data/chest_xray_fullres: their patients are in the
served version's validation split, so neither they nor their copies were fitted on.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread

from devtools.corpus import variant
from ops.send import wrap_image
from tests.conftest import DATA, SHARED
from tests.helpers import dcmtk, wait_for
from tests.pipeline.conftest import REPO, embedded_env, sr_files

pytestmark = pytest.mark.slow

FULLRES = SHARED / "data" / "chest_xray_fullres" / "train"
# Held-out originals (training.fullres.held_out_split of the served transfer version).
# The first held-out films by name with a short side of 1,000 px or more (one NORMAL, two
# PNEUMONIA), chosen before looking at any score.
FILMS = ("NORMAL/IM-0269-0001.jpeg", "PNEUMONIA/person1068_bacteria_3002.jpeg",
         "PNEUMONIA/person1150_bacteria_3095.jpeg")
KINDS = ("dx8", "dx12_mono1", "j2k_lossy")
CHILD = {"PatientAge": "003Y", "ViewPosition": "AP"}


@pytest.fixture
def pipeline_env(tmp_path: Path, pacs_address: dict) -> dict[str, str]:
    """The embedded run with the committed registry: the versions a site is served."""
    return embedded_env(tmp_path / "home", pacs_address["ae"], REPO / "models")


def studies_kind(path: Path) -> str:
    """The encoding a file of this test was written in: JPEG 2000 needs its own proposal."""
    syntax = dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID
    return "j2k_lossy" if syntax.is_compressed else "uncompressed"


def finding(path: Path) -> str:
    """Present, Absent or Undetermined: the SR's finding as dcmtk's dsrdump reads it."""
    dump = subprocess.run([dcmtk("dsrdump"), str(path)], capture_output=True, text=True)
    assert dump.returncode == 0 and not dump.stderr, dump.stderr
    found = set(re.findall(r'"(Present|Absent|Undetermined)"', dump.stdout))
    assert len(found) == 1, dump.stdout
    return found.pop()


def test_full_resolution_films_are_classified_like_their_224_copies(
    running: dict[str, str], pacs, tmp_path: Path
) -> None:
    outgoing = tmp_path / "outgoing"
    outgoing.mkdir()
    studies: dict[str, tuple[str, str]] = {}  # study UID -> (film, encoding)
    for film in FILMS:
        sources = [(FULLRES / film, kind) for kind in KINDS] + [(DATA / "train" / film, "copy")]
        for source, kind in sources:
            dataset = variant(wrap_image(source), "dx8" if kind == "copy" else kind, **CHILD)
            dataset.save_as(outgoing / f"{len(studies)}.dcm", enforce_file_format=True)
            studies[dataset.StudyInstanceUID] = (film, kind)
    assert max(dcmread(p).Rows for p in outgoing.iterdir()) > 1000  # films, not thumbnails
    compressed = {str(p) for p in outgoing.iterdir() if studies_kind(p) == "j2k_lossy"}
    for options, paths in ((["-xw"], sorted(compressed)),
                           ([], sorted(str(p) for p in outgoing.iterdir() if str(p) not in compressed))):
        sent = subprocess.run(
            [dcmtk("storescu"), *options, "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1",
             running["PNEUMO_PORT"], *paths], capture_output=True, text=True, timeout=300)
        assert sent.returncode == 0, sent.stderr[-2000:]
    files = wait_for(lambda: len(sr_files(pacs["folder"])) >= len(studies) and sr_files(pacs["folder"]),
                     300, f"{len(studies)} SRs at the PACS")
    findings: dict[str, dict[str, str]] = {}
    for path in files:
        film, kind = studies[str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)]
        findings.setdefault(film, {})[kind] = finding(path)
    assert set(findings) == set(FILMS)
    for film, by_kind in findings.items():
        assert set(by_kind) == {*KINDS, "copy"}, film
        assert by_kind["copy"] in {"Present", "Absent"}, (film, by_kind)
        assert all(value == by_kind["copy"] for value in by_kind.values()), (film, by_kind)
