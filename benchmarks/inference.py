"""Worker throughput: `classify_instance` (dcmread, filters, decode, preprocess, predict, Result row)
vs the bare model on the same images' preprocessed tensors, in one process, passes interleaved.

The instances are recorded through the node's own `store_instance` into a real database (a fresh
PostgreSQL database, or SQLite with --db sqlite); the model is the served `pneumonia-transfer`.
The default worker predicts one image per call, so the headline ratio is against the bare model
at batch 1 through the same call the worker makes (`predict_on_batch`). The batched worker (the GPU
worker's configuration: task threads sharing model calls through worker.batching) is compared with
the bare model at the same batch size. The "decode +" bare passes also read, decode and
preprocess each file (serving.decode, serving.image) before the model call, serially: the issue's
reference with decode included in both. A final pass times each step of the worker path to show
where the time goes.

    .venv/bin/python benchmarks/inference.py --images 100 --rounds 3
    .venv/bin/python benchmarks/inference.py --images 32 --payload full-j2k_lossless --batch 16
    .venv/bin/python benchmarks/inference.py --around-the-model --images 64 --rounds 5 --batch 16 --db sqlite

`full-<kind>` payloads are full-size films: Kermany full-resolution originals at a 2,500 px short
side in one encoding of devtools/corpus.py (decoded reduced where the syntax allows).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import (
    database,
    load_average,
    median,
    print_table,
    write_payload,
)

FULL_SHORT_SIDE = 2500


def full_size_payload(kind: str, count: int, folder: Path) -> list[Path]:
    """`count` full-size films in encoding `kind`, each its own study (fresh UIDs)."""
    from common import SHARED

    from devtools.corpus import variant
    from ops.send import wrap_image

    originals = sorted((SHARED / "data" / "chest_xray_fullres" / "train").glob("*/*.jpeg"))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(count):
        path = folder / f"{index:05d}.dcm"
        source = originals[(index * 97) % len(originals)]
        variant(wrap_image(source), kind, short_side=FULL_SHORT_SIDE).save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def record(files: list[Path], sessions, work: Path) -> list[int]:
    """Each file through the node's receive function, as a C-STORE would put it."""
    from pydicom import dcmread

    from dicom_node.receive import store_instance

    storage = work / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    ids = []
    for path in files:
        header = dcmread(path, stop_before_pixels=True)
        spool = work / "spool.dcm"
        shutil.copy(path, spool)
        outcome = store_instance(
            spool, str(header.SOPClassUID), str(header.SOPInstanceUID), "BENCH", storage, sessions
        )
        assert outcome.status == 0, outcome.reason
        ids.append(outcome.instance_id)
    return ids


def reset(sessions) -> None:
    """Make the recorded instances classifiable again (outside the timed passes)."""
    from sqlalchemy import delete, update

    from core.db import Instance, InstanceState, Result

    with sessions() as session, session.begin():
        session.execute(delete(Result))
        session.execute(
            update(Instance).values(state=InstanceState.QUEUED, attempts=0, finished_at=None, reason=None)
        )


def tensors_of(paths: list[str]):
    """The worker's own decode and preprocessing of the stored files: the bare model's input."""
    import numpy as np
    from pydicom import dcmread

    from serving.decode import grayscale_pixels
    from serving.image import preprocess

    return np.stack([preprocess(grayscale_pixels(dcmread(path))) for path in paths])


def timed(function: Callable[[], object], count: int) -> tuple[float, float]:
    """(images/s, the process's CPU ms per image, all threads): the CPU figure holds on a shared
    machine, where the wall-time rate moves with what else runs."""
    started, cpu = time.perf_counter(), time.process_time()
    function()
    return count / (time.perf_counter() - started), (time.process_time() - cpu) * 1000 / count


