"""Fault drill: the product as separate processes, under load, while things break.

Why: the unit and pipeline tests break one thing at a time on a handful of images. A hospital
sees a PACS pushing hundreds of studies over parallel associations while a worker dies, the broker
restarts, the PACS goes away for a minute and the node is restarted. This drill does all of that
at once and then checks, from the database and the PACS folder, what we promise: every instance
we acknowledged is recorded and reaches a terminal state, and exactly one SR per study and model
version reaches the PACS.

Set-up (all in a temp folder, every process stopped at the end, also on Ctrl-C): its own Redis
(append-only file, fsync always) on a free port, a fresh PostgreSQL database migrated with
`core.migrate.upgrade`, dcmtk's storescp as the PACS (`+uf`: every received copy is its own file,
so re-sends are visible), and the product as separate processes (`pneumo node`, Celery workers on
inference-cpu,delivery,housekeeping, Celery beat), each in its own process group.

Faults, each fired once when its trigger holds: the node SIGKILLed at 30% acknowledged and started
again; a worker SIGKILLed mid-job (the whole worker, then a new one; or only its pool process) once
10% are terminal, with a job caught between its model call and its record (`HeldResults`); the
PACS down for --pacs-down-s once 25% are terminal; Redis stopped (SIGTERM) for --redis-down-s,
10 s into the PACS outage (or while sending), then started on the same port and folder. A product
process that dies on its own is restarted, as compose's `restart:` policy would, and fails the
drill. The sender retries every non-success status and broken association.

How SRs are counted: the SR's SOP Instance UID is derived from (study, model, version), and a PACS
stores by SOP Instance UID, so a second copy with the same UID (the response to the first was
lost, or the study gained an image and the report was refreshed) replaces the first. Such copies
are reported as "same-UID re-sends" and do not fail the drill. A *duplicate SR* is a second,
different SOP Instance UID for the same (study, model version): that fails it, as does a missing SR.

    .venv/bin/python tests/drills/fault_drill.py                      # 1,000 instances, served model
    .venv/bin/python tests/drills/fault_drill.py --instances 40 --associations 4 --pacs-down-s 5 \
        --model-dir /path/to/tiny/registry --workers 1 --kill-worker pool --kill-at 0 --pacs-down-at 0 \
        --redis-during sending --redis-down-s 5 --quiet-s 1 --delivery-backoff-s 1 --json   # the CI variant
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import queue
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from tests.helpers import dcmtk, free_port  # noqa: E402 (dcmtk's tools by path, not pynetdicom's namesakes)

DATA = Path(os.environ.get("PNEUMO_SHARED", REPO.parent / "shared")) / "data" / "chest_xray"
POSTGRES_ADMIN_URL = os.environ.get(
    "PNEUMO_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
CALLING_AE = "DRILL"
NODE_AE = "PNEUMO"
PACS_AE = "PACS"

log = logging.getLogger("fault_drill")


# --- configuration and report -------------------------------------------------------------------


@dataclass
class DrillConfig:
    instances: int = 1000
    associations: int = 8
    pacs_down_s: float = 60.0
    model_dir: Path = REPO / "models"
    model_name: str = "pneumonia-transfer"
    workers: int = 2
    kill_worker: str = "worker"  # "worker": the whole worker (main + pool), a new one started; "pool"
    batch: int = 1  # > 1: batching workers (thread pool, PNEUMO_INFERENCE_BATCH_SIZE), as on a GPU
    kill_at: float = 0.1  # fraction of instances terminal before the worker is killed mid-job
    pacs_down_at: float = 0.25  # fraction terminal (and one SR delivered) before the PACS goes down
    node_restart_at: float = 0.3  # fraction acknowledged
    redis_restart_during: str = "pacs-outage"  # or "sending" (at 60% acknowledged)
    redis_down_s: float = 10.0  # a real restart (container, AOF load) is not instant
    two_image_fraction: float = 0.25  # share of studies with two images
    quiet_s: float = 5.0
    delivery_backoff_s: float = 5.0
    timeout_s: float = 1800.0  # from the first C-STORE until everything must have settled
    max_send_attempts: int = 50
    seed: int = 5
    keep: bool = False
    postgres_admin_url: str = POSTGRES_ADMIN_URL


@dataclass
class FaultRecord:
    name: str
    at_s: float | None = None  # seconds after the first C-STORE; None: never fired
    detail: str = ""


@dataclass
class Invariant:
    name: str
    ok: bool
    detail: str = ""


@dataclass
class DrillReport:
    config: dict
    model: str = ""
    sent: int = 0
    store_attempts: int = 0
    acknowledged: int = 0
    sender_retries: int = 0
    sender_retry_reasons: dict[str, int] = field(default_factory=dict)
    gave_up: int = 0
    recorded: int = 0
    recorded_total: int = 0
    duplicate_receipts: int = 0  # audit: re-sent instances the node recognised
    states: dict[str, int] = field(default_factory=dict)
    non_terminal: int = 0
    instances_retried_by_workers: int = 0  # attempts > 1 (redelivered after the kill)
    stored_files_missing: int = 0
    studies: int = 0
    deliveries: dict[str, int] = field(default_factory=dict)
    deliveries_retried: int = 0
    srs_expected: int = 0
    sr_files_received: int = 0
    sr_files_unreadable: int = 0
    srs_distinct: int = 0
    sr_same_uid_resends: int = 0
    duplicate_srs: int = 0
    missing_srs: int = 0
    unexpected_srs: int = 0
    unexpected_exits: list[str] = field(default_factory=list)  # product processes that died on their own
    incomplete_srs: int = 0
    missing_instances: int = 0
    settled: bool = False
    send_s: float = 0.0
    settle_s: float = 0.0
    total_s: float = 0.0
    faults: list[FaultRecord] = field(default_factory=list)
    invariants: list[Invariant] = field(default_factory=list)
    work_dir: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.invariants) and all(i.ok for i in self.invariants)


# --- processes ----------------------------------------------------------------------------------


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str, interval_s: float = 0.1) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval_s)
    raise RuntimeError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class Processes:
    """Named child processes, each in its own process group, so one can be killed alone."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.running: dict[str, subprocess.Popen] = {}
        self.retired: list[subprocess.Popen] = []
        self._lock = threading.Lock()

    def start(self, name: str, command: list[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        handle = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        try:
            process = subprocess.Popen(command, env=env, cwd=cwd, stdout=handle, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
        finally:
            handle.close()
        with self._lock:
            self.running[name] = process
        return process

    def signal_group(self, name: str, signum: int) -> subprocess.Popen:
        """Signal the whole process group (a Celery worker's main process and its pool)."""
        with self._lock:
            process = self.running.pop(name)
            self.retired.append(process)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signum)
        return process

    def stop_all(self, grace_s: float = 15.0) -> None:
        """SIGTERM every group, then SIGKILL whatever is left; reap everything."""
        with self._lock:
            everything = [*self.running.values(), *self.retired]
            self.running.clear()
            self.retired.clear()
        for process in everything:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in everything:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            # The group may outlive its leader (pool processes): kill it in any case.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)


def pool_children(pid: int) -> list[int]:
    """Pids whose parent is `pid` (a Celery worker's pool processes)."""
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(stat[1]) == pid:
            children.append(int(entry.name))
    return children


class Stack:
    """Redis, storescp and the product's processes for one drill."""

    def __init__(self, config: DrillConfig, work: Path) -> None:
        self.config = config
        self.work = work
        self.logs = work / "logs"
        self.redis_dir = work / "redis"
        self.pacs_dir = work / "pacs"
        self.home = work / "home"
        for folder in (self.logs, self.redis_dir, self.pacs_dir, self.home):
            folder.mkdir(parents=True, exist_ok=True)
        self.processes = Processes(self.logs)
        self.redis_port = free_port()
        self.pacs_port = free_port()
        self.node_port = free_port()
        self.database_url = ""
        self.worker_count = 0
        self.env: dict[str, str] = {}

    # Redis ------------------------------------------------------------------------------------

    def start_redis(self) -> None:
        self.processes.start("redis", [
            shutil.which("redis-server") or "redis-server", "--port", str(self.redis_port),
            "--bind", "127.0.0.1", "--dir", str(self.redis_dir), "--appendonly", "yes",
            "--appendfsync", "always", "--save", "", "--daemonize", "no",
        ])
        wait_until(self.redis_ping, 30, "Redis to answer PING")

    def redis_ping(self) -> bool:
        import redis

        try:
            return bool(redis.Redis(port=self.redis_port, socket_timeout=1).ping())
        except redis.RedisError:
            return False

    def restart_redis(self) -> str:
        """SIGTERM (Redis flushes its append-only file and exits), down a while, same port and dir."""
        started = time.monotonic()
        old = self.processes.signal_group("redis", signal.SIGTERM)
        old.wait(timeout=30)
        time.sleep(max(0.0, self.config.redis_down_s - (time.monotonic() - started)))
        self.start_redis()
        return f"SIGTERM pid {old.pid}, down {time.monotonic() - started:.1f} s, restarted on same port/dir"

    # PACS -------------------------------------------------------------------------------------

    def start_pacs(self) -> None:
        self.processes.start("pacs", [
            dcmtk("storescp"), "-aet", PACS_AE, "-od", str(self.pacs_dir), "+uf", "+xa", str(self.pacs_port),
        ])
        wait_until(lambda: port_open(self.pacs_port), 30, "storescp to listen")

    def stop_pacs(self) -> str:
        old = self.processes.signal_group("pacs", signal.SIGTERM)
        old.wait(timeout=10)
        return f"storescp pid {old.pid} stopped"

    # database ---------------------------------------------------------------------------------

    def create_database(self) -> str:
        from sqlalchemy import create_engine, text

        from core.migrate import upgrade

        name = f"pneumo_drill_{uuid.uuid4().hex[:10]}"
        admin = create_engine(self.config.postgres_admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as connection:
                connection.execute(text(f'CREATE DATABASE "{name}"'))
        finally:
            admin.dispose()
        self.database_url = self.config.postgres_admin_url.rsplit("/", 1)[0] + f"/{name}"
        upgrade(self.database_url)
        return self.database_url

    def drop_database(self) -> None:
        from sqlalchemy import create_engine, text

        if not self.database_url:
            return
        name = self.database_url.rsplit("/", 1)[1]
        admin = create_engine(self.config.postgres_admin_url, isolation_level="AUTOCOMMIT")
        try:
            with admin.connect() as connection:
                connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        finally:
            admin.dispose()

    # the product ------------------------------------------------------------------------------

    def product_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "PNEUMO_HOME": str(self.home),
            "PNEUMO_HOST": "127.0.0.1",
            "PNEUMO_PORT": str(self.node_port),
            "PNEUMO_AE_TITLE": NODE_AE,
            "PNEUMO_ALLOWED_PEERS": CALLING_AE,
            "PNEUMO_PACS": f"{PACS_AE}@127.0.0.1:{self.pacs_port}",
            "PNEUMO_DATABASE_URL": self.database_url,
            "PNEUMO_BROKER_URL": f"redis://127.0.0.1:{self.redis_port}/0",
            "PNEUMO_QUIET_SECONDS": str(self.config.quiet_s),
            "PNEUMO_DELIVERY_BACKOFF_S": str(self.config.delivery_backoff_s),
            "PNEUMO_MODELS_DIR": str(self.config.model_dir.resolve()),
            "PNEUMO_MODEL_NAME": self.config.model_name,
            "PNEUMO_INFERENCE_BATCH_SIZE": str(self.config.batch),
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        })
        env.setdefault("KERAS_BACKEND", "tensorflow")
        return env

    def start_node(self) -> subprocess.Popen:
        return self.processes.start("node", [sys.executable, "-m", "ops.cli", "node"],
                                    env=self.env, cwd=self.home)

    def node_answers_echo(self) -> bool:
        from pynetdicom import AE

        ae = AE(ae_title=CALLING_AE)
        ae.acse_timeout = ae.network_timeout = 5
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", self.node_port, ae_title=NODE_AE)
        if not assoc.is_established:
            return False
        try:
            status = assoc.send_c_echo()
            return getattr(status, "Status", None) == 0
        finally:
            assoc.release()

    def restart_exited(self) -> list[str]:
        """Restart product processes that exited on their own, as compose's `restart:` would."""
        exited = []
        for name, process in list(self.processes.running.items()):
            if name in ("redis", "pacs") or process.poll() is None:
                continue
            self.processes.signal_group(name, signal.SIGKILL)  # retire it (and any orphans)
            if name == "node":
                self.start_node()
            elif name == "scheduler":
                self.start_scheduler()
            else:
                name = f"{name} (restarted as {self.start_worker()})"
            exited.append(f"{name} exited with {process.returncode}")
        return exited

    def restart_node(self) -> str:
        old = self.processes.signal_group("node", signal.SIGKILL)
        old.wait(timeout=10)
        new = self.start_node()
        return f"SIGKILL pid {old.pid} (a crash, mid-association), new node pid {new.pid}"

    def start_worker(self) -> str:
        self.worker_count += 1
        name = f"worker{self.worker_count}"
        batch = self.config.batch
        pool = ["-P", "threads", "-c", str(2 * batch)] if batch > 1 else ["-c", "1"]
        self.processes.start(name, [
            sys.executable, "-m", "celery", "-A", "worker.celery_app", "--quiet", "worker",
            "-Q", "inference-cpu,delivery,housekeeping", *pool, "-n", f"drill-{name}@%h",
            "--loglevel", "INFO",
        ], env=self.env, cwd=self.home)
        return name

    def kill_worker(self, mode: str) -> str:
        """SIGKILL mid-job: the whole worker (main + pool, then a new worker) or its pool process."""
        name = sorted(n for n in self.processes.running if n.startswith("worker"))[0]
        process = self.processes.running[name]
        if mode == "pool":
            children = pool_children(process.pid)
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return f"SIGKILL pool process(es) {children} of {name}; its main process forks a new one"
        self.processes.signal_group(name, signal.SIGKILL)
        process.wait(timeout=10)
        new = self.start_worker()
        return f"SIGKILL {name} (pid {process.pid} and its pool), started {new}"

    def start_scheduler(self) -> None:
        self.processes.start("scheduler", [
            sys.executable, "-m", "celery", "-A", "worker.celery_app", "--quiet", "beat",
            "--loglevel", "WARNING", "-s", str(self.home / "celerybeat-schedule"),
        ], env=self.env, cwd=self.home)

    def start_product(self) -> None:
        self.env = self.product_env()
        self.start_node()
        for _ in range(self.config.workers):
            self.start_worker()
        self.start_scheduler()
        wait_until(self.node_answers_echo, 60, "the node to answer C-ECHO", interval_s=0.5)

    def log_tails(self, chars: int = 2500) -> str:
        parts = []
        for path in sorted(self.logs.glob("*.log")):
            parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)


