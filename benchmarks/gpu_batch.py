"""The worker's path on a GPU by batch size: dcmread + decode + preprocess on the CPU (as
`worker.classify` does it), predict on the GPU through `Classifier.predict_batch` (Keras on JAX).

The worker classifies one image per task today; this measures what batching the GPU queue would
give and where the bottleneck moves (CPU decode). No database on the GPU host: the Result-row
write measured on CPU by benchmarks/inference.py comes on top. Two steps:

    # here (TensorFlow CPU): the DICOM inputs and the worker path's CPU probabilities
    .venv/bin/python benchmarks/gpu_batch.py --prepare .device/gpu_batch --images 256
    # on the GPU host, without TensorFlow
    KERAS_BACKEND=jax PYTHONPATH=. python3 benchmarks/gpu_batch.py --inputs .device/gpu_batch

Prints Markdown tables; with $OUT set, also writes $OUT/gpu_batch.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def load_tensor(path: Path) -> np.ndarray:
    """Exactly the worker's CPU steps for one stored file."""
    from pydicom import dcmread

    from serving.decode import grayscale_pixels
    from serving.image import preprocess

    return preprocess(grayscale_pixels(dcmread(path)))


def prepare(folder: Path, count: int, model_name: str) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import training_images, write_payload

    from core.registry import DEFAULT_MODELS_DIR
    from worker.inference import served_classifier

    files = write_payload("dx224", count, folder / "dicom", training_images(count))  # train/, never test/
    model = served_classifier(model_name, DEFAULT_MODELS_DIR)
    reference = [model.predict(load_tensor(path)).probability for path in files]
    (folder / "reference.json").write_text(
        json.dumps(
            {
                "model": model.version.label,
                "files": [p.name for p in files],
                "probabilities": reference,
            }
        )
    )
    print(f"wrote {len(files)} files and {model.version.label}'s CPU probabilities to {folder}")


def rate(step: Callable[[], int], seconds: float) -> float:
    """Images per second of `step` (which returns how many images it handled), run for `seconds`."""
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        done += step()
    return done / (time.perf_counter() - started)


def chunks(files: list[Path], size: int):
    """Endless batches of exactly `size` files (cycling), so no odd shape triggers a compile."""
    index = 0
    while True:
        yield [files[(index + i) % len(files)] for i in range(size)]
        index += size


@contextlib.contextmanager
def precision(name: str | None):
    """JAX's default matmul (and convolution) precision for the calls inside; None: leave it."""
    if name is None:
        yield
        return
    import jax

    if hasattr(jax, "default_matmul_precision"):
        with jax.default_matmul_precision(name):
            yield
        return
    jax.config.update("jax_default_matmul_precision", name)
    try:
        yield
    finally:
        jax.config.update("jax_default_matmul_precision", None)


