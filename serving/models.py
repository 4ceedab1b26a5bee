"""A registered version as the serving path runs it: loaded after its hashes and contract are
verified, and with the second output the pixel check scores (no second pass).

Backend-neutral Keras 3. Training builds and trains the models (training.models); this is what
runs them, so the worker and the site tools never import training.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import keras
import numpy as np
from keras import layers

from core import contract, registry
from serving.pixelcheck import TRANSFER_LAYERS, ScopeError


def input_layer() -> keras.KerasTensor:
    shape = (contract.INPUT_HEIGHT, contract.INPUT_WIDTH, contract.INPUT_CHANNELS)
    return keras.Input(shape=shape, name="image")


def backbone_of(model: keras.Model) -> keras.Model:
    """The nested backbone of a transfer model."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            return layer
    raise ValueError(f"model {model.name} has no nested backbone")


def feature_layers(model: keras.Model) -> tuple[str, ...]:
    """The middle blocks whose pooled activations the pixel check reads (serving.pixelcheck)."""
    names = {layer.name for layer in model.layers}
    if {"to_rgb", "to_signed", "pool", "pneumonia_probability"} <= names:
        base = backbone_of(model)
        if all(any(layer.name == n for layer in base.layers) for n in TRANSFER_LAYERS):
            return TRANSFER_LAYERS
    pools = [layer.name for layer in model.layers if re.fullmatch(r"block\d+_pool", layer.name)]
    if pools:
        middle = pools[1:-1] or pools  # a CNN's blocks between the first and the last
        return tuple(middle)
    raise ScopeError(f"no known feature layers in model {model.name!r} (an ensemble?): "
                     f"a pixel check needs a single transfer or CNN model")


def with_features(
    model: keras.Model, chosen: tuple[str, ...] | None = None
) -> tuple[keras.Model, tuple[str, ...]]:
    """The same model with a second output: the pooled activations of `chosen` layers (a
    detector's; by default `feature_layers`), concatenated.

    One call gives the probability and what the pixel check scores, so checking costs no second
    pass. The probability output reuses the model's own layers and weights unchanged.
    """
    chosen = tuple(chosen or feature_layers(model))
    if "to_rgb" in {layer.name for layer in model.layers}:
        base = backbone_of(model)
        multi = keras.Model(base.input, [base.get_layer(n).output for n in chosen] + [base.output])
        inputs = input_layer()
        x = model.get_layer("to_rgb")([inputs, inputs, inputs])
        x = model.get_layer("to_signed")(x)
        *middle, last = multi(x)
        probability = model.get_layer("pneumonia_probability")(model.get_layer("pool")(last))
    else:
        inputs = model.input
        middle = [model.get_layer(n).output for n in chosen]
        probability = model.output
    pooled = [layers.GlobalAveragePooling2D()(m) for m in middle]
    features = pooled[0] if len(pooled) == 1 else layers.Concatenate()(pooled)
    return keras.Model(inputs, [probability, features], name=f"{model.name}_with_features"), chosen


def predict_with_features(
    scoring: keras.Model, images: np.ndarray, batch_size: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N,), features (N, F)) in batches."""
    probabilities, features = [], []
    for start in range(0, len(images), batch_size):
        p, f = scoring.predict_on_batch(images[start:start + batch_size])
        probabilities.append(np.asarray(p).reshape(-1))
        features.append(np.asarray(f))
    if not probabilities:
        return np.zeros(0), np.zeros((0, 0))
    return np.concatenate(probabilities), np.concatenate(features)


def load_version(
    spec: str, models_dir: Path = registry.DEFAULT_MODELS_DIR
) -> tuple[Any, registry.ModelVersion]:
    """A registered version's Keras model, after its hashes and contract are verified (here, not in
    core.registry: the ground never imports Keras)."""
    model_version = registry.resolve(spec, models_dir)
    registry.verify(model_version)
    model = keras.saving.load_model(model_version.model_file, compile=False)
    return model, model_version
