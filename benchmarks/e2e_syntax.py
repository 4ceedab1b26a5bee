"""End to end per transfer syntax: N single-image full-size studies through `pneumo run`, each
number a ratio to its reference measured in the same run (issue 21 item 4).

Per encoding of devtools/corpus.py: a small pool of distinct full-resolution originals
(chest_xray_fullres/train) upscaled to a short side of 2,000-3,000 px and encoded once, then N files
written from it, each with fresh Study/Series/SOP UIDs (its own study). `pneumo run` on embedded
defaults (SQLite, bundled Redis, one inference process) with dcmtk storescp --fork as the PACS,
TCP_NODELAY for both dcmtk tools. After a warm-up study (model load) and a few idle single studies
(the latency reference), all N files go in one storescu association at full speed (a burst: the
latency then includes queueing behind the earlier studies).

- studies/s: N / (first "Sending file" of storescu -> last SR stored at the PACS); reference: the
  bare classify of the same files (read, decode reduced where the syntax allows, preprocess,
  `predict_on_batch` of the served model, serially, batch 1) in a fresh process, images/s, run
  before and after the burst (the mean is the reference; both are printed).
- latency per study: its file's "Sending file" line in storescu -v (timestamped as read) -> its SR's
  mtime at the PACS; p50/p95 against the median idle single-study latency (same quantity, one study
  in the system, quiet period included).
- worker RSS: peak over the burst of the inference worker's pool child (which holds the model),
  sampled every 0.5 s; reference: the bare process's peak RSS (ru_maxrss).

    .venv/bin/python benchmarks/e2e_syntax.py --kinds j2k_lossless --studies 1000
    nohup .venv/bin/python benchmarks/e2e_syntax.py --studies 200 > /tmp/e2e.txt 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import (
    SHARED,
    dcmtk,
    dcmtk_env,
    embedded_env,
    free_port,
    load_average,
    percentile,
    print_table,
    start_storescp,
    stop,
    wait_for,
)

# storescu proposes uncompressed syntaxes only unless told: the option that proposes each encoding's.
PROPOSE = {"jpeg_baseline": "-xy", "j2k_lossless": "-xv", "j2k_lossy": "-xw", "jpegls": "-xt", "rle": "-xr"}
DEFAULT_KINDS = ("jpeg_baseline", "j2k_lossless", "j2k_lossy", "jpegls", "dx8", "dx12_mono1", "dx16_window")


def short_side(index: int) -> int:
    """2,000-3,000 px, varied per pool film as benchmarks/fullsize_decode.py varies them."""
    return 2000 + (index * 389) % 1001


def pool(kind: str, size: int) -> list:
    """`size` distinct full-resolution originals in encoding `kind`, encoded once."""
    from devtools.corpus import variant
    from ops.send import wrap_image

    originals = sorted((SHARED / "data" / "chest_xray_fullres" / "train").glob("*/*.jpeg"))
    return [variant(wrap_image(originals[(i * 97) % len(originals)]), kind, short_side=short_side(i))
            for i in range(size)]


def write_studies(films: list, count: int, folder: Path) -> list[tuple[Path, str]]:
    """`count` files cycling over `films`, each its own study: (path, StudyInstanceUID)."""
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(count):
        dataset = films[index % len(films)]
        dataset.StudyInstanceUID = generate_uid()
        dataset.SeriesInstanceUID = generate_uid()
        dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = folder / f"{index:05d}.dcm"
        dataset.save_as(path, enforce_file_format=True)
        written.append((path, str(dataset.StudyInstanceUID)))
    return written


def bare_classify(paths: list[str]) -> dict[str, float]:
    """The reference, run in its own process: read + decode + preprocess + predict_on_batch,
    serially, after one warm-up file; images/s and the process's peak RSS."""
    import numpy as np
    from pydicom import dcmread

    from core.registry import DEFAULT_MODELS_DIR
    from serving.decode import grayscale_pixels
    from serving.image import preprocess
    from worker.inference import served_classifier

    model = served_classifier(os.environ.get("PNEUMO_MODEL_NAME", "pneumonia-transfer"), DEFAULT_MODELS_DIR)

    def one(path: str) -> None:
        tensor = preprocess(grayscale_pixels(dcmread(path)), model.resize)
        model.model.predict_on_batch(tensor[np.newaxis])

    one(paths[0])
    started = time.perf_counter()
    for path in paths:
        one(path)
    seconds = time.perf_counter() - started
    return {"images_per_s": len(paths) / seconds,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def bare_in_process(paths: list[Path]) -> dict[str, float]:
    output = subprocess.run(
        [sys.executable, __file__, "--bare", *map(str, paths)], check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


@dataclass
class Sender:
    """storescu -v over all files in one association; the time each 'Sending file' line was read."""

    port: int
    files: list[Path]
    kind: str
    sent_at: dict[str, float] = field(default_factory=dict)

    def run(self) -> None:
        propose = [PROPOSE[self.kind]] if self.kind in PROPOSE else []
        command = [dcmtk("storescu"), "-v", *propose, "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1",
                   str(self.port), *map(str, self.files)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   env=dcmtk_env(True), text=True, bufsize=1)
        tail = []
        for line in process.stdout:
            if "Sending file:" in line:
                self.sent_at[line.split("Sending file:", 1)[1].strip()] = time.time()
            tail = [*tail[-20:], line]
        if process.wait() != 0:
            raise RuntimeError("storescu failed: " + "".join(tail)[-800:])


class PeakRss:
    """Samples the inference worker's RSS over the supervisor's tree every 0.5 s in a thread."""

    def __init__(self, supervisor_pid: int) -> None:
        self.pid, self.peak = supervisor_pid, {"inference child": 0.0, "inference worker": 0.0, "all": 0.0}
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.loop, daemon=True)

    def loop(self) -> None:
        from memory import rss_by_role

        while not self.done.is_set():
            sample = rss_by_role(self.pid)
            sample["all"] = sum(sample.values())
            for key in self.peak:
                self.peak[key] = max(self.peak[key], sample[key])
            self.done.wait(0.5)

    def __enter__(self) -> PeakRss:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.done.set()
        self.thread.join()


def sr_times(sessions, pacs: Path) -> dict[str, float]:
    """StudyInstanceUID -> mtime of its SR at the PACS, for every delivered study."""
    from sqlalchemy import select

    from core.db import Delivery, DeliveryState, Study

    with sessions() as session:
        pairs = session.execute(
            select(Study.study_instance_uid, Delivery.sr_sop_instance_uid)
            .join(Delivery, Delivery.study_id == Study.id)
            .where(Delivery.state == DeliveryState.DELIVERED)
        ).all()
    mtimes = {path.name.split(".", 1)[1]: path.stat().st_mtime for path in pacs.glob("SR*")}
    return {study: mtimes[sr] for study, sr in pairs if sr in mtimes}


def idle_study(kind: str, path: Path, study_uid: str, port: int, sessions, pacs: Path) -> float:
    """One study alone in the system: seconds from its send to its SR at the PACS."""
    sender = Sender(port, [path], kind)
    sender.run()
    sr_at = wait_for(lambda: sr_times(sessions, pacs).get(study_uid), 300, "the idle study's SR", 0.1)
    return sr_at - sender.sent_at[str(path)]


def end_to_end(kind: str, studies: list[tuple[Path, str]], idle: list[tuple[Path, str]], args) -> dict:
    """One `pneumo run` for one encoding: warm-up, idle studies, the burst; its numbers."""
    from latency import epoch, start_pneumo_run
    from sqlalchemy import func, select

    from core.db import Instance, session_factory

    work = Path(tempfile.mkdtemp(prefix=f"pneumo-e2e-{kind}-", dir=args.tmp))
    pacs_folder = work / "pacs"
    pacs = run = None
    try:
        pacs_port, node_port = free_port(), free_port()
        pacs = start_storescp(pacs_folder, pacs_port, fork=True, ae_title="PACS", nodelay=True)
        env = embedded_env(work / "home", node_port, pacs_port, args.quiet)
        env["TCP_NODELAY"] = "1"
        run = start_pneumo_run(env, work / "pneumo-run.log")
        sessions = session_factory(f"sqlite:///{work / 'home' / 'pneumo.db'}")
        idle_study(kind, *idle[0], node_port, sessions, pacs_folder)  # warm-up: model load
        jitter = random.Random(0)
        idle_s = []
        for path, uid in idle[1:]:
            time.sleep(1 + jitter.random())  # no lock-step with the finalise tick
            idle_s.append(idle_study(kind, path, uid, node_port, sessions, pacs_folder))
        time.sleep(2)
        load_before = load_average()
        sender = Sender(node_port, [path for path, _ in studies], kind)
        expected = len(idle) + len(studies)
        with PeakRss(run.pid) as rss:
            thread = threading.Thread(target=sender.run, daemon=True)
            thread.start()
            started, progress = time.time(), time.monotonic()
            while len(list(pacs_folder.glob("SR*"))) < expected:
                if time.time() - started > args.timeout:
                    raise TimeoutError(f"{kind}: {len(list(pacs_folder.glob('SR*')))} of {expected} SRs "
                                       f"after {args.timeout} s")
                if time.monotonic() - progress > 30:
                    progress = time.monotonic()
                    print(f"  {kind}: {len(sender.sent_at)} sent, {len(list(pacs_folder.glob('SR*')))} SRs "
                          f"after {time.time() - started:.0f} s (load {load_average()})", flush=True)
                time.sleep(0.5)
            thread.join()
            time.sleep(1)
        srs = sr_times(sessions, pacs_folder)
        with sessions() as session:
            last_classified = epoch(session.scalar(select(func.max(Instance.finished_at))))
        latencies = [srs[uid] - sender.sent_at[str(path)] for path, uid in studies]
        first_sent = min(sender.sent_at.values())
        last_sr = max(srs[uid] for _, uid in studies)
        return {
            "studies_per_s": len(studies) / (last_sr - first_sent),
            "send_s": max(sender.sent_at.values()) - first_sent,
            "wall_s": last_sr - first_sent,
            "classified_s": last_classified - first_sent,
            "p50": percentile(latencies, 50),
            "p95": percentile(latencies, 95),
            "idle": percentile(idle_s, 50),
            "rss": dict(rss.peak),
            "load": f"{load_before} / {load_average()}",
        }
    finally:
        stop(run, 2)
        stop(pacs)
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--kinds", nargs="+", default=list(DEFAULT_KINDS))
    parser.add_argument("--studies", type=int, default=1000, help="studies in the burst, per encoding")
    parser.add_argument("--pool", type=int, default=8, help="distinct films the studies cycle over")
    parser.add_argument("--idle-studies", type=int, default=3, help="idle single studies (latency reference)")
    parser.add_argument("--bare-images", type=int, default=24, help="files in each bare classify pass")
    parser.add_argument("--quiet", type=float, default=5.0, help="PNEUMO_QUIET_SECONDS")
    parser.add_argument("--timeout", type=float, default=5400, help="give up on one burst after this")
    parser.add_argument("--tmp", default=None, help="folder for the files (deleted after each encoding)")
    parser.add_argument("--bare", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.bare:
        print(json.dumps(bare_classify(args.bare)))
        return

    rows = []
    for kind in args.kinds:
        folder = Path(tempfile.mkdtemp(prefix=f"pneumo-e2e-files-{kind}-", dir=args.tmp))
        try:
            started = time.monotonic()
            films = pool(kind, args.pool)
            studies = write_studies(films, args.studies + args.idle_studies + 1, folder)
            idle, burst = studies[: args.idle_studies + 1], studies[args.idle_studies + 1 :]
            megabytes = sum(path.stat().st_size for path, _ in burst) / len(burst) / 1e6
            name = films[0].file_meta.TransferSyntaxUID.name
            print(f"{kind}: {len(studies)} files, {megabytes:.1f} MB each, written in "
                  f"{time.monotonic() - started:.0f} s (load {load_average()})", flush=True)
            sample = [path for path, _ in burst[: args.bare_images]]
            before = bare_in_process(sample)
            measured = end_to_end(kind, burst, idle, args)
            after = bare_in_process(sample)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        bare = (before["images_per_s"] + after["images_per_s"]) / 2
        bare_rss = max(before["peak_rss_mib"], after["peak_rss_mib"])
        child = measured["rss"]["inference child"]
        row = [
            kind, name, len(burst), f"{megabytes:.1f}", f"{measured['send_s']:.0f}",
            f"{measured['classified_s']:.0f}", f"{measured['wall_s']:.0f}",
            f"{measured['studies_per_s']:.2f}",
            f"{bare:.2f} ({before['images_per_s']:.2f}/{after['images_per_s']:.2f})",
            f"**{measured['studies_per_s'] / bare:.2f}**",
            f"{measured['idle']:.1f}", f"{measured['p50']:.1f}", f"{measured['p95']:.1f}",
            f"**{measured['p50'] / measured['idle']:.1f}** / **{measured['p95'] / measured['idle']:.1f}**",
            f"{child:.0f}", f"{bare_rss:.0f}", f"**{child / bare_rss:.2f}**", measured["load"],
        ]
        rows.append(row)
        print("| " + " | ".join(map(str, row)) + " |", flush=True)
    print(f"\n`pneumo run` embedded defaults, quiet {args.quiet} s, storescp --fork, TCP_NODELAY; "
          f"pool of {args.pool} films; load now {load_average()}")
    print_table(
        ["encoding", "transfer syntax", "studies", "MB/file", "sent in s", "first send -> last classified, s",
         "first send -> last SR, s",
         "studies/s", "bare classify images/s (before/after)", "e2e / bare", "idle latency s",
         "burst p50 s", "burst p95 s", "p50 / p95 vs idle", "worker child peak RSS MiB",
         "bare peak RSS MiB", "RSS ratio", "load before / after"],
        rows,
    )


if __name__ == "__main__":
    main()