# --- the sender (the PACS pushing studies) ------------------------------------------------------


@dataclass
class Outgoing:
    path: Path
    sop_instance_uid: str
    study_instance_uid: str
    attempts: int = 0
    acknowledged: bool = False


def generate(config: DrillConfig, folder: Path) -> list[Outgoing]:
    """Test-split images wrapped as DX with send.py's wrapper; some studies get two images."""
    from ops.send import wrap_image

    images = sorted((DATA / "test").rglob("*.jpeg"))
    if not images:
        raise RuntimeError(f"no test images under {DATA / 'test'}; set PNEUMO_SHARED")
    rng = random.Random(config.seed)
    rng.shuffle(images)
    folder.mkdir(parents=True, exist_ok=True)
    items: list[Outgoing] = []
    while len(items) < config.instances:
        size = 2 if rng.random() < config.two_image_fraction else 1
        study = None
        for _ in range(min(size, config.instances - len(items))):
            dataset = wrap_image(images[len(items) % len(images)], study)
            study = study or dataset
            path = folder / f"{len(items):05d}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            items.append(Outgoing(path, str(dataset.SOPInstanceUID), str(dataset.StudyInstanceUID)))
    return items


class Sender:
    """N associations in threads; an instance is retried until it is acknowledged (0x0000)."""

    def __init__(self, items: list[Outgoing], port: int, associations: int, max_attempts: int) -> None:
        self.items = items
        self.port = port
        self.associations = associations
        self.max_attempts = max_attempts
        self.todo: queue.Queue[Outgoing] = queue.Queue()
        for item in items:
            self.todo.put(item)
        self.lock = threading.Lock()
        self.acknowledged = 0
        self.gave_up = 0
        self.attempts = 0
        self.retries: Counter[str] = Counter()
        self.stop = threading.Event()
        self.finished = threading.Event()
        self.threads: list[threading.Thread] = []

    @property
    def done(self) -> int:
        with self.lock:
            return self.acknowledged + self.gave_up

    def start(self) -> None:
        for index in range(self.associations):
            thread = threading.Thread(target=self._run, name=f"scu{index}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def join(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        for thread in self.threads:
            thread.join(timeout=max(0.1, deadline - time.monotonic()))

    def _retry(self, item: Outgoing, reason: str) -> None:
        with self.lock:
            self.retries[reason] += 1
            if item.attempts >= self.max_attempts:
                self.gave_up += 1
                give_up = True
            else:
                give_up = False
        if give_up:
            log.error("gave up on %s after %d attempts", item.sop_instance_uid, item.attempts)
            self._check_finished()
        else:
            self.todo.put(item)

    def _check_finished(self) -> None:
        if self.done >= len(self.items):
            self.finished.set()

    def _run(self) -> None:
        from pydicom.uid import DigitalXRayImageStorageForPresentation as DX_PRESENTATION
        from pydicom.uid import ExplicitVRLittleEndian
        from pynetdicom import AE

        ae = AE(ae_title=CALLING_AE)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        ae.add_requested_context(DX_PRESENTATION, [ExplicitVRLittleEndian])
        assoc = None
        try:
            while not self.stop.is_set() and not self.finished.is_set():
                try:
                    item = self.todo.get(timeout=0.2)
                except queue.Empty:
                    continue
                if assoc is None or not assoc.is_established:
                    assoc = ae.associate("127.0.0.1", self.port, ae_title=NODE_AE)
                    if not assoc.is_established:
                        assoc = None
                        item.attempts += 1
                        self._retry(item, "association failed")
                        time.sleep(1.0)  # the node is restarting: back off like a PACS would
                        continue
                item.attempts += 1
                with self.lock:
                    self.attempts += 1
                try:
                    response = assoc.send_c_store(item.path)
                    status = getattr(response, "Status", None)
                except Exception:  # the association broke under us
                    status = None
                if status == 0x0000:
                    item.acknowledged = True
                    with self.lock:
                        self.acknowledged += 1
                    self._check_finished()
                    continue
                self._retry(item, "no response" if status is None else f"status 0x{status:04X}")
                if status is None or not assoc.is_established:
                    with contextlib.suppress(Exception):
                        assoc.abort()
                    assoc = None
                    time.sleep(0.5)
        finally:
            if assoc is not None and assoc.is_established:
                with contextlib.suppress(Exception):
                    assoc.release()


# --- progress, faults, settling -----------------------------------------------------------------


@dataclass
class Progress:
    acknowledged: int = 0
    recorded: int = 0
    terminal: int = 0
    processing: int = 0
    deliveries: int = 0
    delivered: int = 0
    deliveries_open: int = 0
    sr_keys_pending: int = 0  # (study, version) with results but no up-to-date terminal delivery


def snapshot(sessions, acknowledged: int) -> Progress:
    from sqlalchemy import func, select

    from core.db import TERMINAL_STATES, Delivery, DeliveryState, Instance, InstanceState, Result

    with sessions() as session:
        by_state = dict(session.execute(
            select(Instance.state, func.count()).group_by(Instance.state)).all())
        deliveries = dict(session.execute(
            select(Delivery.state, func.count()).group_by(Delivery.state)).all())
        counts = session.execute(
            select(Instance.study_id, Result.model_name, Result.model_version, func.count())
            .join(Result).group_by(Instance.study_id, Result.model_name, Result.model_version)
        ).all()
        reported = {
            (d.study_id, d.model_name, d.model_version): (d.instances_reported, d.state)
            for d in session.scalars(select(Delivery))
        }
    terminal_deliveries = (DeliveryState.DELIVERED, DeliveryState.DEAD)
    pending = sum(
        1 for study_id, name, version, count in counts
        if (r := reported.get((study_id, name, version))) is None or r[0] < count
        or r[1] not in terminal_deliveries
    )
    return Progress(
        acknowledged=acknowledged,
        recorded=sum(by_state.values()),
        terminal=sum(by_state.get(str(s), 0) for s in TERMINAL_STATES),
        processing=by_state.get(str(InstanceState.PROCESSING), 0),
        deliveries=sum(deliveries.values()),
        delivered=deliveries.get(str(DeliveryState.DELIVERED), 0),
        deliveries_open=sum(v for k, v in deliveries.items() if k not in terminal_deliveries),
        sr_keys_pending=pending,
    )


class HeldResults:
    """A SHARE lock on `results` in its own transaction: reads go on, a classify job blocks at its
    INSERT, after the model ran and before anything is recorded. Killed there, the worker's
    transaction is rolled back by PostgreSQL and the job must run again."""

    PATIENCE_S = 60.0  # a single-process worker can sit a minute in a delivery to a vanished PACS

    def __init__(self, database_url: str) -> None:
        from sqlalchemy import create_engine, text

        self.engine = create_engine(database_url)
        self.connection = self.engine.connect()
        self.connection.execute(text("LOCK TABLE results IN SHARE MODE"))
        self.since = time.monotonic()

    def jobs_waiting(self) -> int:
        from sqlalchemy import text

        with self.engine.connect() as connection:
            return int(connection.scalar(text(
                "SELECT count(*) FROM pg_locks WHERE relation = 'results'::regclass AND NOT granted")))

    def release(self) -> None:
        self.connection.rollback()
        self.connection.close()
        self.engine.dispose()


class Faults:
    """Fires each fault once, when its trigger on the current progress holds; PACS back after its outage."""

    def __init__(self, stack: Stack, config: DrillConfig, started: float) -> None:
        self.stack = stack
        self.config = config
        self.started = started
        total = config.instances
        self.pacs_up_at: float | None = None
        self.records = {name: FaultRecord(name) for name in
                        ("node restart", "Redis restart", "worker SIGKILL", "PACS down", "PACS up")}
        self.held: HeldResults | None = None
        self.plan: list[tuple[str, Callable[[Progress], bool], Callable[[], str]]] = [
            ("node restart", lambda p: p.acknowledged >= config.node_restart_at * total,
             stack.restart_node),
            ("Redis restart", self._redis_due, stack.restart_redis),
            ("PACS down", lambda p: p.terminal >= config.pacs_down_at * total and p.delivered > 0,
             self._pacs_down),
        ]

    def _redis_due(self, progress: Progress) -> bool:
        """During sending (the node's enqueue fails), or while SR retries wait on the PACS outage."""
        if self.config.redis_restart_during == "sending":
            return (progress.acknowledged >= 0.6 * self.config.instances
                    and self.records["node restart"].at_s is not None)
        down = self.records["PACS down"].at_s
        into_outage = min(10.0, self.config.pacs_down_s / 2)
        return down is not None and time.monotonic() - self.started >= down + into_outage

    def _pacs_down(self) -> str:
        detail = self.stack.stop_pacs()
        self.pacs_up_at = time.monotonic() + self.config.pacs_down_s
        return f"{detail}; back in {self.config.pacs_down_s:g} s"

    def _fire(self, name: str, action: Callable[[], str], progress: Progress | None) -> None:
        record = self.records[name]
        record.at_s = round(time.monotonic() - self.started, 1)
        where = (f" (acked {progress.acknowledged}, terminal {progress.terminal}, "
                 f"delivered {progress.delivered})") if progress else ""
        record.detail = action() + where
        log.warning("fault at %.1f s: %s: %s", record.at_s, name, record.detail)

    def step(self, progress: Progress) -> None:
        for name, trigger, action in self.plan:
            if self.records[name].at_s is None and trigger(progress):
                self._fire(name, action, progress)
        self._kill_worker_mid_job(progress)
        if self.pacs_up_at is not None and time.monotonic() >= self.pacs_up_at:
            self.pacs_up_at = None
            self._fire("PACS up", self._pacs_up, progress)

    def _kill_worker_mid_job(self, progress: Progress) -> None:
        """Once enough are terminal and one is waiting, hold the results table until a job is
        caught between its model call and its record, then SIGKILL the worker and let go: the
        kill hits a job in flight every time, not when polling happens to see one (a tiny
        model's job takes ~15 ms)."""
        if self.records["worker SIGKILL"].at_s is not None:
            return
        if self.held is None:
            if progress.terminal >= self.config.kill_at * self.config.instances \
                    and progress.recorded > progress.terminal:
                self.held = HeldResults(self.stack.database_url)
            return
        caught = self.held.jobs_waiting()
        if caught or time.monotonic() - self.held.since > HeldResults.PATIENCE_S:
            try:
                self._fire("worker SIGKILL", lambda: self.stack.kill_worker(self.config.kill_worker)
                           + f"; jobs caught mid-record: {caught}", progress)
            finally:
                self.held.release()

    def _pacs_up(self) -> str:
        self.stack.start_pacs()
        return "storescp started again on the same port and folder"

    @property
    def all_fired(self) -> bool:
        return all(r.at_s is not None for r in self.records.values())

    def results(self) -> list[FaultRecord]:
        return list(self.records.values())


# --- checks -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReceivedSR:
    path: Path
    sop_instance_uid: str
    study_instance_uid: str
    model_name: str
    model_version: str
    referenced: frozenset[str]
    mtime_ns: int


def read_pacs_folder(folder: Path) -> tuple[list[ReceivedSR], int]:
    """Every SR file storescp wrote (one per received copy, `+uf`), and how many were unreadable."""
    from pydicom import dcmread
    from pydicom.uid import SecondaryCaptureImageStorage

    from worker.report import MANUFACTURER

    received, unreadable = [], 0
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        try:
            dataset = dcmread(path)
            if dataset.get("Modality") != "SR":
                continue  # a picture (worker.picture): sent with its SR, counted with none
            equipment = next(item for item in dataset.ContributingEquipmentSequence
                             if item.get("Manufacturer") == MANUFACTURER)
            referenced = frozenset(  # the images reported; the SR's own pictures are evidence too
                str(sop.ReferencedSOPInstanceUID)
                for study in dataset.get("CurrentRequestedProcedureEvidenceSequence", [])
                for series in study.ReferencedSeriesSequence
                for sop in series.ReferencedSOPSequence
                if sop.ReferencedSOPClassUID != SecondaryCaptureImageStorage
            )
            received.append(ReceivedSR(
                path, str(dataset.SOPInstanceUID), str(dataset.StudyInstanceUID),
                str(equipment.ManufacturerModelName), str(equipment.SoftwareVersions), referenced,
                path.stat().st_mtime_ns,
            ))
        except Exception:  # a copy cut off when the PACS went down; the sender re-sends it
            log.warning("unreadable file at the PACS: %s", path.name)
            unreadable += 1
    return received, unreadable


def check(report: DrillReport, items: list[Outgoing], sessions, pacs_dir: Path) -> None:
    """Fill the report's counts and invariants from the database and the PACS folder."""
    from sqlalchemy import func, select

    from core.db import TERMINAL_STATES, AuditEvent, Delivery, Instance, InstanceState, Result, Study

    acked = {i.sop_instance_uid: i for i in items if i.acknowledged}
    with sessions() as session:
        instances = session.execute(
            select(Instance.sop_instance_uid, Instance.state, Instance.attempts, Instance.path,
                   Study.study_instance_uid, Instance.scope_model_name, Instance.scope_model_version)
            .join(Study)
        ).all()
        results = session.execute(
            select(Instance.sop_instance_uid, Study.study_instance_uid, Result.model_name,
                   Result.model_version).join(Instance, Result.instance_id == Instance.id).join(Study)
        ).all()
        deliveries = session.execute(
            select(Study.study_instance_uid, Delivery.model_name, Delivery.model_version,
                   Delivery.state, Delivery.attempts, Delivery.sr_sop_instance_uid).join(Study)
        ).all()
        report.duplicate_receipts = session.scalar(
            select(func.count()).select_from(AuditEvent).where(
                AuditEvent.event.in_(["duplicate_received", "conflicting_duplicate"]))
        ) or 0
    by_uid = {row.sop_instance_uid: row for row in instances}
    report.recorded_total = len(instances)
    report.recorded = sum(1 for uid in acked if uid in by_uid)
    report.missing_instances = len(acked) - report.recorded
    report.states = dict(Counter(str(row.state) for row in instances))
    report.non_terminal = sum(1 for row in instances if row.state not in TERMINAL_STATES)
    report.instances_retried_by_workers = sum(1 for row in instances if row.attempts > 1)
    report.stored_files_missing = sum(1 for row in instances if not Path(row.path).is_file())
    report.studies = len({row.study_instance_uid for row in instances})
    report.deliveries = dict(Counter(str(d.state) for d in deliveries))
    report.deliveries_retried = sum(1 for d in deliveries if d.attempts > 1)

    # The SR of a (study, version) reports every image that version classified or refused as out
    # of scope ("not assessed"); a study whose images were all refused gets one too.
    expected: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for row in results:
        expected[(row.study_instance_uid, row.model_name, row.model_version)].add(row.sop_instance_uid)
    for row in instances:
        if row.state == InstanceState.OUT_OF_SCOPE:
            expected[(row.study_instance_uid, row.scope_model_name, row.scope_model_version)].add(
                row.sop_instance_uid)
    expected_uid = {(d.study_instance_uid, d.model_name, d.model_version): d.sr_sop_instance_uid
                    for d in deliveries}
    received, report.sr_files_unreadable = read_pacs_folder(pacs_dir)
    copies: dict[tuple[str, str, str], list[ReceivedSR]] = defaultdict(list)
    for sr in received:
        copies[(sr.study_instance_uid, sr.model_name, sr.model_version)].append(sr)
    report.srs_expected = len(expected)
    report.sr_files_received = len(received)
    report.srs_distinct = len({sr.sop_instance_uid for sr in received})
    report.sr_same_uid_resends = len(received) - report.srs_distinct
    report.duplicate_srs = sum(len({sr.sop_instance_uid for sr in found}) - 1 for found in copies.values())
    report.missing_srs = sum(1 for key in expected if key not in copies)
    report.unexpected_srs = sum(1 for key in copies if key not in expected)
    wrong_uid = sum(1 for key, found in copies.items()
                    if key in expected_uid and any(sr.sop_instance_uid != expected_uid[key] for sr in found))
    # The copy the PACS keeps is the last one received: it must report every image of its key.
    report.incomplete_srs = sum(
        1 for key, found in copies.items()
        if key in expected and max(found, key=lambda sr: sr.mtime_ns).referenced != expected[key]
    )

    assessed = sum(report.states.get(str(state), 0)
                   for state in (InstanceState.CLASSIFIED, InstanceState.OUT_OF_SCOPE))
    report.invariants = [
        Invariant("the sender got every instance acknowledged", report.acknowledged == report.sent,
                  f"{report.acknowledged}/{report.sent}, gave up on {report.gave_up}"),
        Invariant("every acknowledged instance is recorded", report.missing_instances == 0,
                  f"{report.missing_instances} missing"),
        Invariant("every recorded instance has its stored file", report.stored_files_missing == 0,
                  f"{report.stored_files_missing} files missing"),
        Invariant("every recorded instance is terminal", report.non_terminal == 0,
                  f"{report.non_terminal} not terminal: {report.states}"),
        # The inputs are valid frontal chest DX films of the Kermany test split: each is classified
        # or, by the served version's pixel check, refused (0.6% of that split for 203850Z).
        Invariant("every instance classified or refused as out of scope (valid frontal chest DX)",
                  assessed == report.recorded_total, f"{report.states}"),
        Invariant("every delivery delivered (none dead or open)",
                  set(report.deliveries) <= {"delivered"}, f"{report.deliveries}"),
        Invariant("one SR per study and model version at the PACS",
                  report.missing_srs == 0 and report.duplicate_srs == 0 and report.unexpected_srs == 0
                  and wrong_uid == 0,
                  f"missing {report.missing_srs}, duplicate {report.duplicate_srs}, "
                  f"unexpected {report.unexpected_srs}, UID not the recorded one {wrong_uid}"),
        Invariant("the SR the PACS keeps reports every classified or refused image",
                  report.incomplete_srs == 0,
                  f"{report.incomplete_srs} incomplete"),
        Invariant("no product process died on its own", not report.unexpected_exits,
                  "; ".join(report.unexpected_exits) or "none"),
        Invariant("every fault was injected", all(f.at_s is not None for f in report.faults),
                  ", ".join(f.name for f in report.faults if f.at_s is None) or "all fired"),
        Invariant("settled within the timeout", report.settled, f"{report.settle_s:.0f} s"),
    ]


# --- the drill ----------------------------------------------------------------------------------


def served_label(config: DrillConfig) -> str:
    from core import registry

    try:
        return registry.resolve(config.model_name, config.model_dir).label
    except Exception as error:
        raise RuntimeError(f"no served {config.model_name} in {config.model_dir}: {error}") from error


def run_drill(config: DrillConfig) -> DrillReport:
    """Set up, send while injecting faults, wait until settled, check; always tears down."""
    from core.db import session_factory

    began = time.monotonic()
    report = DrillReport(config={k: str(v) if isinstance(v, Path) else v
                                 for k, v in asdict(config).items() if k != "postgres_admin_url"})
    report.model = served_label(config)
    work = Path(tempfile.mkdtemp(prefix="pneumo-fault-drill-"))
    report.work_dir = str(work)
    stack = Stack(config, work)
    sessions = None
    sender = None
    faults: Faults | None = None
    try:
        items = generate(config, work / "outgoing")
        report.sent = len(items)
        stack.create_database()
        sessions = session_factory(stack.database_url)
        stack.start_redis()
        stack.start_pacs()
        stack.start_product()
        log.info("stack up in %.1f s (work dir %s); sending %d instances over %d associations",
                 time.monotonic() - began, work, len(items), config.associations)

        started = time.monotonic()
        deadline = started + config.timeout_s
        faults = Faults(stack, config, started)
        sender = Sender(items, stack.node_port, config.associations, config.max_send_attempts)
        sender.start()
        settled_since: float | None = None
        last_log = 0.0
        while time.monotonic() < deadline:
            if sender.finished.is_set() and not report.send_s:
                report.send_s = round(time.monotonic() - started, 1)
            progress = snapshot(sessions, sender.acknowledged)
            faults.step(progress)
            for exit_note in stack.restart_exited():
                note = f"{time.monotonic() - started:.1f} s: {exit_note}"
                report.unexpected_exits.append(note)
                log.error("product process died: %s; restarted", note)
            quiet = (sender.finished.is_set() and faults.all_fired and faults.pacs_up_at is None
                     and progress.recorded >= progress.acknowledged
                     and progress.terminal == progress.recorded and progress.deliveries_open == 0
                     and progress.sr_keys_pending == 0)
            if quiet:
                # Settled once it stays so past a finalise round (a refresh may still be coming).
                settled_since = settled_since or time.monotonic()
                if time.monotonic() - settled_since >= config.quiet_s + 3:
                    report.settled = True
                    break
            else:
                settled_since = None
            if time.monotonic() - last_log >= 15:
                last_log = time.monotonic()
                log.info("%.0f s: %s", last_log - started, progress)
            time.sleep(0.1 if not sender.finished.is_set() else 0.5)
        report.settle_s = round(time.monotonic() - started, 1)
        sender.stop.set()
        sender.join(10)
        report.acknowledged = sender.acknowledged
        report.store_attempts = sender.attempts
        report.sender_retries = sum(sender.retries.values())
        report.sender_retry_reasons = dict(sender.retries)
        report.gave_up = sender.gave_up
        report.faults = faults.results()
        stack.processes.stop_all()  # nothing may arrive at the PACS while we count
        check(report, items, sessions, stack.pacs_dir)
        if not report.ok:
            print(stack.log_tails(), file=sys.stderr)
    except RuntimeError:
        print(stack.log_tails(), file=sys.stderr)
        raise
    finally:
        if sender is not None:
            sender.stop.set()
        if faults is not None and faults.held is not None and faults.records["worker SIGKILL"].at_s is None:
            faults.held.release()
        stack.processes.stop_all()
        if sessions is not None:
            sessions.kw["bind"].dispose()
        if config.keep:
            log.warning("kept %s and database %s", work, stack.database_url)
        else:
            with contextlib.suppress(Exception):
                stack.drop_database()
            shutil.rmtree(work, ignore_errors=True)
        report.total_s = round(time.monotonic() - began, 1)
    return report


# --- output -------------------------------------------------------------------------------------


def format_table(report: DrillReport) -> str:
    c = report.config
    states = report.states
    reasons = ", ".join(f"{k}: {v}" for k, v in report.sender_retry_reasons.items()) or "-"
    rows = [
        ("sent (instances)", report.sent),
        ("C-STORE attempts", report.store_attempts),
        ("acknowledged (0x0000)", report.acknowledged),
        ("sender retries", f"{report.sender_retries} ({reasons})"),
        ("re-sent instances the node recognised", report.duplicate_receipts),
        ("recorded (of acknowledged)", report.recorded),
        ("terminal: classified / ignored / failed",
         f"{states.get('classified', 0)} / {states.get('ignored', 0)} / {states.get('failed', 0)}"),
        ("not terminal", report.non_terminal),
        ("instances re-run after the worker kill (attempts > 1)", report.instances_retried_by_workers),
        ("studies", report.studies),
        ("deliveries by state", ", ".join(f"{k} {v}" for k, v in sorted(report.deliveries.items())) or "-"),
        ("deliveries that needed more than one attempt", report.deliveries_retried),
        ("SRs expected (study x model version)", report.srs_expected),
        ("SR copies received at the PACS (unreadable)",
         f"{report.sr_files_received} ({report.sr_files_unreadable})"),
        ("distinct SRs received (SOP Instance UID)", report.srs_distinct),
        ("same-UID re-sends (replace, not duplicates)", report.sr_same_uid_resends),
        ("duplicate SRs (second UID for a study x version)", report.duplicate_srs),
        ("missing SRs", report.missing_srs),
        ("missing instances (acknowledged, not recorded)", report.missing_instances),
        ("product processes that died on their own (restarted)", len(report.unexpected_exits)),
        ("time: sending / settled / total incl. set-up",
         f"{report.send_s:.0f} s / {report.settle_s:.0f} s / {report.total_s:.0f} s"),
    ]
    lines = [
        f"Fault drill: {c['instances']} instances over {c['associations']} associations, "
        f"{c['workers']} worker(s)"
        + (f" batching up to {c['batch']} on {2 * c['batch']} threads" if c["batch"] > 1 else "")
        + f", PACS down {c['pacs_down_s']:g} s, Redis down {c['redis_down_s']:g} s "
        f"(during {c['redis_restart_during']}), model {report.model}",
        "",
        "| measure | value |",
        "|---|---:|",
        *(f"| {name} | {value} |" for name, value in rows),
        "",
        "Faults (seconds after the first C-STORE):",
        *(f"- {f.name}: {'not fired' if f.at_s is None else f'{f.at_s:.1f} s'} {f.detail}"
          for f in sorted(report.faults, key=lambda f: float("inf") if f.at_s is None else f.at_s)),
        "",
        "Invariants:",
        *(f"- [{'ok' if i.ok else 'FAIL'}] {i.name}: {i.detail}" for i in report.invariants),
        "",
        f"RESULT: {'PASS' if report.ok else 'FAIL'}",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[DrillConfig, bool]:
    """(the drill's configuration, whether to print JSON)."""
    defaults = DrillConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--instances", type=int, default=defaults.instances)
    parser.add_argument("--associations", type=int, default=defaults.associations)
    parser.add_argument("--pacs-down-s", type=float, default=defaults.pacs_down_s)
    parser.add_argument("--model-dir", type=Path, default=defaults.model_dir, help="registry folder")
    parser.add_argument("--workers", type=int, default=defaults.workers,
                        help="Celery workers, one pool process each")
    parser.add_argument("--kill-worker", choices=["worker", "pool"], default=defaults.kill_worker,
                        help="worker: SIGKILL a whole worker and start a new one; pool: its pool process")
    parser.add_argument("--kill-at", type=float, default=defaults.kill_at,
                        help="fraction of instances terminal before the worker kill")
    parser.add_argument("--pacs-down-at", type=float, default=defaults.pacs_down_at,
                        help="fraction of instances terminal before the PACS goes down")
    parser.add_argument("--redis-during", choices=["pacs-outage", "sending"],
                        default=defaults.redis_restart_during,
                        help="restart Redis while SR retries wait on the PACS outage, or while sending")
    parser.add_argument("--redis-down-s", type=float, default=defaults.redis_down_s,
                        help="how long Redis stays down on its restart")
    parser.add_argument("--quiet-s", type=float, default=defaults.quiet_s, help="PNEUMO_QUIET_SECONDS")
    parser.add_argument("--delivery-backoff-s", type=float, default=defaults.delivery_backoff_s,
                        help="PNEUMO_DELIVERY_BACKOFF_S")
    parser.add_argument("--timeout-s", type=float, default=defaults.timeout_s,
                        help="from the first C-STORE until everything must have settled")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--batch", type=int, default=defaults.batch,
                        help="> 1: workers batch inference on threads (the GPU configuration)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder and the database")
    parser.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    args = parser.parse_args(argv)
    config = DrillConfig(
        instances=args.instances, associations=args.associations, pacs_down_s=args.pacs_down_s,
        model_dir=args.model_dir, workers=args.workers, kill_worker=args.kill_worker,
        kill_at=args.kill_at, pacs_down_at=args.pacs_down_at, quiet_s=args.quiet_s,
        redis_restart_during=args.redis_during, redis_down_s=args.redis_down_s,
        delivery_backoff_s=args.delivery_backoff_s, timeout_s=args.timeout_s, seed=args.seed,
        keep=args.keep, batch=args.batch,
    )
    return config, args.json


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    logging.getLogger("alembic").setLevel(logging.WARNING)
    config, as_json = parse_args(argv)

    def terminate(signum, _frame) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    # A stopped drill still tears everything down (SIGINT too: a background job starts with it ignored).
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    try:
        report = run_drill(config)
    except KeyboardInterrupt:
        print("fault drill interrupted; everything it started was stopped", file=sys.stderr)
        return 130
    except RuntimeError as error:
        print(f"fault drill could not run: {error}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps({**asdict(report), "ok": report.ok}, indent=2, default=str))
    else:
        print(format_table(report))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
