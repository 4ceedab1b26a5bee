"""Files holding patient data are private to the service user (issue 16: they were 0644)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import redis

from core.settings import Settings
from ops.supervisor import Child, _start, start_embedded_redis


def _mode(path: Path) -> str:
    return oct(path.stat().st_mode & 0o777)


def test_home_folders_are_0700_even_when_they_existed(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    settings.home_dir.mkdir(mode=0o755)
    os.chmod(settings.home_dir, 0o755)
    settings.ensure_dirs()
    folders = [settings.home_dir, settings.storage_dir, settings.spool_dir, settings.sr_dir]
    assert [_mode(p) for p in folders] == ["0o700"] * 4


def test_child_logs_and_the_embedded_broker_files_are_private(tmp_path: Path) -> None:
    """Under the usual umask 022: the supervisor sets the modes itself."""
    previous = os.umask(0o022)
    try:
        settings = Settings(home=tmp_path / "home")
        settings.home_dir.mkdir()
        child = Child("probe", ["true"])
        _start(child, dict(os.environ), settings.home_dir)
        child.process.wait(timeout=10)
        broker = start_embedded_redis(settings)
    finally:
        os.umask(previous)
    try:
        client = redis.Redis(unix_socket_path=str(settings.redis_socket))
        client.rpush("inference-cpu", "a queued job")
        time.sleep(1.5)  # appendfsync everysec
        broker_files = [p for p in settings.home_dir.rglob("*")
                        if "appendonly" in p.name or p.suffix == ".aof"]
    finally:
        broker.terminate()
        broker.wait(timeout=10)
    assert _mode(settings.home_dir / "probe.log") == "0o600"
    assert broker_files
    assert {str(p): _mode(p) for p in broker_files} == {
        str(p): "0o700" if p.is_dir() else "0o600" for p in broker_files}
    assert _mode(settings.home_dir / "redis.log") == "0o600"