def breakdown(sessions, ids: list[int], classifier: Callable, count: int) -> list[tuple[str, str, str]]:
    """Per-image milliseconds of each step of `classify_instance`, timers wrapped around the real calls."""
    from worker import classify, filters

    totals: dict[str, float] = {}

    def wrap(name: str, function):
        def inner(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                totals[name] = totals.get(name, 0.0) + time.perf_counter() - started

        return inner

    model = classifier()
    saved = {
        (classify, "dcmread"): classify.dcmread,
        (classify, "grayscale_pixels"): classify.grayscale_pixels,
        (classify, "preprocess"): classify.preprocess,
        (filters, "ignore_reason"): filters.ignore_reason,
        (filters, "failure_reason"): filters.failure_reason,
    }
    names = {
        "dcmread": "dcmread (whole file)",
        "grayscale_pixels": "decode (pixel_array, LUTs)",
        "preprocess": "preprocess (resize, percentile stretch)",
        "ignore_reason": "filters",
        "failure_reason": "filters",
    }
    for (module, attribute), function in saved.items():
        setattr(module, attribute, wrap(names[attribute], function))
    model.predict = wrap("Classifier.predict (predict_on_batch, batch 1)", model.predict)
    lookup = wrap("served-classifier lookup (served_classifier())", classifier)
    try:
        reset(sessions)
        started = time.perf_counter()
        for instance_id in ids[:count]:
            classify.classify_instance(sessions, instance_id, lookup)
        total = time.perf_counter() - started
    finally:
        for (module, attribute), function in saved.items():
            setattr(module, attribute, function)
        del model.predict
    rows = [
        (name, f"{seconds / count * 1000:.2f}", f"{seconds / total:.0%}")
        for name, seconds in sorted(totals.items(), key=lambda item: -item[1])
    ]
    rest = total - sum(totals.values())
    rows.append(
        ("database (2 transactions) and the rest", f"{rest / count * 1000:.2f}", f"{rest / total:.0%}")
    )
    rows.append(("classify_instance, total", f"{total / count * 1000:.2f}", "100%"))
    return rows


def around_the_model(sessions, ids: list[int], batch: int, rounds: int,
                     pictures: bool) -> tuple[float, float]:
    """(median, fastest) CPU ms per image of the worker path with the model call replaced by a
    constant: what the worker adds around the model (files, filters, decode, the transactions,
    the kept picture files), at batch 1 (one thread) or `batch` (2 x batch threads, as the
    batched worker). Run from another checkout (PYTHONPATH) to compare two trees' worker code."""
    import numpy as np

    from core.registry import DEFAULT_MODELS_DIR
    from worker import classify
    from worker.inference import Classifier

    model = Classifier("pneumonia-transfer", DEFAULT_MODELS_DIR, batch, 0.01)
    width = 2 + (int(np.prod(model.map_shape)) if model.head is not None else 0)

    def constant(tensors):
        return np.full((len(tensors), width), 0.1, dtype=np.float32)

    model._run_model = constant  # type: ignore[method-assign]
    if model._batcher is not None:
        model._batcher._predict_batch = constant
    threads = ThreadPoolExecutor(2 * batch)

    def one(instance_id: int) -> str:
        return classify.classify_instance(sessions, instance_id, lambda: model, pictures)

    def run() -> None:
        list(threads.map(one, ids) if batch > 1 else map(one, ids))

    reset(sessions)
    run()  # warm-up
    cpu = []
    for _ in range(rounds):
        reset(sessions)
        cpu.append(timed(run, len(ids))[1])
    threads.shutdown()
    return median(cpu), min(cpu)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--payload", default="dx224",
                        help="dx224, cr440 or full-<kind> (a devtools.corpus kind at 2,500 px)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32, help="batch size of the batched bare pass")
    parser.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--model", default="pneumonia-transfer")
    parser.add_argument("--no-pictures", action="store_true",
                        help="the worker path as with PNEUMO_PICTURES=false (no map or grey copy kept)")
    parser.add_argument("--around-the-model", action="store_true",
                        help="only the worker path with the model replaced by a constant (CPU ms/image)")
    parser.add_argument("--call-styles", action="store_true",
                        help="also time model(x) and model.predict at batch 1 (5-9x slower)")
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf
    from sqlalchemy import select

    from core.db import Instance, session_factory
    from core.registry import DEFAULT_MODELS_DIR
    from worker import classify
    from worker.inference import Classifier, served_classifier

    work = Path(tempfile.mkdtemp(prefix="pneumo-inference-"))
    try:
        with database(args.db, work / "home") as url:
            sessions = session_factory(url)
            files = (full_size_payload(args.payload.removeprefix("full-"), args.images, work / "files")
                     if args.payload.startswith("full-")
                     else write_payload(args.payload, args.images, work / "files"))
            ids = record(files, sessions, work)
            if args.around_the_model:
                for batch in (1, args.batch):
                    middle, fastest = around_the_model(sessions, ids, batch, args.rounds,
                                                       not args.no_pictures)
                    print(f"around the model, {args.db}, batch {batch}"
                          f"{', pictures off' if args.no_pictures else ''}: CPU ms/image {middle:.2f} "
                          f"(fastest {fastest:.2f}); load {load_average()}", flush=True)
                return
            with sessions() as session:
                paths = list(
                    session.scalars(select(Instance.path).where(Instance.id.in_(ids)).order_by(Instance.id))
                )

            def classifier():
                return served_classifier(args.model, DEFAULT_MODELS_DIR)  # as worker.tasks does

            model = classifier()
            tensors = tensors_of(paths)
            count = len(ids)
            print(
                f"{model.version.label}; {count} {args.payload} instances on {args.db}; "
                f"keras {keras.__version__} on {keras.backend.backend()} (TF {tf.__version__}, "
                f"{os.cpu_count()} CPUs); load before {load_average()}",
                flush=True,
            )

            def worker_path() -> None:
                for instance_id in ids:
                    classify.classify_instance(sessions, instance_id, classifier, pictures)

            pictures = not args.no_pictures
            batching = Classifier(model.version.label, DEFAULT_MODELS_DIR, args.batch, 0.01)
            threads = ThreadPoolExecutor(2 * args.batch)  # as `pneumo worker --pool threads`

            def worker_path_batched() -> None:
                list(threads.map(
                    lambda i: classify.classify_instance(sessions, i, lambda: batching, pictures), ids
                ))

            def bare_predict_on_batch() -> None:
                for tensor in tensors:
                    model.model.predict_on_batch(tensor[np.newaxis])

            def bare_call() -> None:
                for tensor in tensors:
                    [np.asarray(output) for output in model.model(tensor[np.newaxis], training=False)]

            def bare_predict() -> None:
                for tensor in tensors:
                    model.model.predict(tensor[np.newaxis], verbose=0)

            def bare_batched() -> None:
                for start in range(0, count, args.batch):
                    model.model.predict_on_batch(tensors[start : start + args.batch])

            def decode_and_predict(batch: int) -> Callable[[], None]:
                def run() -> None:
                    for start in range(0, count, batch):
                        model.model.predict_on_batch(tensors_of(paths[start : start + batch]))

                return run

            passes = {
                "worker path (classify_instance)": worker_path,
                f"worker path, {2 * args.batch} threads, batches <= {args.batch}": worker_path_batched,
                "bare predict_on_batch, batch 1": bare_predict_on_batch,
                "bare model(x, training=False), batch 1": bare_call,
                "bare model.predict, batch 1": bare_predict,
                f"bare predict_on_batch, batch {args.batch}": bare_batched,
                "bare decode + predict_on_batch, batch 1": decode_and_predict(1),
                f"bare decode + predict_on_batch, batch {args.batch}": decode_and_predict(args.batch),
            }
            if not args.call_styles:  # slow calls the worker never makes (measured 2026-11-26)
                del passes["bare model(x, training=False), batch 1"], passes["bare model.predict, batch 1"]
            # Warm-up: every traced function once, every cache filled.
            reset(sessions)
            classify.classify_instance(sessions, ids[0], classifier)
            reset(sessions)
            worker_path_batched()
            for name, function in passes.items():
                if name.startswith("bare"):
                    function()
            rates: dict[str, list[float]] = {name: [] for name in passes}
            cpu: dict[str, list[float]] = {name: [] for name in passes}
            loads = []
            for round_index in range(args.rounds):
                loads.append(load_average())
                order = list(passes) if round_index % 2 == 0 else list(passes)[::-1]
                for name in order:
                    if name.startswith("worker"):
                        reset(sessions)
                    rate, cpu_ms = timed(passes[name], count)
                    rates[name].append(rate)
                    cpu[name].append(cpu_ms)
                print(
                    f"  round {round_index + 1}: "
                    + ", ".join(f"{name.split(',')[0]} {rates[name][-1]:.1f}" for name in passes)
                    + f" (load {loads[-1]})",
                    flush=True,
                )
            reference = "bare predict_on_batch, batch 1"
            worker = "worker path (classify_instance)"
            batched = f"worker path, {2 * args.batch} threads, batches <= {args.batch}"
            bare_batch = f"bare predict_on_batch, batch {args.batch}"
            with_decode = f"bare decode + predict_on_batch, batch {args.batch}"
            single_decode = "bare decode + predict_on_batch, batch 1"
            print()
            rows = []
            for name in passes:
                ratios = [w / b for w, b in zip(rates[worker], rates[name], strict=True)]
                rows.append(
                    (
                        name,
                        f"{median(rates[name]):.1f}",
                        f"{1000 / median(rates[name]):.1f}",
                        " / ".join(f"{r:.1f}" for r in rates[name]),
                        f"{median(ratios):.2f}",
                        f"{median(cpu[name]):.1f}",
                    )
                )
            print_table(["pass", "images/s (median)", "ms/image", "per round", "worker path / this",
                         "CPU ms/image"], rows)
            print(
                f"headline ratio: worker path / {reference} = "
                f"{median([w / b for w, b in zip(rates[worker], rates[reference], strict=True)]):.2f}; "
                f"batched worker path / bare batch {args.batch} = "
                f"{median([w / b for w, b in zip(rates[batched], rates[bare_batch], strict=True)]):.2f}; "
                f"decode included in both: worker path / bare decode + batch 1 = "
                f"{median([w / b for w, b in zip(rates[worker], rates[single_decode], strict=True)]):.2f}, "
                f"batched worker path / {with_decode} = "
                f"{median([w / b for w, b in zip(rates[batched], rates[with_decode], strict=True)]):.2f}; "
                f"loads before rounds: {'; '.join(loads)}; after {load_average()}"
            )
            print(
                "by CPU time per image (bare / worker, so < 1 means the worker spends more): "
                f"batch 1 "
                f"{median([b / w for w, b in zip(cpu[worker], cpu[single_decode], strict=True)]):.2f}, "
                f"batch {args.batch} "
                f"{median([b / w for w, b in zip(cpu[batched], cpu[with_decode], strict=True)]):.2f} "
                "(decode included in both)"
            )
            sizes = list(batching._batcher.batch_sizes) if batching._batcher else []
            if sizes:
                print(f"batched worker's model calls: {len(sizes)}, images per call median "
                      f"{median(sizes):.0f}, mean {sum(sizes) / len(sizes):.1f}")
            print()
            print_table(
                ["step of classify_instance", "ms/image", "share"],
                breakdown(sessions, ids, classifier, count),
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
