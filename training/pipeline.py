"""Batches for `model.fit`: tf.data on the TensorFlow backend, plain arrays elsewhere.

The images are preprocessed once into memory (5,216 x 224 x 224 float32 is about 1 GB), so the
pipeline only shuffles and batches; augmentation runs inside the training model, which keeps
both cores on the convolutions.
"""

from __future__ import annotations

import keras
import numpy as np


def fit_inputs(
    images: np.ndarray, labels: np.ndarray, batch_size: int, seed: int, shuffle: bool,
    weights: np.ndarray | None = None,
):
    """Arguments for `model.fit`/`evaluate`: a dataset, or (x, y, batch_size); with per-image
    `weights` (adapt: each site and class carries its share) as the third element."""
    labels = labels.astype(np.float32).reshape(-1, 1)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        tensors = (images, labels) if weights is None else (images, labels, weights.astype(np.float32))
        dataset = tf.data.Dataset.from_tensor_slices(tensors)
        if shuffle:
            dataset = dataset.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        dataset = dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
        return {"x": dataset}
    arrays = {"x": images, "y": labels, "batch_size": batch_size, "shuffle": shuffle}
    return arrays if weights is None else {**arrays, "sample_weight": weights.astype(np.float32)}
