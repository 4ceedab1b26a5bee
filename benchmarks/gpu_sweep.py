"""Train the candidate versions of session 5's plan at once, on one GPU host with JAX.

The lent GPU host has JAX but no TensorFlow and none of the service stack (SQLAlchemy,
pynetdicom, Celery) that the `pneumo` CLI imports, so this calls `training.train.train` with the
same TrainConfig the CLI builds. Each run is its own process with its own registry folder and
log, so a failure or a timeout costs that run alone; each finished run is packed into
OUT/<run>.tar (registry folder and log) at once, and whatever is unfinished at the deadline is
stopped and its log kept in OUT/unfinished.log. The test split is not read here.

    KERAS_BACKEND=jax PNEUMO_CODE_COMMIT=<sha> python benchmarks/gpu_sweep.py DATA WEIGHTS OUT

Measured on an H100 (2026-11-26, session 5): it did not finish. With five processes at once a
CNN step took 0.5 s and a transfer phase-2 step 0.7-0.75 s, about twice this 2-core CPU, and
no run reached its end inside the deadline. Why was not found (no device time was left); try one
process and a larger batch first.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

TRANSFER = {"model_name": "pneumonia-transfer", "fine_tune_epochs": 8,
            "early_stopping_monitor": "val_loss"}
CNN = {"model_name": "pneumonia-cnn", "epochs": 20, "early_stopping_monitor": "val_auc"}
RUNS = {
    # controls: today's recipes, to tell the GPU/JAX platform from the augmentation
    "T0": TRANSFER,
    "C0": CNN,
    # candidates, in the plan's order of preference
    "T1": {**TRANSFER, "augmentation": "robust"},
    "T2": {**TRANSFER, "augmentation": "robust", "fine_tune_layers": 80},
    "C1": {**CNN, "augmentation": "robust"},
}
DEADLINE_SECONDS = 470
SMOKE = os.environ.get("SWEEP_SMOKE") == "1"  # one epoch on 32 images: checks the plumbing


def run_one(name: str, data_root: Path, weights: str, work: Path) -> None:
    from training.train import TrainConfig, train

    smoke = {"epochs": 1, "fine_tune_epochs": 1, "max_train_images": 32} if SMOKE else {}
    config = TrainConfig(
        backbone_weights=weights, notes={"sweep_run": name}, **{**RUNS[name], **smoke}
    )
    version = train(config, data_root, work / name / "models", report_test=False, verbose=2)
    print(f"registered {version.label}", flush=True)


def main(data_root: Path, weights: str, out: Path) -> None:
    work = Path("/tmp/sweep")
    started = time.monotonic()
    processes = {}
    for name in RUNS:
        (work / name).mkdir(parents=True, exist_ok=True)
        log = (work / name / "train.log").open("w")
        processes[name] = subprocess.Popen(
            [sys.executable, __file__, "--one", name, str(data_root), weights, str(work)],
            stdout=log, stderr=subprocess.STDOUT,
        )
    while processes and time.monotonic() - started < DEADLINE_SECONDS:
        for name, process in list(processes.items()):
            if process.poll() is not None:
                with tarfile.open(out / f"{name}.tar", "w") as tar:
                    tar.add(work / name, arcname=name)
                print(f"{name}: exit {process.returncode} after {time.monotonic() - started:.0f} s",
                      flush=True)
                del processes[name]
        time.sleep(2)
    with (out / "unfinished.log").open("w") as unfinished:
        for name, process in processes.items():
            process.kill()
            unfinished.write(f"=== {name} stopped at the deadline\n")
            unfinished.write((work / name / "train.log").read_text()[-20000:])


if __name__ == "__main__":
    if sys.argv[1] == "--one":
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        run_one(sys.argv[2], Path(sys.argv[3]), sys.argv[4], Path(sys.argv[5]))
    else:
        main(Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
