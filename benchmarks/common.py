"""Helpers the benchmark scripts share: payload files, peers, databases, tables.

Benchmarks run on shared machines, so every table carries the load averages it was measured under.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import subprocess
import sys
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PNEUMO_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data" / "chest_xray"
REAL_CR = SHARED / "dicom" / "real" / "fuji_cr_chest_mono1_explicit.dcm"  # 440x440, 16-bit, 388 KB
POSTGRES_ADMIN_URL = os.environ.get(
    "PNEUMO_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("PNEUMO_TEST_REDIS", "redis://127.0.0.1:6379")
# A database number nothing else on the machine uses (PNEUMO_BENCH_REDIS_DB picks another: two
# benchmarks at once, or tests beside them); flushed by the benchmarks.
BENCH_REDIS_DB = int(os.environ.get("PNEUMO_BENCH_REDIS_DB", "13"))

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from devtools.processes import dcmtk, echo, free_port, wait_for  # noqa: E402 (for the benchmarks)


def load_average() -> str:
    """The 1/5/15-minute load averages, as `uptime` prints them."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def training_images(count: int, split: str = "train") -> list[Path]:
    """`count` images spread over both classes of a split (never test/ for speed work)."""
    normal = sorted((DATA / split / "NORMAL").iterdir())
    pneumonia = sorted((DATA / split / "PNEUMONIA").iterdir())
    half = count // 2
    picked = normal[:: max(1, len(normal) // max(1, half))][:half]
    picked += pneumonia[:: max(1, len(pneumonia) // max(1, count - half))][: count - half]
    return picked


def write_payload(kind: str, count: int, folder: Path, images: Sequence[Path] | None = None) -> list[Path]:
    """`count` DICOM files with fresh UIDs: `dx224` wraps the data set's 224x224 JPEGs as DX (50 KB),
    `cr440` copies a real 440x440 16-bit CR (388 KB). Each file is its own study."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from ops.send import wrap_image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    if kind == "dx224":
        sources = list(images or training_images(min(count, 400)))
        for index in range(count):
            dataset = wrap_image(sources[index % len(sources)])
            path = folder / f"{index:05d}.dcm"
            dataset.save_as(path, enforce_file_format=True)
            paths.append(path)
    elif kind == "cr440":
        template = dcmread(REAL_CR)
        for index in range(count):
            template.StudyInstanceUID = generate_uid()
            template.SeriesInstanceUID = generate_uid()
            template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = folder / f"{index:05d}.dcm"
            template.save_as(path, enforce_file_format=True)
            paths.append(path)
    else:
        raise ValueError(f"unknown payload {kind!r} (dx224 or cr440)")
    return paths


def embedded_env(home: Path, node_port: int, pacs_port: int, quiet_s: float) -> dict[str, str]:
    """`pneumo run` on embedded defaults, a storescp PACS, a free dashboard port."""
    return {
        **os.environ,
        "PNEUMO_HOME": str(home),
        "PNEUMO_HOST": "127.0.0.1",
        "PNEUMO_PORT": str(node_port),
        "PNEUMO_PACS": f"PACS@127.0.0.1:{pacs_port}",
        "PNEUMO_QUIET_SECONDS": str(quiet_s),
        "PNEUMO_ALLOWED_PEERS": "STORESCU",
        "PNEUMO_DASHBOARD_PORT": str(free_port()),
        "TF_CPP_MIN_LOG_LEVEL": "2",
    }


def dcmtk_env(nodelay: bool) -> dict[str, str]:
    """dcmtk 3.6.7 leaves Nagle's algorithm on unless TCP_NODELAY=1 is in its environment; with it
    on, every small PDU waits for the peer's delayed ACK (about 40 ms on loopback)."""
    env = {k: v for k, v in os.environ.items() if k != "TCP_NODELAY"}
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return env


def start_storescp(
    folder: Path, port: int, fork: bool = False, ae_title: str = "PACS", nodelay: bool = False
) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    command = [dcmtk("storescp"), "-aet", ae_title, "-od", str(folder), "+xa"]
    if fork:
        command.append("--fork")
    process = subprocess.Popen(
        [*command, str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env(nodelay)
    )
    wait_for(lambda: echo(port, ae_title), 20, "storescp to answer C-ECHO", 0.1)
    return process


def storescu(
    port: int, files: Sequence[Path], called: str = "PNEUMO", nodelay: bool = False
) -> subprocess.Popen:
    command = [dcmtk("storescu"), "-aet", "STORESCU", "-aec", called, "127.0.0.1", str(port),
               *map(str, files)]
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dcmtk_env(nodelay)
    )


def stop(process: subprocess.Popen | None, signal_number: int = 15, timeout_s: float = 60) -> None:
    """Stop one process we started (by its own id), killing it if it does not exit in time."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(signal_number)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for one benchmark run, dropped afterwards
    (never the shared `test` database other runs use)."""
    from sqlalchemy import create_engine, text

    from core.migrate import upgrade

    name = f"pneumo_bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f'CREATE DATABASE "{name}"'))
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    try:
        upgrade(url)
        yield url
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextlib.contextmanager
def database(kind: str, home: Path) -> Iterator[str]:
    """`postgresql` (fresh database on the local server) or `sqlite` (a file in `home`), migrated."""
    if kind == "postgresql":
        with postgres_database() as url:
            yield url
        return
    from core.migrate import upgrade

    home.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{home / 'pneumo.db'}"
    upgrade(url)
    yield url


def bench_redis_url() -> str:
    return f"{REDIS_URL}/{BENCH_REDIS_DB}"


def flush_bench_redis() -> None:
    import redis

    redis.Redis.from_url(bench_redis_url()).flushdb()


def codestream_claiming(name: str, marker: bytes, offset: int, fmt: str, side: int):
    """A real compressed file of ../shared/dicom/real whose codestream header claims `side` x `side`
    pixels while its DICOM header keeps its own size: a decompression bomb."""
    import struct

    from pydicom import dcmread
    from pydicom.encaps import encapsulate, generate_frames

    dataset = dcmread(SHARED / "dicom" / "real" / name)
    frame = bytearray(next(generate_frames(dataset.PixelData, number_of_frames=1)))
    struct.pack_into(fmt, frame, frame.find(marker) + offset, side, side)
    dataset.PixelData = encapsulate([bytes(frame)])
    return dataset


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    position = (len(ordered) - 1) * q / 100
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A Markdown table, ready to paste into docs/benchmarks.md."""
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|")
    for row in rows:
        print("| " + " | ".join(str(cell) for cell in row) + " |")
    sys.stdout.flush()
