"""More than one machine, as separate processes here: studies/s with 1 node + 1 worker against
2 nodes + 2 workers sharing one PostgreSQL database and one Redis broker (issue 21 item 6).

The setting of tests/pipeline/test_two_nodes.py and docs/operations.md ("Several machines share
PostgreSQL and the broker"): `pneumo node` and `pneumo worker --queues inference-cpu` per "host",
each with its own PNEUMO_HOME, all on a fresh PostgreSQL database of this run (created by name,
dropped after) and the benchmarks' Redis db (PNEUMO_BENCH_REDIS_DB; flushed before and after).
No PACS and no scheduler: the number is received and classified images per second. Each round
starts its processes afresh, warms every worker with one image per node, then sends N
single-image dx224 studies (the same JPEGs each round, fresh UIDs) over two storescu
associations (TCP_NODELAY): both to the one node, or one to each of the two. Time: first send to
the last instance in a terminal state (database timestamps). Rounds alternate 1x1, 2x2, 2x2,
1x1, ... so load from other jobs hits both alike.

On one 2-core machine the two "hosts" share the same two cores, so 2x2 can gain at most what one
process leaves idle (the node waiting on fsync and the network while the worker computes): this
measures that the processes cooperate, not what two machines would give.

    PNEUMO_BENCH_REDIS_DB=12 .venv/bin/python benchmarks/scale_out.py --studies 300 --rounds 2
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BENCH_REDIS_DB,
    REPO,
    bench_redis_url,
    echo,
    flush_bench_redis,
    free_port,
    load_average,
    median,
    postgres_database,
    print_table,
    stop,
    storescu,
    training_images,
    wait_for,
    write_payload,
)
from latency import epoch


def host_env(home: Path, database_url: str, node_processes: int) -> dict[str, str]:
    """One "host": its own home and port, the shared database and broker, no PACS."""
    import os

    return {
        **os.environ,
        "PNEUMO_HOME": str(home),
        "PNEUMO_HOST": "127.0.0.1",
        "PNEUMO_PORT": str(free_port()),
        "PNEUMO_DATABASE_URL": database_url,
        "PNEUMO_BROKER_URL": bench_redis_url(),
        "PNEUMO_PACS": "",
        "PNEUMO_ALLOWED_PEERS": "STORESCU",
        "PNEUMO_NODE_PROCESSES": str(node_processes),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def started(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = log.open("ab")
    return subprocess.Popen([sys.executable, "-m", "ops.cli", *command], env=env, cwd=REPO,
                            stdout=handle, stderr=subprocess.STDOUT)


def terminal_count(sessions) -> int:
    from sqlalchemy import func, select

    from core.db import TERMINAL_STATES, Instance

    with sessions() as session:
        return session.scalar(select(func.count(Instance.id)).where(Instance.state.in_(TERMINAL_STATES)))


def one_round(hosts: int, files: list[Path], warm: list[Path], database_url: str, work: Path,
              node_processes: int, timeout_s: float) -> dict[str, float]:
    """`hosts` nodes + `hosts` workers: warm up, send `files` over two associations, time it."""
    from sqlalchemy import func, select

    from core.db import Instance, session_factory

    work.mkdir(parents=True, exist_ok=True)
    envs = [host_env(work / f"home-{i}", database_url, node_processes) for i in range(hosts)]
    processes = []
    sessions = session_factory(database_url)
    try:
        processes = [started(["node"], env, work / f"node-{i}.log") for i, env in enumerate(envs)]
        processes += [started(["worker", "--queues", "inference-cpu"], env, work / f"worker-{i}.log")
                      for i, env in enumerate(envs)]
        ports = [int(env["PNEUMO_PORT"]) for env in envs]
        for port in ports:
            wait_for(lambda port=port: echo(port), 120, "a node to answer C-ECHO", 0.5)
        before = terminal_count(sessions)
        for index, path in enumerate(warm[: 2 * hosts]):  # each worker's first task loads the model
            warmer = storescu(ports[index % hosts], [path], nodelay=True)
            warmer.communicate()
        wait_for(lambda: terminal_count(sessions) >= before + 2 * hosts, 300, "the warm-up images", 0.5)
        time.sleep(2)
        before = terminal_count(sessions)
        load = load_average()
        started_at = time.time()
        halves = [files[0::2], files[1::2]]
        senders = [storescu(ports[index % hosts], half, nodelay=True)
                   for index, half in enumerate(halves)]
        for sender in senders:
            _, errors = sender.communicate()
            if sender.returncode != 0 or b"Store Failed" in errors:
                raise RuntimeError(errors.decode(errors="replace")[-500:])
        sent_s = time.time() - started_at
        wait_for(lambda: terminal_count(sessions) >= before + len(files), timeout_s,
                 "every image in a terminal state", 0.5)
        with sessions() as session:
            last = epoch(session.scalar(select(func.max(Instance.finished_at))))
        return {"studies_per_s": len(files) / (last - started_at), "sent_s": sent_s,
                "wall_s": last - started_at, "load": load}
    finally:
        for process in processes:
            stop(process)
        sessions.kw["bind"].dispose()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each configuration")
    parser.add_argument("--node-processes", type=int, default=1,
                        help="PNEUMO_NODE_PROCESSES of each node (product default 0: one per core)")
    parser.add_argument("--timeout", type=float, default=1800)
    args = parser.parse_args()

    images = training_images(min(args.studies, 400))
    work = Path(tempfile.mkdtemp(prefix="pneumo-scaleout-"))
    rates: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    flush_bench_redis()
    try:
        with postgres_database() as url:
            for round_index in range(args.rounds):
                order = (1, 2) if round_index % 2 == 0 else (2, 1)
                for hosts in order:
                    folder = work / f"files-{round_index}-{hosts}"
                    files = write_payload("dx224", args.studies, folder, images)
                    warm = write_payload("dx224", 4, folder / "warm", images)
                    result = one_round(hosts, files, warm, url, work / f"run-{round_index}-{hosts}",
                                       args.node_processes, args.timeout)
                    rates[hosts].append(result)
                    shutil.rmtree(folder, ignore_errors=True)
                    print(f"round {round_index + 1}, {hosts} node(s) + {hosts} worker(s): "
                          f"{result['studies_per_s']:.1f} studies/s, sent in {result['sent_s']:.1f} s, "
                          f"last classified after {result['wall_s']:.1f} s (load before {result['load']})",
                          flush=True)
    finally:
        flush_bench_redis()
        shutil.rmtree(work, ignore_errors=True)
    one, two = (median([r["studies_per_s"] for r in rates[h]]) for h in (1, 2))
    print(f"\n{args.studies} dx224 studies per round, two storescu associations, "
          f"PostgreSQL + Redis db {BENCH_REDIS_DB}, "
          f"PNEUMO_NODE_PROCESSES={args.node_processes}; load now {load_average()}")
    print_table(
        ["configuration", "studies/s per round", "median", "sent in s (median)", "ratio to 1x1"],
        [(f"{h} node(s) + {h} worker(s)", ", ".join(f"{r['studies_per_s']:.1f}" for r in rates[h]),
          f"{m:.1f}", f"{median([r['sent_s'] for r in rates[h]]):.1f}", f"{m / one:.2f}")
         for h, m in ((1, one), (2, two))],
    )


if __name__ == "__main__":
    main()
