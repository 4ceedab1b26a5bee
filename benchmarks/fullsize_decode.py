"""Full-size films per transfer syntax: what decoding and preprocessing cost the worker, and what
the model call costs beside it (issue 21 item 4, full decode only: reduced-resolution decoding is
not built yet).

    .venv/bin/python benchmarks/fullsize_decode.py [--films 6] [--rounds 3]

Films: the largest full-resolution Kermany originals (../shared/data/chest_xray_fullres), each
upscaled to a 2,500 px short side (a modality's size) and written in every encoding of
devtools/corpus.py (8-bit, 12-bit MONOCHROME1, 16-bit windowed, JPEG baseline, JPEG-LS, JPEG 2000
lossless and lossy, RLE). Per syntax: median ms to read the file, decode it to grey
(serving.decode) and preprocess it (serving.image), in this process; and the served model's ms per
image at batch 1 for comparison.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHARED, load_average, print_table  # also puts the repo on sys.path
from PIL import Image
from pydicom import dcmread

from core import registry
from devtools.corpus import KINDS, variant
from ops.send import wrap_image
from serving.decode import grayscale_pixels
from serving.image import preprocess


def films(count: int) -> list[Path]:
    originals = sorted((SHARED / "data" / "chest_xray_fullres" / "train").glob("*/*.jpeg"),
                       key=lambda p: -min(Image.open(p).size))
    return originals[:count]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--films", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from worker.inference import Classifier

    model = Classifier("pneumonia-transfer", registry.DEFAULT_MODELS_DIR)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        paths: dict[str, list[Path]] = {kind: [] for kind in KINDS}
        for index, film in enumerate(films(args.films)):
            for kind in KINDS:
                path = Path(folder) / f"{kind}-{index}.dcm"
                variant(wrap_image(film), kind, short_side=2500).save_as(path, enforce_file_format=True)
                paths[kind].append(path)
        tensor = None
        for kind in KINDS:
            times = []
            for _ in range(args.rounds):
                for path in paths[kind]:
                    started = time.perf_counter()
                    tensor = preprocess(grayscale_pixels(dcmread(path)), model.resize)
                    times.append((time.perf_counter() - started) * 1000)
            dataset = dcmread(paths[kind][0], stop_before_pixels=True)
            size = sum(p.stat().st_size for p in paths[kind]) / len(paths[kind]) / 1e6
            rows.append([kind, dataset.file_meta.TransferSyntaxUID.name,
                         f"{dataset.Columns}x{dataset.Rows}", f"{size:.1f}",
                         f"{statistics.median(times):.0f}"])
        model.predict(tensor)  # warm
        started = time.perf_counter()
        for _ in range(20):
            model.predict(tensor)
        per_call_ms = (time.perf_counter() - started) * 1000 / 20
        rows.append(["(model call, batch 1)", "", "224x224", "", f"{per_call_ms:.0f}"])
    print(f"load average: {load_average()}")
    print_table(["encoding", "transfer syntax", "size", "MB", "read+decode+preprocess ms (median)"], rows)


if __name__ == "__main__":
    main()
