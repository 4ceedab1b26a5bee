"""Issue 23 row 3, as written: images whose header has PatientSex U or X, or Specific Character
Set 'ISO_IR 999' or 'ISO_IR_100', were classified but their SR "could not be built: ValueError"
and the delivery went `dead` after 6 tries. Now each study's SR reaches the PACS (dcmtk's
storescp), dsrdump reads it without a warning, and the audit names what was changed, never the
value.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from core.db import AuditEvent, session_factory
from ops.send import wrap_image
from tests.conftest import DATA
from tests.helpers import dcmtk, wait_for
from tests.pipeline.conftest import database_url, sr_files

pytestmark = pytest.mark.slow
NAME = "Qzx^Zaïra"  # Latin-1 text: what a character set must carry
CASES = {  # header value -> what the SR holds, what the audit names
    ("PatientSex", "U"): ("PatientSex", "", "PatientSex"),
    ("PatientSex", "X"): ("PatientSex", "", "PatientSex"),
    ("SpecificCharacterSet", "ISO_IR 999"): ("SpecificCharacterSet", "ISO_IR 100",
                                             "SpecificCharacterSet repaired"),
    ("SpecificCharacterSet", "ISO_IR_100"): ("SpecificCharacterSet", "ISO_IR 100",
                                             "SpecificCharacterSet repaired"),
}


@pytest.mark.parametrize("pipeline_env", ["embedded"], indirect=True)
def test_sr_reaches_the_pacs_whatever_sex_or_character_set(
    running: dict[str, str], pacs, tmp_path: Path
) -> None:
    images = sorted((DATA / "test" / "PNEUMONIA").iterdir())[: len(CASES)]
    outgoing = tmp_path / "outgoing"
    outgoing.mkdir()
    expected = {}
    for image, ((keyword, value), outcome) in zip(images, CASES.items(), strict=True):
        dataset = wrap_image(image)
        dataset.PatientName = NAME
        dataset.SpecificCharacterSet = "ISO_IR 100"
        setattr(dataset, keyword, value)
        dataset.save_as(outgoing / f"{image.stem}.dcm", enforce_file_format=True)
        expected[dataset.StudyInstanceUID] = outcome
    subprocess.run(
        [dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", running["PNEUMO_PORT"],
         *map(str, sorted(outgoing.iterdir()))],
        check=True, capture_output=True,
    )
    files = wait_for(lambda: len(sr_files(pacs["folder"])) >= len(CASES) and sr_files(pacs["folder"]),
                     180, "an SR per study at the PACS")
    for path in files:
        report = dcmread(path)
        keyword, value, _ = expected[report.StudyInstanceUID]
        assert str(report.get(keyword) or "") == value
        assert report.PatientName == NAME
        dump = subprocess.run([dcmtk("dsrdump"), str(path)], capture_output=True, text=True,
                              errors="replace")
        assert dump.returncode == 0 and not dump.stderr, dump.stderr

    sessions = session_factory(database_url(running))
    with sessions() as session:
        audited = session.scalars(
            select(AuditEvent.detail).where(AuditEvent.event == "sr_values_dropped")).all()
    named = sorted(outcome[2] for outcome in expected.values())
    assert sorted(detail.split(": ", 1)[1].removesuffix(" (1 image(s))") for detail in audited) == named
    assert not [detail for detail in audited if "Qzx" in detail or "ISO_IR 999" in detail]