def measure(inputs: Path, batches: list[int], seconds: float, workers: int, model_name: str) -> dict:
    import keras

    from core.registry import DEFAULT_MODELS_DIR
    from worker.inference import served_classifier

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        devices = [str(d) for d in jax.devices()]
    else:
        devices = ["cpu (" + backend + ")"]
    reference = json.loads((inputs / "reference.json").read_text())
    files = [inputs / "dicom" / name for name in reference["files"]]
    expected = np.array(reference["probabilities"])
    model = served_classifier(model_name, DEFAULT_MODELS_DIR)
    print(
        f"{model.version.label} on keras {keras.__version__} / {backend}, devices {devices}; "
        f"{len(files)} files; {os.cpu_count()} CPUs",
        flush=True,
    )
    report: dict = {"model": model.version.label, "backend": backend, "devices": devices, "files": len(files)}

    tensors = np.stack([load_tensor(path) for path in files])
    parity = {}
    for label, mode in (("default", None), ("highest", "highest")):
        if mode is not None and backend != "jax":
            continue
        try:
            with precision(mode):
                got = np.concatenate(
                    [
                        [p.probability for p in model.predict_batch(tensors[i : i + 32])]
                        for i in range(0, len(tensors), 32)
                    ]
                )
        except Exception as error:  # keep the rest of the run
            print(f"parity at {label} precision failed: {type(error).__name__}: {error}", flush=True)
            continue
        parity[label] = float(np.max(np.abs(got - expected)))
    report["parity_max_abs_vs_tf_cpu_worker"] = parity
    print(
        "max |p_here - p_tf_cpu_worker| by matmul precision: "
        + ", ".join(f"{k} {v:.2e}" for k, v in parity.items()),
        flush=True,
    )

    cpu_serial = rate(lambda: len([load_tensor(p) for p in files[:32]]), seconds)
    report["cpu_decode_preprocess_images_per_s"] = {"1 thread": cpu_serial}
    # Spawned processes (never forked from a process that holds a GPU runtime), started up front.
    processes = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    pools = {f"{workers} threads": ThreadPoolExecutor(workers), f"{workers} processes": processes}
    list(processes.map(load_tensor, files[: workers * 2]))
    for name, pool in pools.items():
        speed = rate(lambda pool=pool: len(list(pool.map(load_tensor, files[:64]))), seconds)
        report["cpu_decode_preprocess_images_per_s"][name] = speed
    print(
        "CPU decode+preprocess, images/s: "
        + ", ".join(f"{k} {v:.0f}" for k, v in report["cpu_decode_preprocess_images_per_s"].items()),
        flush=True,
    )

    rows = []
    for batch in batches:
        block = np.resize(tensors, (batch, *tensors.shape[1:])).astype(np.float32)
        for _ in range(2):  # compile for this shape, then once more
            model.predict_batch(block)
        row: dict = {
            "batch": batch,
            "predict only": rate(lambda block=block: len(model.predict_batch(block)), seconds),
        }
        row["predict only, precision highest"] = None
        if backend == "jax":
            try:
                with precision("highest"):
                    model.predict_batch(block)
                    model.predict_batch(block)
                    row["predict only, precision highest"] = rate(
                        lambda block=block: len(model.predict_batch(block)), seconds
                    )
            except Exception as error:  # keep the rest of the run
                print(f"  highest precision failed: {type(error).__name__}: {error}", flush=True)

        serial_batches = chunks(files, batch)

        def serial(serial_batches=serial_batches) -> int:
            return len(model.predict_batch(np.stack([load_tensor(p) for p in next(serial_batches)])))

        row["worker path, decode on 1 thread"] = rate(serial, seconds)
        for name, pool in pools.items():
            batches_of_files = chunks(files, batch)
            pending = [[pool.submit(load_tensor, p) for p in next(batches_of_files)]]

            def pipelined(batches_of_files=batches_of_files, pending=pending, pool=pool) -> int:
                """Decode the next batch on the pool while the GPU predicts this one."""
                current = np.stack([future.result() for future in pending.pop()])
                pending.append([pool.submit(load_tensor, p) for p in next(batches_of_files)])
                return len(model.predict_batch(current))

            row[f"worker path, decode on {name} overlapping predict"] = rate(pipelined, seconds)
            [future.result() for future in pending.pop()]
        rows.append(row)
        print(f"  {json.dumps({k: round(v, 1) if v else v for k, v in row.items()})}", flush=True)
    for pool in pools.values():
        pool.shutdown()
    report["by_batch"] = rows
    print("\nimages/s")
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---:|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join("-" if v is None else f"{v:,.0f}" for v in row.values()) + " |")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prepare", type=Path, help="write inputs here (run where TensorFlow is)")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--inputs", type=Path, help="measure with inputs written by --prepare")
    parser.add_argument("--batches", default="1,8,32,128")
    parser.add_argument("--seconds", type=float, default=3.0, help="per measurement")
    parser.add_argument(
        "--workers", type=int, default=8, help="decode threads / processes of the pooled variants"
    )
    parser.add_argument("--model", default="pneumonia-transfer")
    args = parser.parse_args()
    if args.prepare:
        prepare(args.prepare, args.images, args.model)
        return
    if not args.inputs:
        parser.error("--prepare or --inputs is required")
    report = measure(
        args.inputs, [int(b) for b in args.batches.split(",")], args.seconds, args.workers, args.model
    )
    if os.environ.get("OUT"):
        (Path(os.environ["OUT"]) / "gpu_batch.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
