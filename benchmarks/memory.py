"""Memory of the running product: RSS of the node, workers, scheduler and Redis under `pneumo run`.

Default mode: RSS after one warm-up study, then after 1,000 more single-image studies are received,
classified and their SRs delivered to a storescp PACS. `--soak-minutes M` instead sends at a steady
rate for M minutes, samples RSS every minute (printed as it goes, for a run under nohup) and ends
with the series and the growth of each process (last - first sample, and a least-squares slope).
RSS of forked Celery children counts pages shared with their parent in both.

    .venv/bin/python benchmarks/memory.py --instances 1000
    nohup .venv/bin/python benchmarks/memory.py --soak-minutes 30 --rate 0.5 > /tmp/pneumo-soak.txt 2>&1 &
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    embedded_env,
    free_port,
    load_average,
    print_table,
    start_storescp,
    stop,
    storescu,
    training_images,
    wait_for,
    write_payload,
)
from latency import start_pneumo_run

ROLES = (
    "node",
    "inference worker",
    "inference child",
    "delivery worker",
    "scheduler",
    "redis",
    "dashboard",
    "supervisor",
    "other",
)


def role_of(process) -> str:
    command = " ".join(process.cmdline())
    if "redis-server" in command:
        return "redis"
    if "ops.cli node" in command:
        return "node"
    if "inference-cpu" in command or "inference-gpu" in command:
        return "inference child" if "celery" in " ".join(process.parent().cmdline()) else "inference worker"
    if "-Q delivery" in command:
        return "delivery worker"  # its pool children too: they build and send the SRs
    if "ops.cli dashboard" in command:
        return "dashboard"
    if " beat " in command:
        return "scheduler"
    if "ops.cli run" in command:
        return "supervisor"
    return "other"


def rss_by_role(supervisor_pid: int) -> dict[str, float]:
    """MiB of resident memory per role, over the supervisor and every process below it."""
    import psutil

    root = psutil.Process(supervisor_pid)
    totals = dict.fromkeys(ROLES, 0.0)
    for process in [root, *root.children(recursive=True)]:
        try:
            totals[role_of(process)] += process.memory_info().rss / 2**20
        except psutil.NoSuchProcess:
            continue
    return totals


def counts(sessions) -> tuple[int, int, int]:
    """(instances, instances in a terminal state, deliveries delivered)."""
    from sqlalchemy import func, select

    from core.db import TERMINAL_STATES, Delivery, DeliveryState, Instance

    with sessions() as session:
        return (
            session.scalar(select(func.count(Instance.id))),
            session.scalar(select(func.count(Instance.id)).where(Instance.state.in_(TERMINAL_STATES))),
            session.scalar(select(func.count(Delivery.id)).where(Delivery.state == DeliveryState.DELIVERED)),
        )


def send_batch(count: int, port: int, work: Path, images: list[Path], offset: int) -> None:
    picked = [images[(offset + i) % len(images)] for i in range(count)]
    files = write_payload("dx224", count, work / "batch", picked)
    sender = storescu(port, files)
    _, stderr = sender.communicate()
    shutil.rmtree(work / "batch")
    if sender.returncode != 0:
        raise RuntimeError(stderr.decode(errors="replace")[-500:])


def wait_drained(sessions, expected: int, timeout_s: float) -> None:
    wait_for(
        lambda: counts(sessions) == (expected, expected, expected),
        timeout_s,
        f"{expected} instances classified and their SRs delivered",
        1.0,
    )


def slope_per_hour(minutes: list[float], values: list[float]) -> float:
    if len(values) < 2:
        return float("nan")
    mean_x, mean_y = sum(minutes) / len(minutes), sum(values) / len(values)
    numerator = sum((x - mean_x) * (y - mean_y) for x, y in zip(minutes, values, strict=True))
    denominator = sum((x - mean_x) ** 2 for x in minutes)
    return numerator / denominator * 60


def fmt(row: dict[str, float]) -> list[str]:
    return [f"{row[role]:.0f}" for role in ROLES]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--instances", type=int, default=1000)
    parser.add_argument("--soak-minutes", type=float, default=0, help="soak mode: minutes of steady sending")
    parser.add_argument("--rate", type=float, default=0.5, help="soak: studies per second")
    parser.add_argument("--batch-seconds", type=float, default=10, help="soak: one association this often")
    parser.add_argument("--quiet", type=float, default=5.0, help="PNEUMO_QUIET_SECONDS")
    args = parser.parse_args()

    from core.db import session_factory

    work = Path(tempfile.mkdtemp(prefix="pneumo-memory-"))
    pacs = run = None
    try:
        pacs_port, node_port = free_port(), free_port()
        pacs = start_storescp(work / "pacs", pacs_port, ae_title="PACS")
        env = embedded_env(work / "home", node_port, pacs_port, args.quiet)
        run = start_pneumo_run(env, work / "pneumo-run.log")
        sessions = session_factory(f"sqlite:///{work / 'home' / 'pneumo.db'}")
        images = training_images(200)
        send_batch(1, node_port, work, images, 0)
        wait_drained(sessions, 1, 300)
        sent = 1
        start = rss_by_role(run.pid)
        print(
            f"pneumo run (embedded SQLite + bundled Redis), PACS storescp, quiet {args.quiet} s; "
            f"RSS in MiB after one warm-up study; load {load_average()}",
            flush=True,
        )
        print_table(["when", *ROLES], [["after warm-up", *fmt(start)]])
        if not args.soak_minutes:
            started = time.monotonic()
            for offset in range(0, args.instances, 100):
                count = min(100, args.instances - offset)
                send_batch(count, node_port, work, images, sent)
                sent += count
            wait_drained(sessions, sent, 3600)
            elapsed = time.monotonic() - started
            after = rss_by_role(run.pid)
            print(
                f"\n{args.instances} studies received, classified and delivered in {elapsed:.0f} s "
                f"({args.instances / elapsed:.1f}/s); load {load_average()}"
            )
            print_table(
                ["when", *ROLES],
                [
                    ["after warm-up", *fmt(start)],
                    [f"after {args.instances} more", *fmt(after)],
                    ["growth", *[f"{after[r] - start[r]:+.0f}" for r in ROLES]],
                ],
            )
            return
        per_batch = max(1, round(args.rate * args.batch_seconds))
        print(
            f"soak: {per_batch} studies every {args.batch_seconds:.0f} s "
            f"({per_batch / args.batch_seconds:.2f}/s) "
            f"for {args.soak_minutes:g} min, RSS every minute",
            flush=True,
        )
        headers = ["minute", *ROLES, "sent", "terminal", "SRs delivered", "load 1/5/15"]
        print("| " + " | ".join(headers) + " |", flush=True)
        series: list[tuple[float, dict[str, float]]] = []
        began = time.monotonic()
        next_sample = began + 60
        tick = 0
        while time.monotonic() - began < args.soak_minutes * 60:
            send_batch(per_batch, node_port, work, images, sent)
            sent += per_batch
            tick += 1
            if time.monotonic() >= next_sample:
                minute = (time.monotonic() - began) / 60
                sample = rss_by_role(run.pid)
                series.append((minute, sample))
                _, terminal, delivered = counts(sessions)
                print(
                    f"| {minute:.1f} | "
                    + " | ".join(fmt(sample))
                    + f" | {sent} | {terminal} | {delivered} | {load_average()} |",
                    flush=True,
                )
                next_sample += 60
            time.sleep(max(0.0, began + tick * args.batch_seconds - time.monotonic()))
        wait_drained(sessions, sent, 1800)
        final = rss_by_role(run.pid)
        print(f"\ndrained: {sent} studies classified and delivered; load {load_average()}")
        first = series[0][1] if series else start
        minutes = [m for m, _ in series]
        rows = [
            ["first sample", *fmt(first)],
            ["last sample", *fmt(series[-1][1] if series else final)],
            ["after draining", *fmt(final)],
            [
                "growth, last - first",
                *[f"{(series[-1][1] if series else final)[r] - first[r]:+.1f}" for r in ROLES],
            ],
            [
                "slope, MiB/hour",
                *[f"{slope_per_hour(minutes, [s[r] for _, s in series]):+.1f}" for r in ROLES],
            ],
        ]
        print_table(["RSS MiB", *ROLES], rows)
    finally:
        stop(run, 2)
        stop(pacs)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
