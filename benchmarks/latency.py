"""Latency of one study on an idle system: storescu C-STORE to the SR stored at the PACS peer.

`pneumo run` (embedded SQLite + bundled Redis by default, as `make run` starts it) with dcmtk
storescp as the PACS. One single-image study at a time; the next is sent only after the previous
SR is delivered and the system has idled a second. Stage timestamps come from the database
(Instance.received_at / finished_at, Delivery.created_at / delivered_at) and the SR file's mtime
at the PACS; all are this machine's clock.

    .venv/bin/python benchmarks/latency.py --studies 50 --quiet 5
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    REPO,
    bench_redis_url,
    echo,
    flush_bench_redis,
    free_port,
    load_average,
    percentile,
    postgres_database,
    print_table,
    start_storescp,
    stop,
    storescu,
    training_images,
    wait_for,
    write_payload,
)


def epoch(value: datetime) -> float:
    return value.replace(tzinfo=UTC).timestamp()


def start_pneumo_run(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    handle = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    process = subprocess.Popen(
        [sys.executable, "-m", "core.cli", "run"], env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT
    )
    wait_for(lambda: echo(int(env["PNEUMO_PORT"])), 120, "the node to answer C-ECHO", 0.2)
    return process


def delivered(sessions, study_uid: str):
    from sqlalchemy import select

    from core.db import Delivery, DeliveryState, Study

    with sessions() as session:
        return session.scalar(
            select(Delivery)
            .join(Study)
            .where(Study.study_instance_uid == study_uid, Delivery.state == DeliveryState.DELIVERED)
        )


def one_study(path: Path, port: int, sessions, pacs: Path, nodelay: bool) -> dict[str, float]:
    """Send one file, wait for its SR at the PACS and its delivery row; the stage times in seconds."""
    from pydicom import dcmread
    from sqlalchemy import select

    from core.db import Instance

    header = dcmread(path, stop_before_pixels=True)
    sent_at = time.time()
    sender = storescu(port, [path], "PNEUMO", nodelay)
    _, stderr = sender.communicate()
    if sender.returncode != 0:
        raise RuntimeError(stderr.decode(errors="replace")[-500:])
    delivery = wait_for(lambda: delivered(sessions, str(header.StudyInstanceUID)), 120, "the SR delivery")
    with sessions() as session:
        instance = session.scalar(select(Instance).where(Instance.sop_instance_uid == header.SOPInstanceUID))
    sr_file = wait_for(lambda: next(pacs.glob(f"*.{delivery.sr_sop_instance_uid}"), None), 10, "the SR file")
    sr_at = sr_file.stat().st_mtime
    received, finished = epoch(instance.received_at), epoch(instance.finished_at)
    created, acked = epoch(delivery.created_at), epoch(delivery.delivered_at)
    return {
        "C-STORE sent -> received (row recorded)": received - sent_at,
        "received -> classified": finished - received,
        "classified -> delivery created (quiet period, finalise tick)": created - finished,
        "delivery created -> SR stored at PACS": sr_at - created,
        "SR stored at PACS -> marked delivered": acked - sr_at,
        "received -> delivery created, minus quiet period": created - received,
        "total: C-STORE sent -> SR stored at PACS": sr_at - sent_at,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--quiet", type=float, default=5.0, help="PNEUMO_QUIET_SECONDS")
    parser.add_argument(
        "--db",
        choices=["embedded", "postgresql"],
        default="embedded",
        help="embedded: SQLite + bundled Redis; postgresql: PostgreSQL + the local Redis",
    )
    parser.add_argument("--dcmtk-nodelay", action="store_true", help="TCP_NODELAY=1 for storescu/storescp")
    parser.add_argument(
        "--idle", type=float, default=1.0, help="idle seconds between studies, plus a uniform 0-1 s jitter"
    )
    parser.add_argument("--finalise-interval", type=float, default=None, help="PNEUMO_FINALISE_INTERVAL_S")
    args = parser.parse_args()

    from core.db import session_factory

    work = Path(tempfile.mkdtemp(prefix="pneumo-latency-"))
    pacs_folder = work / "pacs"
    pacs = run = None
    database = None
    try:
        pacs_port, node_port = free_port(), free_port()
        pacs = start_storescp(pacs_folder, pacs_port, ae_title="PACS", nodelay=args.dcmtk_nodelay)
        env = {
            **os.environ,
            "PNEUMO_HOME": str(work / "home"),
            "PNEUMO_HOST": "127.0.0.1",
            "PNEUMO_PORT": str(node_port),
            "PNEUMO_PACS": f"PACS@127.0.0.1:{pacs_port}",
            "PNEUMO_QUIET_SECONDS": str(args.quiet),
            "PNEUMO_ALLOWED_PEERS": "STORESCU",
            "PNEUMO_DASHBOARD_PORT": str(free_port()),
            "TF_CPP_MIN_LOG_LEVEL": "2",
        }
        if args.finalise_interval is not None:
            env["PNEUMO_FINALISE_INTERVAL_S"] = str(args.finalise_interval)
        if args.dcmtk_nodelay:
            env["TCP_NODELAY"] = "1"
        else:
            env.pop("TCP_NODELAY", None)
        if args.db == "postgresql":
            database = postgres_database()
            env["PNEUMO_DATABASE_URL"] = database.__enter__()
            env["PNEUMO_BROKER_URL"] = bench_redis_url()
            flush_bench_redis()
        run = start_pneumo_run(env, work / "pneumo-run.log")
        sessions = session_factory(
            env.get("PNEUMO_DATABASE_URL") or f"sqlite:///{work / 'home' / 'pneumo.db'}"
        )
        images = training_images(args.studies + 1)
        files = write_payload("dx224", args.studies + 1, work / "files", images)
        one_study(files[0], node_port, sessions, pacs_folder, args.dcmtk_nodelay)  # warm-up: model load
        time.sleep(args.idle)
        load_before = load_average()
        print(
            f"pneumo run ({args.db}), PNEUMO_QUIET_SECONDS={args.quiet}, finalise every "
            f"{env.get('PNEUMO_FINALISE_INTERVAL_S', '1.0 (default)')} s, "
            f"{args.studies} single-image dx224 studies one at a time; load before {load_before}",
            flush=True,
        )
        samples: list[dict[str, float]] = []
        jitter = random.Random(0)
        for index, path in enumerate(files[1:]):
            samples.append(one_study(path, node_port, sessions, pacs_folder, args.dcmtk_nodelay))
            total = samples[-1]["total: C-STORE sent -> SR stored at PACS"]
            if index % 10 == 9:
                print(f"  {index + 1} studies, last total {total:.2f} s (load {load_average()})", flush=True)
            time.sleep(args.idle + jitter.random())  # no lock-step with the finalise tick
        rows = []
        for stage in samples[0]:
            values = [sample[stage] for sample in samples]
            if "minus quiet" in stage:
                values = [value - args.quiet for value in values]
            rows.append(
                (
                    stage,
                    f"{percentile(values, 50):.3f}",
                    f"{percentile(values, 95):.3f}",
                    f"{min(values):.3f}",
                    f"{max(values):.3f}",
                )
            )
        beyond = [sample["total: C-STORE sent -> SR stored at PACS"] - args.quiet for sample in samples]
        rows.append(
            (
                "beyond the quiet period (total - quiet)",
                f"{percentile(beyond, 50):.3f}",
                f"{percentile(beyond, 95):.3f}",
                f"{min(beyond):.3f}",
                f"{max(beyond):.3f}",
            )
        )
        print()
        print_table(["stage (seconds)", "p50", "p95", "min", "max"], rows)
        print(f"{len(samples)} studies; load before {load_before}, after {load_average()}")
    finally:
        stop(run, 2)
        stop(pacs)
        if database is not None:
            flush_bench_redis()
            database.__exit__(None, None, None)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
