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
    database,
    echo,
    embedded_env,
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


def add_history(url: str, count: int, destination: str) -> None:
    """`count` old single-image studies, classified and delivered, written straight into the
    database: the history a site accumulates, which every finalise tick may have to look at."""
    from datetime import timedelta

    from pydicom.uid import generate_uid

    from core.db import (
        Delivery,
        DeliveryState,
        Instance,
        InstanceState,
        Result,
        Series,
        Study,
        session_factory,
    )
    from core.migrate import upgrade

    upgrade(url)
    sessions = session_factory(url)
    old = datetime.now(UTC).replace(tzinfo=None) - timedelta(days=1)
    for start in range(0, count, 1000):
        size = min(1000, count - start)
        with sessions() as session, session.begin():
            studies = [
                Study(study_instance_uid=generate_uid(), first_received_at=old, last_received_at=old)
                for _ in range(size)
            ]
            session.add_all(studies)
            session.flush()
            series = [
                Series(study_id=s.id, series_instance_uid=generate_uid(), modality="DX") for s in studies
            ]
            session.add_all(series)
            session.flush()
            instances = [
                Instance(
                    study_id=study.id,
                    series_id=one.id,
                    sop_instance_uid=generate_uid(),
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    path="/nonexistent",
                    size_bytes=0,
                    sha256="0" * 64,
                    calling_ae_title="HISTORY",
                    state=InstanceState.CLASSIFIED,
                    attempts=1,
                    received_at=old,
                    queued_at=old,
                    finished_at=old,
                )
                for study, one in zip(studies, series, strict=True)
            ]
            session.add_all(instances)
            session.flush()
            session.add_all(
                Result(
                    instance_id=instance.id,
                    model_name="pneumonia-transfer",
                    model_version="history",
                    probability=0.5,
                    threshold=0.5,
                    label="NORMAL",
                    decode_ms=0,
                    inference_ms=0,
                )
                for instance in instances
            )
            session.add_all(
                Delivery(
                    study_id=study.id,
                    model_name="pneumonia-transfer",
                    model_version="history",
                    destination=destination,
                    sr_sop_instance_uid=generate_uid(),
                    instances_reported=1,
                    state=DeliveryState.DELIVERED,
                    attempts=1,
                    created_at=old,
                    updated_at=old,
                    delivered_at=old,
                )
                for study in studies
            )


def time_finalise(url: str, env: dict[str, str]) -> float:
    """Seconds of one `finalise_stable_studies` call, the task the scheduler runs every tick."""
    from core.db import session_factory
    from core.settings import Settings
    from worker.housekeeping import finalise_stable_studies

    settings = Settings(pacs=env["PNEUMO_PACS"], quiet_seconds=float(env["PNEUMO_QUIET_SECONDS"]))
    sessions = session_factory(url)
    started = time.perf_counter()
    sent = finalise_stable_studies(sessions, settings, lambda _delivery_id: None)
    assert not sent, f"history studies were scheduled again: {len(sent)}"
    return time.perf_counter() - started


def start_pneumo_run(env: dict[str, str], log_path: Path) -> subprocess.Popen:
    handle = open(log_path, "ab")  # noqa: SIM115 - the child owns it for its lifetime
    process = subprocess.Popen(
        [sys.executable, "-m", "ops.cli", "run"], env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT
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


def finalise_scaling(sizes: list[int], db: str) -> None:
    """Seconds of one finalise pass by the number of old delivered studies (fresh database each)."""
    env = {"PNEUMO_PACS": "PACS@127.0.0.1:104", "PNEUMO_QUIET_SECONDS": "5"}
    rows = []
    for size in sizes:
        work = Path(tempfile.mkdtemp(prefix="pneumo-finalise-"))
        try:
            with database("postgresql" if db == "postgresql" else "sqlite", work) as url:
                add_history(url, size, env["PNEUMO_PACS"])
                load = load_average()
                seconds = [time_finalise(url, env) for _ in range(3)]
                rows.append((size, f"{min(seconds):.2f}", f"{max(seconds):.2f}", load))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print_table(
        ["old delivered studies", "one finalise pass, s (best of 3)", "worst of 3", "load before"], rows
    )


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
    parser.add_argument("--history", type=int, default=0, help="old delivered studies in the database first")
    parser.add_argument("--finalise-interval", type=float, default=None, help="PNEUMO_FINALISE_INTERVAL_S")
    parser.add_argument(
        "--finalise-scaling", default="", help="only time one finalise pass per history size, e.g. 1000,3000"
    )
    args = parser.parse_args()
    if args.finalise_scaling:
        finalise_scaling([int(n) for n in args.finalise_scaling.split(",")], args.db)
        return

    from core.db import session_factory

    work = Path(tempfile.mkdtemp(prefix="pneumo-latency-"))
    pacs_folder = work / "pacs"
    pacs = run = None
    postgres = None
    try:
        pacs_port, node_port = free_port(), free_port()
        pacs = start_storescp(pacs_folder, pacs_port, ae_title="PACS", nodelay=args.dcmtk_nodelay)
        env = embedded_env(work / "home", node_port, pacs_port, args.quiet)
        if args.finalise_interval is not None:
            env["PNEUMO_FINALISE_INTERVAL_S"] = str(args.finalise_interval)
        if args.dcmtk_nodelay:
            env["TCP_NODELAY"] = "1"
        else:
            env.pop("TCP_NODELAY", None)
        if args.db == "postgresql":
            postgres = postgres_database()
            env["PNEUMO_DATABASE_URL"] = postgres.__enter__()
            env["PNEUMO_BROKER_URL"] = bench_redis_url()
            flush_bench_redis()
        url = env.get("PNEUMO_DATABASE_URL") or f"sqlite:///{work / 'home' / 'pneumo.db'}"
        if args.history:
            (work / "home").mkdir(parents=True, exist_ok=True)
            started = time.monotonic()
            add_history(url, args.history, env["PNEUMO_PACS"])
            print(
                f"{args.history} old delivered studies written in {time.monotonic() - started:.0f} s",
                flush=True,
            )
            print(
                f"one finalise pass over them (nothing to send): {time_finalise(url, env):.2f} s", flush=True
            )
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
            f"{args.studies} single-image dx224 studies one at a time after {args.history} old ones; "
            f"load before {load_before}",
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
        if postgres is not None:
            flush_bench_redis()
            postgres.__exit__(None, None, None)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
