"""Backend check: the served models on another Keras backend (JAX or PyTorch, GPU or CPU) against
TensorFlow's probabilities, batch inference by batch size, and a tiny training run on that
backend. Run where TensorFlow is not installed, to prove the code does not need it:

    KERAS_BACKEND=torch python benchmarks/backend_check.py --images DIR --reference ref.json \
        --small-weights mobilenet_v2_..._0.35_224_no_top.h5

`--reference` holds the probabilities the TensorFlow CPU build gives for the same images
(written by `benchmarks/backend_reference.py`). Prints a table; numbers go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from serving import models
from serving.image import preprocess_many


def throughput(model, tensors: np.ndarray, batch_size: int, seconds: float = 5.0) -> float:
    batch = np.resize(tensors, (batch_size, *tensors.shape[1:])).astype(np.float32)
    model.predict_on_batch(batch)  # compile for this shape
    model.predict_on_batch(batch)
    count, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        np.asarray(model.predict_on_batch(batch))
        count += batch_size
    return count / (time.perf_counter() - started)


def tiny_training(images: list[Path], weights: Path) -> dict:
    from training.train import TrainConfig, train

    root = Path(tempfile.mkdtemp())
    for path in images:
        label = "PNEUMONIA" if path.name.startswith("person") else "NORMAL"
        (root / "train" / label).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, root / "train" / label / path.name)
    models_dir = root / "models"
    config = TrainConfig(model_name="pneumonia-transfer", backbone="mobilenet_v2_0.35",
                         backbone_weights=str(weights), epochs=2, fine_tune_epochs=1,
                         fine_tune_layers=10)
    started = time.perf_counter()
    version = train(config, root, models_dir, verbose=0)
    model, _ = models.load_version(f"pneumonia-transfer@{version.version}", models_dir)
    reloaded = model.predict(preprocess_many(images[:8]), verbose=0).reshape(-1)
    return {"seconds": time.perf_counter() - started, "backend": version.card.backend,
            "val_auc": version.card.metrics.validation.roc_auc,
            "reloaded_predictions_finite": bool(np.isfinite(reloaded).all())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--reference", type=Path, required=True)
    parser.add_argument("--small-weights", type=Path, required=True)
    parser.add_argument("--model", default="pneumonia-transfer")
    parser.add_argument("--batches", default="1,8,32,128,512",
                        help="batch sizes to time; on 2 CPU cores 512 exhausts memory on torch: use 1,8,32")
    args = parser.parse_args()

    from training.train import compute_device

    backend = keras.backend.backend()
    print(f"backend {backend} (keras {keras.__version__}), {compute_device()}")
    reference = json.loads(args.reference.read_text())
    images = sorted(args.images.glob("*.jpeg"))
    tensors = preprocess_many(images)
    for spec, expected in reference.items():
        model, version = models.load_version(spec)
        probabilities = model.predict(tensors, batch_size=32, verbose=0).reshape(-1)
        difference = float(np.max(np.abs(probabilities - np.array(expected))))
        print(f"{version.label}: max |p_{backend} - p_tf_cpu| over {len(images)} images = {difference:.2e}")
        if spec.startswith(args.model):
            print("batch  images/s")
            for batch_size in map(int, args.batches.split(",")):
                print(f"{batch_size:>5}  {throughput(model, tensors, batch_size):9.1f}")
    print("tiny training on this backend:", json.dumps(tiny_training(images, args.small_weights)))


if __name__ == "__main__":
    main()
