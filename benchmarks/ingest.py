"""Ingest throughput: dcmtk `storescu` into our node vs into dcmtk `storescp`, same files, same run.

Our side is `pneumo node` as production runs it (a separate process) on a real Redis broker and a
fresh PostgreSQL database (or SQLite with --db sqlite): an instance counts only once it is spooled,
fsynced, renamed, recorded in one transaction, answered and queued (checked in the database after
each trial). storescp writes the same files without fsync. Trials alternate between receivers
(the order flips every round) so all see the same machine load.

dcmtk 3.6.7 keeps Nagle's algorithm on unless TCP_NODELAY=1 is set, and pynetdicom never sets
TCP_NODELAY, so on loopback each file can wait ~40 ms for a delayed ACK: `--dcmtk-nodelay off,on`
runs both. Receiver `node-nodelay` is our node with TCP_NODELAY set on accepted sockets (a
benchmark-side patch, to size that product change before making it).

    .venv/bin/python benchmarks/ingest.py --files 200 --payload dx224 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    bench_redis_url,
    database,
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


def node_trial(files: list[Path], associations: int, port: int, sessions, nodelay: bool) -> float:
    before = queued_count(sessions)
    elapsed = send_all(port, files, associations, "PNEUMO", nodelay)
    # storescu exits 0 even when a store is refused: every file must be recorded and queued.
    stored = queued_count(sessions) - before
    assert stored == len(files), f"node recorded and queued {stored} of {len(files)}"
    return len(files) / elapsed


def start_node(env: dict[str, str], log_path: Path, nodelay: bool) -> subprocess.Popen:
    command = (
        [sys.executable, str(Path(__file__).resolve()), "_node"]
        if nodelay
        else [sys.executable, "-m", "ops.cli", "node"]
    )
    handle = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT)
    wait_for(lambda: echo(int(env["PNEUMO_PORT"])), 60, "the node to answer C-ECHO", 0.2)
    return process


def serve_node_with_nodelay() -> None:
    """`pneumo node` with TCP_NODELAY on every accepted socket (the proposed product change)."""
    from pynetdicom.transport import ThreadedAssociationServer

    accept = ThreadedAssociationServer.get_request

    def get_request(self):
        client, address = accept(self)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return client, address

    ThreadedAssociationServer.get_request = get_request
    from ops.cli import node

    node()


def process_cpu_s() -> float:
    """CPU seconds (user + system) this process has used: the in-process node's."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class StageTimer:
    """Wall time per wrapped function, summed over calls (from every association thread)."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def wrap(self, name: str, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - started
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
        (name, timer.calls[name], f"{total / count * 1000:.2f}")
        for name, total in sorted(timer.totals.items(), key=lambda item: -item[1])
    ]
    rows.append(
        ("wall time per file (storescu start to exit / files)", count, f"{elapsed / count * 1000:.2f}")
    )
    print_table(["step", "calls", "ms per file"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--payload", choices=["dx224", "cr440"], default="dx224")
    parser.add_argument("--associations", default="1,4", help="comma-separated parallel storescu counts")
    parser.add_argument("--receivers", default="storescp,node,node-nodelay")
    parser.add_argument("--dcmtk-nodelay", default="off,on", help="TCP_NODELAY for storescu/storescp")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--profile", action="store_true", help="time each step of a C-STORE instead")
    args = parser.parse_args()
    if args.profile:
        profile(args)
        return
    associations = [int(a) for a in args.associations.split(",")]
    receivers = args.receivers.split(",")
    nodelay_modes = [mode == "on" for mode in args.dcmtk_nodelay.split(",")]

    from core.db import session_factory

    work = Path(tempfile.mkdtemp(prefix="pneumo-ingest-"))
    nodes: dict[str, subprocess.Popen] = {}
    try:
        with database(args.db, work / "home") as url:
            flush_bench_redis()
            sessions = session_factory(url)
            ports = {}
            for receiver in (r for r in receivers if r != "storescp"):
                ports[receiver] = free_port()
                env = {
                    **os.environ,
                    "PNEUMO_HOME": str(work / f"home-{receiver}"),
                    "PNEUMO_HOST": "127.0.0.1",
                    "PNEUMO_PORT": str(ports[receiver]),
                    "PNEUMO_DATABASE_URL": url,
                    "PNEUMO_BROKER_URL": bench_redis_url(),
                    "PNEUMO_ALLOWED_PEERS": "STORESCU",
                }
                nodes[receiver] = start_node(env, work / f"{receiver}.log", receiver == "node-nodelay")
                # Warm-up: first association, first transaction, first broker connection.
                node_trial(write_payload(args.payload, 4, work / "warm"), 1, ports[receiver], sessions, False)
            size_kib = write_payload(args.payload, 1, work / "size")[0].stat().st_size / 1024
            print(
                f"payload {args.payload}: {args.files} files of {size_kib:.0f} KiB per trial; nodes on "
                f"{args.db} + Redis (no worker consuming); load before {load_average()}",
                flush=True,
            )
            rates: dict[tuple, list[float]] = {}
            trial_rows = []
            for round_index in range(args.rounds):
                for nodelay in nodelay_modes:
                    for count in associations:
                        order = receivers if round_index % 2 == 0 else receivers[::-1]
                        for receiver in order:
                            files = write_payload(args.payload, args.files, work / "files")  # fresh UIDs
                            load = load_average()
                            if receiver == "storescp":
                                rate = storescp_trial(files, count, work, nodelay)
                            else:
                                rate = node_trial(files, count, ports[receiver], sessions, nodelay)
                            shutil.rmtree(work / "files")
                            rates.setdefault((nodelay, count, receiver), []).append(rate)
                            trial_rows.append(
                                (
                                    round_index + 1,
                                    "on" if nodelay else "off",
                                    count,
                                    receiver,
                                    f"{rate:.1f}",
                                    load,
                                )
                            )
                            print(
                                f"  round {round_index + 1} dcmtk-nodelay {'on' if nodelay else 'off'} "
                                f"associations {count} {receiver}: {rate:.1f} files/s (load {load})",
                                flush=True,
                            )
            print()
            print_table(
                ["round", "dcmtk TCP_NODELAY", "associations", "receiver", "files/s", "load 1/5/15 before"],
                trial_rows,
            )
            print()
            rows = []
            for nodelay in nodelay_modes:
                for count in associations:
                    scp = rates.get((nodelay, count, "storescp"), [])
                    row = ["on" if nodelay else "off", count, f"{median(scp):.1f}"]
                    for receiver in (r for r in receivers if r != "storescp"):
                        ours = rates[(nodelay, count, receiver)]
                        ratios = [o / s for o, s in zip(ours, scp, strict=False)]
                        row += [
                            f"{median(ours):.1f}",
                            f"{median(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)})",
                        ]
                    rows.append(row)
            headers = ["dcmtk TCP_NODELAY", "associations", "storescp files/s"]
            for receiver in (r for r in receivers if r != "storescp"):
                headers += [f"{receiver} files/s", f"{receiver} / storescp (per round)"]
            print_table(headers, rows)
            print(
                f"medians over {args.rounds} rounds; ratio = median of per-round ratios; "
                f"load after {load_average()}"
            )
    finally:
        for process in nodes.values():
            stop(process, 2)
        flush_bench_redis()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["_node"]:
        serve_node_with_nodelay()
    else:
        main()
