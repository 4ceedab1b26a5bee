"""The class-activation map of a prediction: which parts of the last convolutional map raised the
pneumonia logit. Computed in the same model call as the probability (a third output), so it costs
one small matrix product per image; the delivery worker draws it (worker.picture) without Keras.

Method: Grad-CAM (Selvaraju et al. 2017), the best of seven saliency methods at localising
findings on chest radiographs, though still worse than radiologists (Saporta et al. 2022), hence
the picture's label "heat map is not localisation". Our heads are global average pooling followed
by dense layers, so the gradient of the logit with respect to the last map is the same at every
position: ∂logit/∂A[i,j,k] = (1/HW) ∂logit/∂g[k], g the pooled features. That gradient is computed
here exactly from the head's weights (dropout is the identity at inference), with no autograd and
no second pass, whatever the backend. For the served transfer model (pool -> one linear unit) it
reduces to CAM (Zhou et al. 2016): the map is Σ_k w_k A_k.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import layers

# What a head may hold between the pooling and the logit; dropout and the like pass through.
_PASS_THROUGH = (layers.Dropout, layers.SpatialDropout2D, layers.GaussianNoise, layers.Activation)
_ACTIVATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "linear": lambda z: np.ones_like(z), "relu": lambda z: (z > 0).astype(z.dtype),
}


class SaliencyError(Exception):
    """The model's head is not global average pooling followed by dense layers."""


@dataclass(frozen=True)
class Head:
    """The dense layers after the pooling: (kernel, bias, activation) in order; the last one's
    activation (a sigmoid) is left out, as Grad-CAM differentiates the logit."""

    dense: tuple[tuple[np.ndarray, np.ndarray, str], ...]

    def _forward(self, pooled: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """(the logit (N, 1), each layer's activation derivative at its pre-activation)."""
        activations, derivatives = pooled.astype(np.float64), []
        for index, (kernel, bias, activation) in enumerate(self.dense):
            z = activations @ kernel + bias
            last = index == len(self.dense) - 1
            derivatives.append(_ACTIVATIONS["linear" if last else activation](z))
            activations = z if last else z * derivatives[-1]  # relu(z) = z * 1[z > 0]
        return activations, derivatives

    def logit(self, pooled: np.ndarray) -> np.ndarray:
        """The head's logit (N,) at pooled features (N, K): sigmoid of it is the probability."""
        return self._forward(pooled)[0][:, 0]

    def logit_gradient(self, pooled: np.ndarray) -> np.ndarray:
        """∂logit/∂pooled, (N, K), exact for this head at these pooled features (N, K)."""
        _, derivatives = self._forward(pooled)
        gradient = np.ones((pooled.shape[0], 1))
        for (kernel, _, _), derivative in zip(reversed(self.dense), reversed(derivatives), strict=True):
            gradient = (gradient * derivative) @ kernel.T
        return gradient


def _history(tensor: Any) -> tuple[Any, Any]:
    """(operation, its call node) that produced a symbolic tensor (Keras 3 functional graph)."""
    operation, node_index, _ = tensor._keras_history
    return operation, operation._inbound_nodes[node_index]


def pooled_map(model: keras.Model) -> tuple[Any, Head]:
    """(the symbolic last convolutional map the head pools, the head) of a model whose first output
    is the probability: walked back from that output to its global average pooling."""
    dense: list[tuple[np.ndarray, np.ndarray, str]] = []
    tensor = model.outputs[0]
    for _ in range(64):
        operation, node = _history(tensor)
        if isinstance(operation, layers.GlobalAveragePooling2D):
            if not dense:
                raise SaliencyError("no dense layer after the pooling")
            return node.input_tensors[0], Head(tuple(reversed(dense)))
        if isinstance(operation, layers.Dense):
            activation = operation.get_config().get("activation", "linear")
            if activation not in _ACTIVATIONS and dense:  # only the final unit may be a sigmoid
                raise SaliencyError(f"unsupported activation {activation!r} in the head")
            kernel, bias = (np.asarray(w, dtype=np.float64) for w in operation.get_weights())
            dense.append((kernel, bias, activation))
        elif not isinstance(operation, _PASS_THROUGH):
            raise SaliencyError(f"{type(operation).__name__} between the pooling and the output")
        if len(node.input_tensors) != 1:
            raise SaliencyError("a head with more than one input")
        tensor = node.input_tensors[0]
    raise SaliencyError("no global average pooling before the output")


def with_map(scoring: keras.Model) -> tuple[keras.Model, Head]:
    """`scoring` (probability first, serving.models.with_features) with one more output: the
    last convolutional map; the same layers and weights, so still one model call."""
    conv_map, head = pooled_map(scoring)
    return keras.Model(scoring.inputs, [*scoring.outputs, conv_map], name=f"{scoring.name}_cam"), head


def grad_cam(conv_maps: np.ndarray, head: Head) -> np.ndarray:
    """(N, H, W) Grad-CAM maps in [0, 1] from the last maps (N, H, W, K): ReLU of the maps
    weighted by the pooled logit gradient, divided by each map's maximum (all zero when nothing
    raised the logit)."""
    maps = np.asarray(conv_maps, dtype=np.float64)
    weights = head.logit_gradient(maps.mean(axis=(1, 2)))  # Grad-CAM's alpha_k, up to 1/HW
    cam = np.maximum(np.einsum("nhwk,nk->nhw", maps, weights), 0.0)
    peak = cam.max(axis=(1, 2), keepdims=True)
    return np.divide(cam, peak, out=np.zeros_like(cam), where=peak > 0).astype(np.float32)
