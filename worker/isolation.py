"""Decode a suspect image in a child process, so what kills a decoder kills only that child.

Why: an image whose earlier attempt never finished may be the one that took its worker down (a
native decoder crashing on corrupt data, decoding exhausting memory). In a worker on Celery's
thread pool that death also redelivers every other image in flight, and an image failed after
`MAX_WORKER_DEATHS` attempts could be an innocent bystander. Decoded here instead, a crash ends
one child and is recorded as that image's failure, with the signal, on its second attempt; the
worker and the other images go on. The child is a fresh interpreter (no forked model, threads or
locks; ~0.7 s to start) confined to `MEMORY_LIMIT_MB` of address space, volunteers for the kernel's
OOM killer, and runs under a time limit.

    python -m worker.isolation <dicom file> <output .npy>    # exit 0, or 3 with the reason on stdout
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from core import contract
from core.queue import DECODE_TIMEOUT_S
from serving.decode import DecodeError

# The largest image the filters admit (8192x8192, 16-bit, JPEG 2000 or uncompressed) peaks at
# ~1.0 GB of address space decoded and preprocessed (docs/benchmarks.md): twice that is the limit.
MEMORY_LIMIT_MB = 2048
DECODE_FAILED = 3  # the child's exit status for an image that cannot be decoded (reason on stdout)
# Children decoding at once: a crashed threaded worker redelivers every image it had in flight,
# and each of them is then a suspect; one child per core keeps that burst within memory.
_slots = threading.BoundedSemaphore(len(os.sched_getaffinity(0)))


def decode_in_child(
    path: Path, resize: str = contract.RESIZE, timeout_s: float = DECODE_TIMEOUT_S
) -> np.ndarray:
    """`preprocess(grayscale_pixels(dcmread(path)), resize)`, computed in a child process.

    Raises DecodeError with the reason to record: the decoder's own message, the signal that
    ended the child, or the time limit.
    """
    with _slots, tempfile.TemporaryDirectory(prefix="pneumo-decode-") as folder:
        output = Path(folder) / "tensor.npy"
        command = [sys.executable, "-m", "worker.isolation", str(path), str(output), resize]
        try:
            child = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as error:  # subprocess.run has killed the child
            raise DecodeError(f"decoding did not finish within {timeout_s:g} s "
                              "(decoded apart, as an earlier attempt never finished)") from error
        if child.returncode == 0:
            return np.load(output)
        if child.returncode == DECODE_FAILED:
            raise DecodeError(child.stdout.strip())
        if child.returncode < 0:
            number = -child.returncode
            name = next((s.name for s in signal.Signals if s == number), f"signal {number}")
            raise DecodeError(f"decoding killed its process ({name}; "
                              "decoded apart, as an earlier attempt never finished)")
        last_line = (child.stderr.strip().splitlines() or ["no output"])[-1]
        raise DecodeError(f"decoding exited with status {child.returncode}: {last_line}"[:500])


def _confine() -> None:
    """Fail an allocation past the limit (a clean DecodeError, not a kill), and be the process the
    kernel kills first when memory runs out anyway, not the worker that holds the model."""
    limit = MEMORY_LIMIT_MB << 20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    # Not Linux, or not permitted: the time limit and the worker's retry still hold.
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")


def main(argv: list[str]) -> int:
    from pydicom import dcmread

    from serving.decode import grayscale_pixels
    from serving.image import preprocess

    source, output, resize = argv
    _confine()
    try:
        tensor = preprocess(grayscale_pixels(dcmread(source)), resize)
    except (DecodeError, ValueError) as error:  # the same failures the in-process path records
        print(str(error)[:500])
        return DECODE_FAILED
    np.save(output, tensor)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
