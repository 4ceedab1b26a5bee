"""Decoding: in the worker's own process vs apart (`worker.isolation`), and what a bomb costs.

    .venv/bin/python benchmarks/decoding.py [--rounds 3] [--unguarded]

Images: the chest radiographs of ../shared/dicom/real, and the largest image the filters admit
(8192x8192, 16-bit, noise; uncompressed and JPEG 2000 lossless, written to a temporary folder).
Each is decoded and preprocessed in a fresh process, once as the worker's first attempt does (in
process) and once as a redelivered image is (a child under the address-space limit): median
seconds and peak RSS of the process that decoded. Bombs: a real JPEG 2000 / JPEG file whose
codestream claims 40000x40000 / 60000x60000 pixels (tests/pipeline/test_bad_input.py builds
them): the filters' verdict, and decoded apart with the header made to agree (so the filters
would pass it). `--unguarded` also decodes the bombs in process with no limit, as the worker did
before the filters checked codestreams: about 2 minutes and up to 14 GB of memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHARED, codestream_claiming, load_average, print_table  # also puts the repo on sys.path

CHESTS = ["fuji_cr_chest_mono1_explicit.dcm", "nih_cxr14_dx_implicit.dcm", "konica_cr_mono1_jpeg.dcm",
          "nema_rg1_cr_chest_j2k_lossy.dcm", "dx_16bit_j2k_flipped.dcm"]


def measure(mode: str, path: Path) -> dict:
    """Run in a fresh process: decode `path` in process or apart; seconds, peak RSS, outcome."""
    from pydicom import dcmread

    from serving.decode import DecodeError, grayscale_pixels
    from serving.image import preprocess
    from worker.isolation import decode_in_child

    started = time.perf_counter()
    try:
        tensor = decode_in_child(path) if mode == "apart" else preprocess(grayscale_pixels(dcmread(path)))
        outcome = f"tensor {tuple(tensor.shape)}"
    except DecodeError as error:
        outcome = str(error)[:90]
    seconds = time.perf_counter() - started
    if mode == "apart":
        rss_mib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    else:  # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
        status = Path("/proc/self/status").read_text()
        rss_mib = int(status.split("VmHWM:")[1].split()[0]) / 1024
    return {"seconds": seconds, "rss_mib": rss_mib, "outcome": outcome}


def measured(mode: str, path: Path) -> dict:
    command = [sys.executable, __file__, "--measure", mode, str(path)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


def largest_images(folder: Path) -> list[Path]:
    import numpy as np
    from pydicom import dcmread
    from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless

    dataset = dcmread(SHARED / "dicom" / "real" / "nih_cxr14_dx_implicit.dcm")
    pixels = np.random.default_rng(0).integers(0, 4096, size=(8192, 8192), dtype=np.uint16)
    dataset.Rows = dataset.Columns = 8192
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 16, 12, 11, 0
    dataset.PixelData = pixels.tobytes()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    raw, j2k = folder / "8192x8192 16-bit uncompressed", folder / "8192x8192 16-bit JPEG 2000"
    dataset.save_as(raw, enforce_file_format=True)
    dataset.compress(JPEG2000Lossless, pixels, encoding_plugin="pylibjpeg")
    dataset.save_as(j2k, enforce_file_format=True)
    return [raw, j2k]


def bombs(folder: Path) -> list[tuple[str, Path, Path]]:
    """(name, the bomb as sent, the same with its header made to agree)."""
    made = []
    for name, source, marker, offset, fmt, side in (  # JPEG 2000 SIZ: Xsiz, Ysiz; JPEG SOF0: height, width
        ("JPEG 2000 claiming 40000x40000", "nema_rg1_cr_chest_j2k_lossy.dcm", b"\xff\x51", 6, ">II", 40000),
        ("JPEG claiming 60000x60000", "konica_cr_mono1_jpeg.dcm", b"\xff\xc0", 5, ">HH", 60000),
    ):
        dataset = codestream_claiming(source, marker, offset, fmt, side)
        sent, agreeing = folder / f"{name} (as sent)", folder / f"{name} (header agrees)"
        dataset.save_as(sent)
        dataset.Rows = dataset.Columns = side
        dataset.save_as(agreeing)
        made.append((name, sent, agreeing))
    return made


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--unguarded", action="store_true")
    parser.add_argument("--measure", nargs=2, metavar=("MODE", "FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure[0], Path(args.measure[1]))))
        return

    from pydicom import dcmread

    from worker import filters

    print(f"load before: {load_average()}")
    with tempfile.TemporaryDirectory(prefix="pneumo-decoding-") as tmp:
        images = [SHARED / "dicom" / "real" / name for name in CHESTS] + largest_images(Path(tmp))
        rows = []
        for path in images:
            runs = {mode: [measured(mode, path) for _ in range(args.rounds)]
                    for mode in ("in-process", "apart")}
            rows.append([path.name, f"{path.stat().st_size / 1024:,.0f}"] + [
                f"{statistics.median(r['seconds'] for r in runs[mode]):.2f}" for mode in runs
            ] + [f"{max(r['rss_mib'] for r in runs[mode]):,.0f}" for mode in runs])
        print_table(["image", "KiB", "in process s", "apart s", "in process peak RSS MiB",
                     "apart: child peak RSS MiB"], rows)

        rows = []
        for name, sent, agreeing in bombs(Path(tmp)):
            started = time.perf_counter()
            verdict = filters.failure_reason(dcmread(sent, defer_size=1 << 20))
            filter_s = time.perf_counter() - started
            apart = measured("apart", agreeing)
            row = [name, f"{sent.stat().st_size / 1024:,.0f}", f"{verdict} ({filter_s:.2f} s)",
                   f"{apart['outcome']} ({apart['seconds']:.1f} s, child {apart['rss_mib']:,.0f} MiB)"]
            if args.unguarded:
                unguarded = measured("in-process", sent)
                row.append(f"{unguarded['outcome']} ({unguarded['seconds']:.0f} s, "
                           f"{unguarded['rss_mib']:,.0f} MiB)")
            rows.append(row)
        print_table(["bomb", "KiB", "filters (as sent)", "decoded apart (header agrees)"]
                    + (["decoded in process, no limit (as sent)"] if args.unguarded else []), rows)
    print(f"load after: {load_average()}")


if __name__ == "__main__":
    main()
