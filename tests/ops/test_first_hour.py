"""What a newcomer meets in the first hour with the run stopped or the data wrong (issue 22 item 4):
one actionable line, nothing recorded that did not happen, a status list that stays one line per
study, and the dashboard's SR column right for studies of refused images."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select
from typer.testing import CliRunner

from core.db import AuditEvent, Delivery, DeliveryState, InstanceState, session_factory
from core.migrate import upgrade
from core.settings import Settings
from ops import status
from ops.cli import app
from ops.studies import sr_status
from tests.ops.test_dashboard_outcomes import _study

LONG = "cannot decode pixel data: JPEG 2000 codestream ends before its last tile-part header"
MULTI = "cannot decode pixel data:\n  libjpeg: bad Huffman table\n  (segment 3)"


@pytest.fixture
def stopped_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """A home `pneumo run` used and has left: its database, no broker socket."""
    home = tmp_path / "var"
    home.mkdir()
    for name in ("PNEUMO_DATABASE_URL", "PNEUMO_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PNEUMO_HOME", str(home))
    settings = Settings(home=home)
    upgrade(settings.sqlalchemy_url)
    with session_factory(settings.sqlalchemy_url)() as session, session.begin():
        dead = _study(session, 1, [(InstanceState.CLASSIFIED, None)])
        session.add(Delivery(study_id=dead, model_name="pneumonia-transfer", model_version="v1",
                             destination="PACS@127.0.0.1:1", sr_sop_instance_uid="1.2.826.0.9.1",
                             attempts=6, state=DeliveryState.DEAD, last_error="association failed"))
        _study(session, 2, [(InstanceState.FAILED, LONG), (InstanceState.FAILED, MULTI)])
        _study(session, 3, [(InstanceState.OUT_OF_SCOPE, "out of scope: patient age 64 y")])
    return settings


def test_resend_with_the_run_stopped_is_one_line_and_records_nothing(stopped_home: Settings) -> None:
    """Was ~300 lines of kombu traceback after recording the delivery pending and auditing it."""
    result = CliRunner().invoke(app, ["resend", "1.2.826.0.1.3680043.10.1"])
    assert result.exit_code == 1
    assert result.output.strip().count("\n") == 0, result.output
    assert "pneumo run is not running" in result.output and "nothing queued" in result.output
    with session_factory(stopped_home.sqlalchemy_url)() as session:
        assert session.scalar(select(Delivery.state)) == DeliveryState.DEAD
        assert session.scalars(select(AuditEvent.event)).all() == []


def test_status_with_the_run_stopped_says_so_and_keeps_one_line_per_study(stopped_home: Settings) -> None:
    text = status.render(stopped_home)
    assert "pneumo run is not running" in text.splitlines()[0]
    assert "unreachable" not in text and "OperationalError" not in text
    lines = text.splitlines()
    studies = lines[lines.index("last 10 studies:") + 1:]
    assert len(studies) == 3 and all(line.startswith("  1.2.826.0.1.3680043.10.") for line in studies)
    assert "libjpeg: bad Huffman table (segment 3)" in next(line for line in studies if ".10.2 " in line)
    # The count stands apart from the reason, whatever the reason's length.
    by_reason = lines[lines.index("not classified, by reason:") + 1:lines.index("deliveries by state:")]
    counts = [line.split()[1] for line in by_reason]
    assert counts == ["2", "1"], by_reason


def test_a_study_of_refused_images_waits_for_its_not_assessed_sr() -> None:
    """Out-of-scope images get a "not assessed" SR (worker.housekeeping); only ignored and failed
    images leave a study without one."""
    assert sr_status(None, None, [InstanceState.OUT_OF_SCOPE] * 2) == "no SR yet (it will say: not assessed)"
    assert sr_status(None, None, [InstanceState.IGNORED, InstanceState.FAILED]).startswith(
        "no SR will be sent")
    assert sr_status(None, None, [InstanceState.OUT_OF_SCOPE, InstanceState.IGNORED]).startswith("no SR yet")


def test_evaluate_with_the_wrong_layout_is_one_line_before_the_model_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Was 9 s of loading the model, then ~40 lines of traceback ending in FileNotFoundError."""
    from serving import models

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was checked")

    monkeypatch.setattr(models, "load_version", no_model)
    (tmp_path / "images").mkdir()  # a folder of images, not <root>/test/{NORMAL,PNEUMONIA}
    result = CliRunner().invoke(app, ["evaluate", "--model", "pneumonia-cnn", "--data", str(tmp_path)])
    assert result.exit_code == 2, result.output
    assert result.output.strip().count("\n") == 0, result.output
    assert "no 'test' folder under" in result.output


def test_help_names_only_options_that_exist_and_the_settings_a_service_reads() -> None:
    """`worker --help` said `-Q inference-gpu` ("No such option"); `run`, `node` and `dashboard`
    listed none of the ports, the PACS or the token."""
    runner = CliRunner()
    worker = runner.invoke(app, ["worker", "--help"], terminal_width=200).output
    assert "-Q" not in worker and "--queues inference-gpu" in worker
    wanted = {"run": ["PNEUMO_PORT", "PNEUMO_AE_TITLE", "PNEUMO_PACS", "PNEUMO_DASHBOARD_PORT",
                      "PNEUMO_DASHBOARD_TOKEN", "PNEUMO_HOME", "PNEUMO_MODELS_DIR"],
              "node": ["PNEUMO_PORT", "PNEUMO_AE_TITLE", "PNEUMO_ALLOWED_PEERS", "PNEUMO_TLS_CERT_FILE"],
              "dashboard": ["PNEUMO_DASHBOARD_HOST", "PNEUMO_DASHBOARD_PORT", "PNEUMO_DASHBOARD_TOKEN",
                            "PNEUMO_DASHBOARD_TLS_CERT_FILE"]}
    for command, settings in wanted.items():
        text = runner.invoke(app, [command, "--help"], terminal_width=200).output
        assert [name for name in settings if name not in text] == [], command
    assert "(11112)" in runner.invoke(app, ["node", "--help"], terminal_width=200).output


def test_the_cli_quiets_tensorflow_start_up_lines() -> None:
    """oneDNN and cpu_feature_guard lines reached every CLI user's terminal."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", "import ops.cli, tensorflow as tf; tf.constant(1) + 1"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "cpu_feature_guard" not in result.stderr and "oneDNN" not in result.stderr, result.stderr


def test_long_reads_show_progress_on_a_terminal(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from training import progress

    monkeypatch.setenv("FORCE_COLOR", "1")  # rich: treat stderr as a terminal
    assert [list(part) for part in progress.chunks(list(range(5)), 2, "reading test images")] == [
        [0, 1], [2, 3], [4]]
    assert list(progress.track([1, 2], "reading site images")) == [1, 2]
    err = capsys.readouterr().err
    assert "reading test images" in err and "5/5" in err and "reading site images" in err
    monkeypatch.delenv("FORCE_COLOR")
    monkeypatch.setenv("TERM", "dumb")
    list(progress.track([1, 2], "not a terminal"))
    assert "not a terminal" not in capsys.readouterr().err  # logs and pipes get no bar
