"""Labels from the site (issue 20 item 3): a CSV import through `pneumo labels import`, and the
rule that a later label supersedes earlier ones while history and audit events stay."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sqlalchemy import func, select

from core.contract import NEGATIVE_CLASS, POSITIVE_CLASS
from core.db import AuditEvent, Label, LabelSource
from ops.labels import current_labels, record_label
from tests.conftest import REPO
from tests.ops.labelled import add_study


def pneumo(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ops.cli", *args], env={**os.environ, **env}, cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_csv_import_keeps_good_rows_and_names_each_bad_one(tmp_path: Path, database_url: str,
                                                           sessions) -> None:
    with sessions() as session, session.begin():
        study = add_study(session, [0.9], accession="ACC1001")
        uid = study.study_instance_uid
    table = tmp_path / "labels.csv"
    table.write_text(
        "study_instance_uid,accession_number,label,who\n"
        f"{uid},,pneumonia,Dr A\n"          # line 2: good, by UID
        ",ACC1001,Normal,\n"                # line 3: good, by accession (later: supersedes)
        ",ACC2002,positive,\n"              # line 4: good, study not here yet
        f"{uid},,maybe,\n"                  # line 5: not a label
        ",,normal,\n"                       # line 6: no key
        "not-a-uid,,normal,\n"              # line 7: not a UID
        f"{uid},,normal,x,extra\n")         # line 8: too many values
    env = {"PNEUMO_HOME": str(tmp_path / "home"), "PNEUMO_DATABASE_URL": database_url, "USER": "tester"}
    result = pneumo("labels", "import", str(table), env=env)
    assert result.returncode == 1, result.stderr
    assert result.stdout.strip() == "imported 3 label(s), refused 4 row(s)"
    errors = result.stderr.strip().splitlines()
    assert [line.split(":")[0] for line in errors] == [f"labels.csv line {n}" for n in (5, 6, 7, 8)]
    assert "neither pneumonia nor normal" in errors[0] and "neither a Study Instance UID" in errors[1]
    assert uid not in result.stderr  # rows are named by line, not by identifiers
    with sessions() as session:
        rows = session.scalars(select(Label).order_by(Label.id)).all()
        assert [(r.label, r.source, r.who) for r in rows] == [
            (POSITIVE_CLASS, "csv", "Dr A"), (NEGATIVE_CLASS, "csv", "tester (pneumo labels import)"),
            (POSITIVE_CLASS, "csv", "tester (pneumo labels import)")]
        assert rows[0].evidence.startswith("labels.csv line 2 (sha256 ")
        assert session.scalar(select(func.count()).select_from(AuditEvent)
                              .where(AuditEvent.entity == "label")) == 3
        current = current_labels(session)
        assert current[study.id].label == NEGATIVE_CLASS and current[study.id].earlier == 1


def test_a_later_label_supersedes_and_earlier_ones_stay(sessions) -> None:
    with sessions() as session, session.begin():
        study = add_study(session, [0.2, 0.7], accession="ACC7")
        other = add_study(session, [0.1])
        for label, key in ((NEGATIVE_CLASS, {"accession_number": "ACC7"}),
                           (POSITIVE_CLASS, {"study_instance_uid": study.study_instance_uid})):
            record_label(session, label=label, source=LabelSource.DASHBOARD, who="op", evidence="test", **key)
    with sessions() as session, session.begin():
        current = current_labels(session)
        assert set(current) == {study.id}  # the other study has no label
        assert (current[study.id].label, current[study.id].earlier) == (POSITIVE_CLASS, 1)
        record_label(session, label=NEGATIVE_CLASS, source=LabelSource.HL7, who="RIS", evidence="test",
                     study_instance_uid=study.study_instance_uid)
    with sessions() as session:
        assert current_labels(session, [study.id, other.id])[study.id].label == NEGATIVE_CLASS
        assert session.scalar(select(func.count()).select_from(Label)) == 3


def test_a_label_names_its_study_by_uid_first_then_by_accession(sessions) -> None:
    with sessions() as session, session.begin():
        first = add_study(session, [0.4], accession="SHARED1")
        second = add_study(session, [0.6], accession="SHARED1")  # an accession reused by the RIS
        record_label(session, label=POSITIVE_CLASS, source=LabelSource.HL7, who="RIS", evidence="t",
                     study_instance_uid=second.study_instance_uid, accession_number="SHARED1")
        record_label(session, label=NEGATIVE_CLASS, source=LabelSource.CSV, who="t", evidence="t",
                     study_instance_uid="1.2.3.999", accession_number="ACC-LATE")  # images not here yet
    with sessions() as session:
        current = current_labels(session)
    assert set(current) == {second.id} and first.id not in current  # the UID decided, not the accession
    with sessions() as session, session.begin():
        late = add_study(session, [0.1], accession="ACC-LATE")  # other UID, same accession: joined by it
    with sessions() as session:
        assert current_labels(session)[late.id].label == NEGATIVE_CLASS
