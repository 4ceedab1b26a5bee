"""Full-size films per transfer syntax: what decoding costs the worker, full and reduced, and
whether the reduced decode changes any answer (issue 21 items 3 and 4).

    .venv/bin/python benchmarks/fullsize_decode.py [--films 69] [--short-sides 448 224] [--rounds 1]

Films: the served transfer version's held-out full-resolution originals (training.fullres: the
patients whose 224 px copies it never trained on), each upscaled to a short side between 2,000 and
3,000 px (varied per film, as modalities vary) and written in every encoding of devtools/corpus.py.
Each file is read from memory, decoded to grey (serving.decode) and preprocessed (serving.image)
in full (`min_short_side=None`) and at each reduced short side, interleaved per file. The reduced
tensors go through the served model and its pixel check next to the full ones: label agreement,
max |dp|, the pixel check's score change and refusals. Encodings with no reduced path (uncompressed,
JPEG-LS, RLE) decode the same pixels either way and are timed only, on the first --timing-films.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
from common import SHARED, load_average, print_table  # also puts the repo on sys.path
from pydicom import dcmread

from core import registry
from devtools.corpus import KINDS, variant
from ops.send import wrap_image
from serving import reduced
from serving.decode import grayscale_pixels
from serving.image import preprocess

REDUCIBLE = ("jpeg_baseline", "j2k_lossless", "j2k_lossy")


def short_side(index: int) -> int:
    """2,000-3,000 px, spread over the films (and over their sizes modulo 8, which decide the
    JPEG 2000 reduce level Pillow can size)."""
    return 2000 + (index * 389) % 1001


@dataclass
class Column:
    """One encoding at one decode setting (full, or reduced to a short side)."""

    ms: list[float] = field(default_factory=list)
    tensors: list[np.ndarray] = field(default_factory=list)
    short_sides: list[int] = field(default_factory=list)


def decoded(data: bytes, min_short_side: int | None, resize: str) -> tuple[np.ndarray, float, int]:
    started = time.perf_counter()
    grey = grayscale_pixels(dcmread(io.BytesIO(data)), min_short_side)
    tensor = preprocess(grey, resize)
    return tensor, (time.perf_counter() - started) * 1000, min(grey.shape)


def encoded(dx, kind: str, side: int) -> bytes:
    buffer = io.BytesIO()
    variant(dx, kind, short_side=side).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def collect(model, originals: list[Path], sides: list[int], rounds: int, kinds: list[str],
            timing_films: int) -> tuple[dict[tuple[str, int | None], Column], dict[str, list[float]]]:
    columns: dict[tuple[str, int | None], Column] = {}
    megabytes: dict[str, list[float]] = {kind: [] for kind in kinds}
    for index, original in enumerate(originals):
        dx = wrap_image(original)
        for kind in kinds:
            if kind not in REDUCIBLE and index >= timing_films:
                continue  # decoded in full either way: timed on the first films only
            data = encoded(dx, kind, short_side(index))
            megabytes[kind].append(len(data) / 1e6)
            settings: list[int | None] = [None, *sides] if kind in REDUCIBLE else [None]
            for round_ in range(rounds):
                for setting in settings:  # interleaved: load on the shared machine hits all alike
                    tensor, ms, short = decoded(data, setting, model.resize)
                    column = columns.setdefault((kind, setting), Column())
                    column.ms.append(ms)
                    if round_ == 0:
                        column.tensors.append(tensor)
                        column.short_sides.append(short)
        print(f"film {index + 1}/{len(originals)} done (load {load_average()})", file=sys.stderr)
    return columns, megabytes


def predictions(model, tensors: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, pixel check scores) through the worker's classifier, 32 at a time."""
    rows = [p for start in range(0, len(tensors), 32)
            for p in model.predict_batch(np.stack(tensors[start:start + 32]))]
    return np.array([p.probability for p in rows]), np.array([p.scope_score for p in rows])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="pneumonia-transfer")
    parser.add_argument("--films", type=int, default=0, help="first N held-out originals (0: all)")
    parser.add_argument("--short-sides", type=int, nargs="+", default=[448, 224])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--timing-films", type=int, default=6,
                        help="films on which encodings with no reduced path are timed")
    args = parser.parse_args()
    from training.fullres import held_out_split
    from worker.inference import Classifier

    model = Classifier(args.model, registry.DEFAULT_MODELS_DIR)
    _, held = held_out_split(model.version.label, SHARED / "data" / "chest_xray_fullres",
                             registry.DEFAULT_MODELS_DIR)
    held = held[:args.films] if args.films else held
    columns, megabytes = collect(model, [s.path for s in held], args.short_sides, args.rounds,
                                 args.kinds, args.timing_films)
    truth = np.array([s.label for s in held])
    rows = []
    for kind in args.kinds:
        full = columns[(kind, None)]
        full_ms = statistics.median(full.ms)
        name = dcmread(io.BytesIO(encoded(wrap_image(held[0].path), kind, 2000)),
                       stop_before_pixels=True).file_meta.TransferSyntaxUID.name
        base = [kind, name, f"{statistics.median(megabytes[kind]):.1f}", f"{full_ms:.0f}"]
        if kind not in REDUCIBLE:
            rows.append([*base, f"no reduced path ({len(full.ms)} films)", "-", "-", "-", "-", "-", "-", "-"])
            continue
        p_full, s_full = predictions(model, full.tensors)
        for side in args.short_sides:
            column = columns[(kind, side)]
            p, s = predictions(model, column.tensors)
            agree = np.mean((p >= model.threshold) == (p_full >= model.threshold))
            refused = (int(np.sum(s_full > model.scope_threshold)),
                       int(np.sum(s > model.scope_threshold)))
            accuracy = (np.mean((p_full >= model.threshold) == truth),
                        np.mean((p >= model.threshold) == truth))
            reduced_count = sum(r < f for r, f in zip(column.short_sides, full.short_sides, strict=True))
            rows.append([*base, f">= {side}: {reduced_count}/{len(held)} reduced, short side "
                         f"{min(column.short_sides)}-{max(column.short_sides)}",
                         f"{statistics.median(column.ms):.0f}",
                         f"{full_ms / statistics.median(column.ms):.1f}x",
                         f"{agree:.1%}", f"{np.max(np.abs(p - p_full)):.3f}",
                         f"{np.max(np.abs(s - s_full)):.3f}",
                         f"{refused[0]} -> {refused[1]}",
                         f"{accuracy[0]:.1%} -> {accuracy[1]:.1%}"])
    tensor = next(iter(columns.values())).tensors[0]
    model.predict(tensor)  # warm
    started = time.perf_counter()
    for _ in range(20):
        model.predict(tensor)
    rows.append(["(model call, batch 1)", "", "", f"{(time.perf_counter() - started) * 50:.0f}",
                 *[""] * 8])
    print(f"{model.version.label}; {len(held)} held-out originals; short sides "
          f"{min(map(short_side, range(len(held))))}-{max(map(short_side, range(len(held))))} px; "
          f"rounds {args.rounds}; load average {load_average()}; "
          f"reduced-decode fallbacks {dict(reduced.FALLBACKS) or 0}")
    print_table(["encoding", "transfer syntax", "MB", "full ms", "reduced to", "reduced ms",
                 "speedup", "labels agree", "max |dp|", "max |d score|", "refused full -> reduced",
                 "accuracy full -> reduced"], rows)


if __name__ == "__main__":
    main()
