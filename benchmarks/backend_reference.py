"""Write the TensorFlow-CPU probabilities of the served models for a folder of images, and
copy the inputs for `backend_check.py` into one folder that can travel to another host."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from core import registry
from serving import models
from serving.image import preprocess_many

SHARED = Path(__file__).resolve().parents[2] / "shared"


def main(out: Path, count: int = 64) -> None:
    out.mkdir(parents=True, exist_ok=True)
    images_dir = out / "images"
    images_dir.mkdir(exist_ok=True)
    train = SHARED / "data" / "chest_xray" / "train"  # not test: this is a speed/parity check
    sources = sorted((train / "NORMAL").iterdir())[: count // 2] + sorted(
        (train / "PNEUMONIA").iterdir())[: count // 2]
    for path in sources:
        shutil.copy(path, images_dir / path.name)
    images = sorted(images_dir.glob("*.jpeg"))
    tensors = preprocess_many(images)
    reference = {}
    for name in registry.served_versions():
        model, version = models.load_version(name)
        reference[version.label] = model.predict(tensors, batch_size=32, verbose=0).reshape(-1).tolist()
    (out / "reference.json").write_text(json.dumps(reference))
    shutil.copy(SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5",
                out / "small.h5")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(".device"))
