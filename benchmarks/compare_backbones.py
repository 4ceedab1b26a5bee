"""Which ImageNet backbone for pneumonia-transfer: a linear probe on the validation split.

Frozen features (global average pooled, 224 px, our preprocessing) -> logistic regression with
balanced class weights, fitted on a class-balanced subset of the training patients and scored on
the full patient-level validation split. Also the CPU cost of one forward pass per image.
The test split is not read.

    .venv/bin/python benchmarks/compare_backbones.py --per-class 600
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import keras
import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from serving.image import preprocess_many
from serving.models import input_layer
from training import data, metrics, models

SHARED = Path(__file__).resolve().parents[2] / "shared"
WEIGHTS = {
    "mobilenet_v2": SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5",
    "xception": SHARED / "weights" / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5",
}


def feature_model(backbone: str) -> keras.Model:
    inputs = input_layer()
    x = keras.layers.Concatenate()([inputs, inputs, inputs])
    x = keras.layers.Rescaling(2.0, offset=-1.0)(x)
    x = models.build_backbone(backbone, str(WEIGHTS[backbone]))(x, training=False)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "chest_xray")
    parser.add_argument("--per-class", type=int, default=600)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()

    unique, _ = data.drop_duplicates(data.read_split(args.data, "train"))
    train, validation = data.patient_split(unique, 0.15, args.seed)
    rng = np.random.default_rng(args.seed)
    subset = []
    for label in (0, 1):
        pool = [s for s in train if s.label == label]
        subset += [pool[i] for i in sorted(rng.choice(len(pool), args.per_class, replace=False))]
    x_train, x_val = preprocess_many([s.path for s in subset]), preprocess_many([s.path for s in validation])
    y_train = np.array([s.label for s in subset])
    y_val = np.array([s.label for s in validation])

    rows = []
    for backbone in WEIGHTS:
        model = feature_model(backbone)
        model.predict(x_val[:32], verbose=0)
        started = time.perf_counter()
        f_val = model.predict(x_val, batch_size=32, verbose=0)
        ms_per_image = (time.perf_counter() - started) * 1000 / len(x_val)
        f_train = model.predict(x_train, batch_size=32, verbose=0)
        probe = make_pipeline(StandardScaler(), LogisticRegression(
            class_weight="balanced", C=0.1, max_iter=5000))
        probe.fit(f_train, y_train)
        p_val = probe.predict_proba(f_val)[:, 1]
        threshold = metrics.choose_threshold(y_val, p_val)
        rows.append((backbone, model.count_params(), ms_per_image, roc_auc_score(y_val, p_val),
                     balanced_accuracy_score(y_val, p_val >= threshold)))
        keras.backend.clear_session()

    print(f"train subset {len(subset)} images ({args.per_class}/class), validation {len(validation)}")
    print(f"{'backbone':<14} {'params':>10} {'CPU ms/img':>11} {'val AUC':>8} {'val bal.acc':>12}")
    for backbone, params, ms, auc, balanced in rows:
        print(f"{backbone:<14} {params:>10,} {ms:>11.1f} {auc:>8.4f} {balanced:>12.4f}")


if __name__ == "__main__":
    main()
