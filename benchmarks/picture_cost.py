"""What the heat map and the picture add per image (issue 20 item 1), against the classify path.

    .venv/bin/python benchmarks/picture_cost.py [--films 20] [--rounds 2] [--max-side 768]

Films: full-resolution Kermany originals (../shared/data/chest_xray_fullres/train), wrapped as
uncompressed 8-bit DX at their own size, or upscaled to `--short-side` first.
Per film, interleaved: the worker's classify path
(worker.classify._classify_file: read, header scope, decode, preprocess, model call with the pixel
check) with the served version as it was (two outputs) and as it is now (the map as a third output,
Grad-CAM, the map and the picture's grey copy kept beside the image; before, nothing was kept); then
the delivery side: the picture drawn from the kept grey copy and map and written as a Secondary
Capture (worker.picture.write_pictures, one image).
Medians over films and rounds of wall time and of this process's CPU time (all threads: what
the image costs the machine, less disturbed by other processes' load than wall time on a shared
host); the picture's size on disk.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import keras
from common import SHARED, load_average  # also puts the repo on sys.path
from PIL import Image
from pydicom import dcmread

from ops.send import wrap_image
from worker import classify, picture
from worker.inference import Classifier
from worker.report import ImageFinding

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--films", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--short-side", type=int, default=0,
                        help="upscale each film to this short side first (a modality's 2,000-3,000 px)")
    parser.add_argument("--max-side", type=int, default=picture.MAX_SIDE, help="the picture's longer side")
    args = parser.parse_args()
    picture.MAX_SIDE = args.max_side
    films = sorted((SHARED / "data" / "chest_xray_fullres" / "train" / "PNEUMONIA").iterdir())[:args.films]
    with_map = Classifier("pneumonia-transfer", REPO / "models")
    plain = Classifier("pneumonia-transfer", REPO / "models")
    plain.model = keras.Model(plain.model.inputs, plain.model.outputs[:2])  # as before issue 20
    plain.head = None
    version = picture.Version(with_map.name, with_map.version.version, with_map.threshold,
                              with_map.version.card.model_sha256)
    times: dict[str, list[float]] = {"plain": [], "map": [], "picture": []}
    cpu: dict[str, list[float]] = {"plain": [], "map": [], "picture": []}  # this process's CPU time
    sizes, shapes, greys = [], [], []
    kept_cpu: list[float] = []
    keep_map = picture.keep_map

    def keep(*args) -> None:  # worker.picture.keep_map, its CPU time recorded
        cpu_started = time.process_time()
        keep_map(*args)
        kept_cpu.append((time.process_time() - cpu_started) * 1000)
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for index, film in enumerate(films):
            path = Path(folder) / f"{index}.dcm"
            if args.short_side:
                with Image.open(film) as image:
                    grey = image.convert("L")
                    scale = args.short_side / min(grey.size)
                    grey.resize((round(grey.width * scale), round(grey.height * scale)),
                                Image.Resampling.BICUBIC).save(Path(folder) / f"{index}.png")
                film = Path(folder) / f"{index}.png"
            wrap_image(film).save_as(path, enforce_file_format=True)
            paths.append(path)
        for path in paths[:2]:  # warm-up: graph tracing, first reads
            classify._classify_file(path, lambda: plain)
            classify._classify_file(path, lambda: with_map)
        for _ in range(args.rounds):
            for path in paths:
                for key, model in (("plain", plain), ("map", with_map)):
                    # before issue 20 nothing was kept beside the image; now the map and the grey copy
                    classify.picture.keep_map = keep if key == "map" else lambda *_: None
                    started, cpu_started = time.perf_counter(), time.process_time()
                    state, *_ = classify._classify_file(path, lambda model=model: model)
                    times[key].append((time.perf_counter() - started) * 1000)
                    cpu[key].append((time.process_time() - cpu_started) * 1000)
                classify.picture.keep_map = keep_map
                header = dcmread(path, stop_before_pixels=True)
                shapes.append((header.Rows, header.Columns))
                started, cpu_started = time.perf_counter(), time.process_time()
                made, failed = picture.write_pictures([(path, ImageFinding(header, 0.5, True))], version,
                                                      Path(folder) / "pictures")
                times["picture"].append((time.perf_counter() - started) * 1000)
                cpu["picture"].append((time.process_time() - cpu_started) * 1000)
                assert not failed and state == "classified", state
                (reference,) = made.values()
                sizes.append((Path(folder) / "pictures" / f"{reference.SOPInstanceUID}.dcm").stat().st_size)
                greys.append(picture.grey_path(path).stat().st_size)
    median = {key: statistics.median(values) for key, values in times.items()}
    least = {key: min(values) for key, values in times.items()}  # the least disturbed by others' load
    added = median["map"] - median["plain"] + median["picture"]
    print(f"picture longer side {args.max_side} px; films {len(films)} x rounds {args.rounds}; "
          f"sizes {min(shapes)}-{max(shapes)} px; load average {load_average()}")
    print(f"classify path, before (2 outputs)  median {median['plain']:.1f} ms")
    print(f"classify path, with the map        median {median['map']:.1f} ms "
          f"(+{median['map'] - median['plain']:.1f} ms)")
    print(f"picture drawn and written (deliv.) median {median['picture']:.1f} ms")
    print(f"added per image {added:.1f} ms = {100 * added / median['plain']:.1f}% of the classify path")
    cpu_ms = {key: statistics.median(values) for key, values in cpu.items()}
    cpu_added = cpu_ms["map"] - cpu_ms["plain"] + cpu_ms["picture"]
    print(f"CPU time (all threads), medians: classify {cpu_ms['plain']:.1f} / with map {cpu_ms['map']:.1f} / "
          f"picture {cpu_ms['picture']:.1f} ms: added {100 * cpu_added / cpu_ms['plain']:.1f}%")
    fastest = least["map"] - least["plain"] + least["picture"]
    print(f"fastest of each: classify {least['plain']:.1f} / with map {least['map']:.1f} / picture "
          f"{least['picture']:.1f} ms: added {100 * fastest / least['plain']:.1f}%")
    print(f"of the classify path with the map: keeping the map and the grey copy, CPU median "
          f"{statistics.median(kept_cpu):.1f} ms")
    print(f"picture size median {statistics.median(sizes) / 1e6:.2f} MB (max {max(sizes) / 1e6:.2f} MB); "
          f"grey copy kept {statistics.median(greys) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
