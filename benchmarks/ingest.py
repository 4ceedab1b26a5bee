"""Ingest throughput: dcmtk `storescu` into our node vs into Orthanc (and dcmtk `storescp`), same
files, same run, rounds interleaved.

Our side is `pneumo node` as production runs it (a separate process, in PNEUMO_NODE_PROCESSES
receiver processes) on a real Redis broker, on SQLite and on a fresh PostgreSQL database: an
instance counts only once it is spooled, fsynced, renamed, recorded in one transaction, answered
and queued (checked in the database after each trial). Orthanc 1.10 (Debian's) stores into its own
SQLite index and storage folder, defaults otherwise; storescp writes the files without fsync or
index. Trials alternate between receivers (the order flips every round) so all see the same
machine load; the headline is the median of per-round ratios to Orthanc. CPU per file is the
receiver's own CPU time (all its processes) over a trial, divided by the files.

dcmtk 3.6.7 keeps Nagle's algorithm on unless TCP_NODELAY=1 is set (each small PDU can wait ~40 ms
for a delayed ACK on loopback), so storescu runs with it by default (`--dcmtk-nodelay off,on`
runs both).

    .venv/bin/python benchmarks/ingest.py --files 200 --payload dx224 --rounds 3
    .venv/bin/python benchmarks/ingest.py --profile --db sqlite   # where one C-STORE's time goes

`pneumo-run` (a receiver, not in the default set; `pneumo-run-baseline` from --baseline-tree) is
the product on its embedded defaults as
`pneumo run` starts it: SQLite and the bundled Redis in its home, the workers classifying what
arrives meanwhile (same machine, same cores); an instance counts once its row exists, its CPU is
the node's processes' alone, and the next trial starts once the workers have classified it all.
PNEUMO_BENCH_REDIS_DB picks the Redis database the other nodes use (flushed).

    .venv/bin/python benchmarks/ingest.py --receivers orthanc,pneumo-run --associations 4
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    bench_redis_url,
    database,
    dcmtk_env,
    echo,
    flush_bench_redis,
    free_port,
    load_average,
    median,
    print_table,
    start_storescp,
    stop,
    storescu,
    wait_for,
    write_payload,
)

ORTHANC = "/usr/sbin/Orthanc"  # Debian's orthanc package (1.10 on bookworm)


def send_all(port: int, files: list[Path], associations: int, called: str, nodelay: bool) -> float:
    """Seconds from launching `associations` storescu processes (files split evenly) to the last exit."""
    shares = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    processes = [storescu(port, share, called, nodelay) for share in shares]
    failures = []
    for process in processes:
        _, stderr = process.communicate()
        if process.returncode != 0:
            failures.append(stderr.decode(errors="replace")[-500:])
    elapsed = time.perf_counter() - started
    if failures:
        raise RuntimeError(f"storescu failed: {failures[0]}")
    return elapsed


def storescp_trial(files: list[Path], associations: int, work: Path, nodelay: bool) -> float:
    """storescp serves one association at a time unless it forks, so --fork when several."""
    folder = work / "storescp-out"
    shutil.rmtree(folder, ignore_errors=True)
    port = free_port()
    process = start_storescp(folder, port, fork=associations > 1, ae_title="PACS", nodelay=nodelay)
    try:
        elapsed = send_all(port, files, associations, "PACS", nodelay)
        wait_for(lambda: len(list(folder.iterdir())) >= len(files), 30, "storescp's files")
    finally:
        stop(process)
    shutil.rmtree(folder, ignore_errors=True)
    return len(files) / elapsed


def queued_count(sessions) -> int:
    from sqlalchemy import func, select

    from core.db import Instance, InstanceState

    with sessions() as session:
        return session.scalar(select(func.count(Instance.id)).where(Instance.state == InstanceState.QUEUED))


def instance_count(sessions) -> int:
    """Rows in any state: under `pneumo run` the workers move them on from `queued`."""
    from sqlalchemy import func, select

    from core.db import Instance

    with sessions() as session:
        return session.scalar(select(func.count(Instance.id)))


def wait_settled(sessions, name: str) -> None:
    """Until every instance is terminal: the run's workers are done with the last trial's images,
    so the next trial (of any receiver) does not share the cores with their classification."""
    from sqlalchemy import func, select

    from core.db import TERMINAL_STATES, Instance

    unfinished = select(func.count(Instance.id)).where(Instance.state.not_in(TERMINAL_STATES))

    def settled() -> bool:
        with sessions() as session:
            return not session.scalar(unfinished)

    wait_for(settled, 900, f"{name}'s workers to classify what it received", 1.0)


def node_trial(files: list[Path], associations: int, port: int, sessions, nodelay: bool,
               count=queued_count) -> float:
    before = count(sessions)
    elapsed = send_all(port, files, associations, "PNEUMO", nodelay)
    # storescu exits 0 even when a store is refused: every file must be recorded and queued.
    stored = count(sessions) - before
    assert stored == len(files), f"node recorded and queued {stored} of {len(files)}"
    return len(files) / elapsed


def start_node(env: dict[str, str], log_path: Path, tree: Path = REPO) -> subprocess.Popen:
    """`pneumo node` from the checkout at `tree` (another commit's, for a before/after)."""
    handle = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    process = subprocess.Popen([sys.executable, "-m", "ops.cli", "node"], env=env, cwd=tree,
                               stdout=handle, stderr=subprocess.STDOUT)
    wait_for(lambda: echo(int(env["PNEUMO_PORT"])), 60, "the node to answer C-ECHO", 0.2)
    return process


def start_run(work: Path, name: str, tree: Path = REPO) -> tuple[subprocess.Popen, int, str]:
    """`pneumo run` from the checkout at `tree` on its embedded defaults (SQLite, bundled Redis,
    its workers, models/): only home and loopback ports set. Returns it, its DICOM port and
    database URL."""
    home, port = work / f"home-{name}", free_port()
    env = {name: value for name, value in os.environ.items() if not name.startswith("PNEUMO_")}
    env.update({"PNEUMO_HOME": str(home), "PNEUMO_HOST": "127.0.0.1", "PNEUMO_PORT": str(port),
                "PNEUMO_DASHBOARD_PORT": str(free_port()), "PNEUMO_MODELS_DIR": str(REPO / "models")})
    handle = open(work / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it for its lifetime
    process = subprocess.Popen([sys.executable, "-m", "ops.cli", "run"], env=env, cwd=tree,
                               stdout=handle, stderr=subprocess.STDOUT)
    wait_for(lambda: echo(port), 240, "pneumo run's node to answer C-ECHO", 0.5)
    return process, port, f"sqlite:///{home / 'pneumo.db'}"


def node_pid(run_pid: int) -> int:
    """The node child of `pneumo run` (its CPU is counted, not the workers')."""
    import psutil

    for child in psutil.Process(run_pid).children():
        if child.cmdline()[-2:] == ["ops.cli", "node"] or child.cmdline()[-1:] == ["node"]:
            return child.pid
    raise RuntimeError("pneumo run has no node child")


class Orthanc:
    """Debian's Orthanc with its defaults but ports, folders and no HTTP authentication (loopback)."""

    def __init__(self, work: Path, nodelay: bool) -> None:
        self.port, self.http_port = free_port(), free_port()
        config = {
            "Name": "bench", "StorageDirectory": str(work / "storage"),
            "IndexDirectory": str(work / "index"), "DicomAet": "ORTHANC", "DicomPort": self.port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False, "DicomAlwaysAllowStore": True, "Plugins": [],
        }
        work.mkdir(parents=True, exist_ok=True)
        (work / "orthanc.json").write_text(json.dumps(config))
        handle = open(work / "orthanc.log", "ab")  # noqa: SIM115 - the child owns it for its lifetime
        # Orthanc's DICOM server is dcmtk's: TCP_NODELAY=1 in its environment, as for storescp.
        self.process = subprocess.Popen([ORTHANC, str(work / "orthanc.json")], stdout=handle,
                                        stderr=subprocess.STDOUT, env=dcmtk_env(nodelay))
        wait_for(lambda: echo(self.port, "ORTHANC"), 60, "Orthanc to answer C-ECHO", 0.2)

    def instances(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}/statistics", timeout=30) as answer:
            return int(json.load(answer)["CountInstances"])


def orthanc_trial(orthanc: Orthanc, files: list[Path], associations: int, nodelay: bool) -> float:
    before = orthanc.instances()
    elapsed = send_all(orthanc.port, files, associations, "ORTHANC", nodelay)
    stored = orthanc.instances() - before
    assert stored == len(files), f"Orthanc stored {stored} of {len(files)}"
    return len(files) / elapsed


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by process `pid` and its live children."""
    import psutil

    process = psutil.Process(pid)
    total = 0.0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = member.cpu_times()
            total += times.user + times.system
    return total


def process_cpu_s() -> float:
    """CPU seconds (user + system) this process has used: the in-process node's."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class StageTimer:
    """Wall time and the calling thread's CPU time per wrapped function, summed over calls (from
    every association thread): what the handler costs against pynetdicom's threads around it."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            started, cpu_started = time.perf_counter(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - started
                self.cpu[name] = self.cpu.get(name, 0.0) + time.thread_time() - cpu_started
                self.calls[name] = self.calls.get(name, 0) + 1

        return timed


def profile(args: argparse.Namespace) -> None:
    """Where a C-STORE's time goes: the node in this process with timers around each step."""
    import logging

    work = Path(tempfile.mkdtemp(prefix="pneumo-ingest-profile-"))
    port = free_port()
    with database(args.db, work / "home") as url:
        os.environ.update(
            {
                "PNEUMO_HOME": str(work / "home"),
                "PNEUMO_HOST": "127.0.0.1",
                "PNEUMO_PORT": str(port),
                "PNEUMO_DATABASE_URL": url,
                "PNEUMO_BROKER_URL": bench_redis_url(),
                "PNEUMO_ALLOWED_PEERS": "STORESCU",
            }
        )
        logging.basicConfig(
            filename=work / "node.log",
            level=logging.INFO,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        )  # as `pneumo node`
        from core.db import session_factory
        from core.queue import CLASSIFY, task_sender
        from core.settings import load_settings
        from dicom_node import receive, scp

        settings = load_settings()
        classify = task_sender(settings, CLASSIFY)  # as `pneumo node` queues

        flush_bench_redis()
        timer = StageTimer()
        for name in ("dcmread", "sha256_and_sync", "_fsync_dir", "_record"):
            setattr(receive, name, timer.wrap(f"receive.{name}", getattr(receive, name)))
        scp.store_instance = timer.wrap("store_instance (all of it)", scp.store_instance)
        scp.enqueue_after_commit = timer.wrap("enqueue_after_commit (all of it)", scp.enqueue_after_commit)
        scp.handle_store = timer.wrap("handle_store (our handler)", scp.handle_store)
        sessions = session_factory(url)
        sessions_timed = timer.wrap("sessionmaker() (open a session)", sessions)
        enqueue = timer.wrap(
            "send_task pneumo.classify (broker publish)", classify
        )
        server = scp.start(settings, sessions_timed, enqueue, block=False)
        try:
            node_trial(write_payload(args.payload, 4, work / "warm"), 1, port, sessions, True)
            timer.totals.clear()
            timer.cpu.clear()
            timer.calls.clear()
            files = write_payload(args.payload, args.files, work / "files")
            cpu_before = process_cpu_s()
            elapsed = send_all(port, files, 1, "PNEUMO", True)
            cpu = process_cpu_s() - cpu_before
        finally:
            server.shutdown()
            flush_bench_redis()
    shutil.rmtree(work, ignore_errors=True)
    count = len(files)
    print(
        f"{count} {args.payload} files, one association, dcmtk TCP_NODELAY=1, node in-process on {args.db}: "
        f"{count / elapsed:.1f} files/s, {elapsed / count * 1000:.1f} ms per file, node CPU "
        f"{cpu / count * 1000:.1f} ms per file; load {load_average()}"
    )
    rows = [
        (name, timer.calls[name], f"{total / count * 1000:.2f}", f"{timer.cpu[name] / count * 1000:.2f}")
        for name, total in sorted(timer.totals.items(), key=lambda item: -item[1])
    ]
    rows.append(("node process, all threads (pynetdicom's included)", count, "", f"{cpu / count * 1000:.2f}"))
    rows.append(
        ("wall time per file (storescu start to exit / files)", count, f"{elapsed / count * 1000:.2f}", "")
    )
    print_table(["step", "calls", "wall ms per file", "CPU ms per file (its thread)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--payload", choices=["dx224", "cr440"], default="dx224")
    parser.add_argument("--associations", default="1,4", help="comma-separated parallel storescu counts")
    parser.add_argument("--receivers", default="orthanc,node-sqlite,node-postgresql",
                        help="orthanc, storescp, node-sqlite, node-postgresql; node-sqlite-p1: in 1 process")
    parser.add_argument("--node-processes", type=int, default=0,
                        help="PNEUMO_NODE_PROCESSES for the nodes (0: the product default)")
    parser.add_argument("--dcmtk-nodelay", default="on", help="TCP_NODELAY for storescu/storescp")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--baseline-tree", default="",
                        help="a checkout of another commit (git worktree add): receivers node-*-baseline run "
                             "its node, interleaved with this one's")
    parser.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql",
                        help="with --profile: the node's database")
    parser.add_argument("--profile", action="store_true", help="time each step of a C-STORE instead")
    args = parser.parse_args()
    if args.profile:
        profile(args)
        return
    associations = [int(a) for a in args.associations.split(",")]
    receivers = args.receivers.split(",")
    nodelay_modes = [mode == "on" for mode in args.dcmtk_nodelay.split(",")]
    reference = "orthanc" if "orthanc" in receivers else receivers[0]

    from core.db import session_factory

    work = Path(tempfile.mkdtemp(prefix="pneumo-ingest-"))
    nodes: dict[str, subprocess.Popen] = {}
    orthanc: Orthanc | None = None
    try:
        with contextlib.ExitStack() as databases:
            flush_bench_redis()
            sessions, ports, pids = {}, {}, {}
            for run in (r for r in receivers if r.startswith("pneumo-run")):
                tree = Path(args.baseline_tree) if run.endswith("-baseline") else REPO
                nodes[run], ports[run], url = start_run(work, run, tree)
                sessions[run] = session_factory(url)
                pids[run] = node_pid(nodes[run].pid)
                node_trial(write_payload(args.payload, 8, work / "warm"), 4, ports[run], sessions[run], True,
                           instance_count)
                wait_settled(sessions[run], run)
            for receiver in (r for r in receivers if r.startswith("node-")):
                # node-sqlite, node-sqlite-p1 (1 process), node-sqlite-baseline (--baseline-tree's code)
                _, kind, *count = receiver.removesuffix("-baseline").split("-")
                home = work / f"home-{receiver}"
                url = databases.enter_context(database(kind, home))
                sessions[receiver] = session_factory(url)
                ports[receiver] = free_port()
                env = {
                    **os.environ,
                    "PNEUMO_HOME": str(work / f"home-{receiver}"),
                    "PNEUMO_HOST": "127.0.0.1",
                    "PNEUMO_PORT": str(ports[receiver]),
                    "PNEUMO_DATABASE_URL": url,
                    "PNEUMO_BROKER_URL": bench_redis_url(),
                    "PNEUMO_ALLOWED_PEERS": "STORESCU",
                    "PNEUMO_NODE_PROCESSES": count[0][1:] if count else str(args.node_processes),
                }
                tree = Path(args.baseline_tree) if receiver.endswith("-baseline") else REPO
                nodes[receiver] = start_node(env, work / f"{receiver}.log", tree)
                pids[receiver] = nodes[receiver].pid
                # Warm-up: first association, first transaction, first broker connection.
                warm = write_payload(args.payload, 8, work / "warm")
                node_trial(warm, 4, ports[receiver], sessions[receiver], True)
            if "orthanc" in receivers:
                orthanc = Orthanc(work / "orthanc", any(nodelay_modes))
                pids["orthanc"] = orthanc.process.pid
                orthanc_trial(orthanc, write_payload(args.payload, 8, work / "warm"), 4, True)
            size_kib = write_payload(args.payload, 1, work / "size")[0].stat().st_size / 1024
            logs = [(work / f"{receiver}.log").read_text().splitlines() for receiver in nodes
                    if receiver.startswith("node-")]
            listening = [line.rpartition(" (")[2].rstrip(")") for log in logs for line in log
                         if "listening on" in line]
            print(
                f"payload {args.payload}: {args.files} files of {size_kib:.0f} KiB per trial; nodes + Redis "
                f"(no worker consuming): {listening[0] if listening else '-'}; "
                f"{os.cpu_count()} CPUs; load before {load_average()}",
                flush=True,
            )
            rates: dict[tuple, list[float]] = {}
            cpu: dict[tuple, list[float]] = {}
            trial_rows = []
            for round_index in range(args.rounds):
                for nodelay in nodelay_modes:
                    for count in associations:
                        order = receivers if round_index % 2 == 0 else receivers[::-1]
                        for receiver in order:
                            files = write_payload(args.payload, args.files, work / "files")  # fresh UIDs
                            load = load_average()
                            cpu_before = tree_cpu_s(pids[receiver]) if receiver in pids else 0.0
                            if receiver == "storescp":
                                rate = storescp_trial(files, count, work, nodelay)
                            elif receiver == "orthanc":
                                assert orthanc is not None
                                rate = orthanc_trial(orthanc, files, count, nodelay)
                            else:
                                run = receiver.startswith("pneumo-run")
                                counted = instance_count if run else queued_count
                                rate = node_trial(files, count, ports[receiver], sessions[receiver], nodelay,
                                                  counted)
                            cpu_ms = ((tree_cpu_s(pids[receiver]) - cpu_before) / len(files) * 1000
                                      if receiver in pids else float("nan"))
                            if receiver.startswith("pneumo-run"):
                                wait_settled(sessions[receiver], receiver)
                            shutil.rmtree(work / "files")
                            rates.setdefault((nodelay, count, receiver), []).append(rate)
                            cpu.setdefault((nodelay, count, receiver), []).append(cpu_ms)
                            trial_rows.append((round_index + 1, "on" if nodelay else "off", count, receiver,
                                               f"{rate:.1f}", f"{cpu_ms:.1f}", load))
                            print(
                                f"  round {round_index + 1} dcmtk-nodelay {'on' if nodelay else 'off'} "
                                f"associations {count} {receiver}: {rate:.1f} files/s, {cpu_ms:.1f} ms CPU "
                                f"per file (load {load})",
                                flush=True,
                            )
            print()
            print_table(
                ["round", "dcmtk TCP_NODELAY", "associations", "receiver", "files/s", "CPU ms/file",
                 "load 1/5/15 before"],
                trial_rows,
            )
            print()
            rows = []
            for nodelay in nodelay_modes:
                for count in associations:
                    base = rates[(nodelay, count, reference)]
                    row = ["on" if nodelay else "off", count]
                    for receiver in receivers:
                        ours = rates[(nodelay, count, receiver)]
                        row += [f"{median(ours):.1f}", f"{median(cpu[(nodelay, count, receiver)]):.1f}"]
                        if receiver != reference:
                            ratios = [o / s for o, s in zip(ours, base, strict=True)]
                            row.append(f"{median(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)})")
                    rows.append(row)
            headers = ["dcmtk TCP_NODELAY", "associations"]
            for receiver in receivers:
                headers += [f"{receiver} files/s", f"{receiver} CPU ms/file"]
                if receiver != reference:
                    headers.append(f"{receiver} / {reference} (per round)")
            print_table(headers, rows)
            print(
                f"medians over {args.rounds} rounds; ratio = median of per-round ratios; "
                f"load after {load_average()}"
            )
    finally:
        for receiver, process in nodes.items():
            stop(process, 15 if receiver.startswith("pneumo-run") else 2)
        if orthanc is not None:
            stop(orthanc.process)
        flush_bench_redis()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
