"""Issue 19's checks on the served version, through the worker's own classifier and the one input
path: the NIH development half without age or view (as shared, PNG, JPEG 75), held-out
full-resolution originals re-encoded at their own size (JPEG 75, JPEG 95, PNG), and the real DICOM
files. Prints a table. Usage: python benchmarks/fullres_check.py [--model pneumonia-transfer]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from pydicom import dcmread

from core import registry
from serving.decode import DecodeError, grayscale_pixels
from serving.image import load_grayscale, preprocess
from training import site
from training.fullres import held_out_split, reencoded
from worker import filters
from worker.inference import Classifier

SHARED = Path(__file__).resolve().parents[2] / "shared"


ENCODINGS = {
    "as shared": lambda p: p,
    "PNG": lambda p: reencoded(p, "PNG"),
    "JPEG quality 75": lambda p: reencoded(p, "JPEG", quality=75),
    "JPEG quality 95": lambda p: reencoded(p, "JPEG", quality=95),
}


def refused(model: Classifier, images: list[np.ndarray]) -> np.ndarray:
    tensors = np.stack([preprocess(i, model.resize) for i in images])
    return np.array([p.scope_score > model.scope_threshold for p in model.predict_batch(tensors)])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="pneumonia-transfer")
    parser.add_argument("--models-dir", type=Path, default=registry.DEFAULT_MODELS_DIR)
    args = parser.parse_args()
    model = Classifier(args.model, args.models_dir)
    print(f"{model.version.label}\n\n| images | encoding | n | refused |\n|---|---|---|---|")
    adults = [load_grayscale(i.path) for i in site.read_site(SHARED / "data" / "nih_site")]
    for name, encode in ENCODINGS.items():
        if name != "JPEG quality 95":
            flags = np.concatenate([refused(model, [encode(p) for p in adults[i:i + 64]])
                                    for i in range(0, len(adults), 64)])
            print(f"| NIH development half (all, no age/view) | {name} | {len(flags)} | {flags.mean():.1%} |")
    _, held = held_out_split(model.version.label, SHARED / "data" / "chest_xray_fullres", args.models_dir)
    decisions = []
    for name, encode in ENCODINGS.items():
        flags = np.concatenate([refused(model, [encode(load_grayscale(s.path))]) for s in held])
        decisions.append(flags)
        print(f"| held-out full-resolution originals, own size | {name} | {len(flags)} "
              f"| {flags.mean():.1%} |")
    same = np.mean(np.all(np.stack(decisions) == decisions[0], axis=0))
    print(f"| same decision in all four encodings | | {len(held)} | {same:.1%} same |")
    print("\n| real DICOM file | outcome |\n|---|---|")
    for path in sorted((SHARED / "dicom" / "real").glob("*.dcm")):
        dataset = dcmread(path)
        reason = filters.ignore_reason(dataset) or filters.failure_reason(dataset)
        if reason:
            print(f"| {path.name} | filtered: {reason} |")
            continue
        try:
            tensor = preprocess(grayscale_pixels(dataset), model.resize)
        except (DecodeError, ValueError) as error:
            print(f"| {path.name} | failed: {str(error).splitlines()[0][:80]} |")
            continue
        prediction = model.predict(tensor)
        outcome = ("refused by the pixel check" if prediction.scope_score > model.scope_threshold
                   else f"assessed by pixels ({prediction.label})")
        print(f"| {path.name} | {outcome} (score {prediction.scope_score:.2f}) |")


if __name__ == "__main__":
    main()
