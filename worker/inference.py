"""The served model and its pixel check, loaded once per worker process, verified against its card."""

from __future__ import annotations

import functools
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core import contract, registry
from core.card import IntendedUse
from core.queue import BATCH_TIMEOUT_S  # a batch this slow means the model is stuck: fail the task
from serving import models, pixelcheck, saliency
from worker.batching import MicroBatcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    probability: float
    label: str
    inference_ms: float
    scope_score: float  # the pixel check's score; above `Classifier.scope_threshold`: out of scope
    saliency: np.ndarray | None = None  # Grad-CAM (H, W) in [0, 1] (serving.saliency); None: none


class Classifier:
    """Wraps one registered model version; `predict` takes the contract's input tensors.

    With `batch_size` > 1, concurrent `predict` calls (Celery's thread pool) are batched together
    (see worker.batching); otherwise each call runs the model on its own image. One model call
    gives the probability and the pixel check's features (serving.models.with_features).
    """

    def __init__(self, spec: str, models_dir: Path, batch_size: int = 1, batch_wait_s: float = 0.01) -> None:
        model, self.version = models.load_version(spec, models_dir)
        scope = self.version.scope
        if scope is None or not scope.detector_sha256:
            raise registry.RegistryError(
                f"{self.version.label} has no pixel check, so no image can be checked against what "
                f"it was validated on; run `pneumo scope fit --model {self.version.label}`")
        try:
            self.detector = pixelcheck.load(self.version.path, scope.detector_sha256)
        except pixelcheck.ScopeError as error:
            raise registry.RegistryError(f"{self.version.label}: {error}") from error
        self.model, _ = models.with_features(model, self.detector.layers)
        self.head: saliency.Head | None = None
        self.map_shape: tuple[int, ...] = ()
        try:  # the class-activation map as a third output of the same call (serving.saliency)
            self.model, self.head = saliency.with_map(self.model)
            self.map_shape = tuple(self.model.outputs[-1].shape[1:3])
        except saliency.SaliencyError as error:
            log.warning("%s: no heat maps (%s)", self.version.label, error)
        # The version's own input path: the resize its card records (core.contract.RESIZE_TEXT).
        self.resize = contract.resize_of(self.version.card.preprocessing.dump())
        self._lock = threading.Lock()
        self.batch_size, self.batch_wait_s = batch_size, batch_wait_s  # a candidate batches alike
        self._batcher = (
            MicroBatcher(self._run_model, batch_size, batch_wait_s) if batch_size > 1 else None
        )
        log.info("serving %s (threshold %.4f, batches of up to %d)",
                 self.version.label, self.version.threshold, batch_size)

    @property
    def name(self) -> str:
        return self.version.name

    @property
    def threshold(self) -> float:
        return self.version.threshold

    @property
    def scope_threshold(self) -> float:
        return self.detector.threshold

    @functools.cached_property
    def version_row(self) -> dict:
        """The version's `model_versions` row, its card without training details (made once: the
        worker records it with every result, a no-op once it is there)."""
        card = self.version.card
        return {"name": self.name, "version": self.version.version, "model_sha256": card.model_sha256,
                "threshold": self.threshold, "card": card.dump(exclude={"training"})}

    @property
    def intended_use(self) -> IntendedUse:
        scope = self.version.scope
        return (scope.intended_use if scope else None) or IntendedUse()

    def _run_model(self, tensors: np.ndarray) -> np.ndarray:
        """(N, 2 + map size): probability, pixel check score and the flattened map per image."""
        with self._lock:
            probabilities, features, *conv_maps = self.model.predict_on_batch(tensors)
        scores = self.detector.score(np.asarray(features))
        columns = [np.asarray(probabilities).reshape(-1, 1), scores.reshape(-1, 1)]
        if self.head is not None:
            columns.append(saliency.grad_cam(conv_maps[0], self.head).reshape(len(scores), -1))
        return np.concatenate(columns, axis=1)

    def _prediction(self, output: np.ndarray, inference_ms: float) -> Prediction:
        probability, score = float(output[0]), float(output[1])
        label = contract.label_for(probability, self.threshold)
        cam = output[2:].reshape(self.map_shape) if self.head is not None else None
        return Prediction(probability, label, inference_ms, score, cam)

    def predict_batch(self, tensors: np.ndarray) -> list[Prediction]:
        started = time.perf_counter()
        output = self._run_model(tensors)
        elapsed = (time.perf_counter() - started) * 1000 / max(1, len(tensors))
        return [self._prediction(row, elapsed) for row in output]

    def predict(self, tensor: np.ndarray) -> Prediction:
        if self._batcher is None:
            return self.predict_batch(tensor[np.newaxis])[0]
        output, per_image_ms = self._batcher.submit(tensor).result(timeout=BATCH_TIMEOUT_S)
        return self._prediction(output, per_image_ms)


_cache: dict[tuple[str, str], Classifier] = {}
_cache_lock = threading.Lock()


def served_classifier(
    model_name: str, models_dir: Path, batch_size: int = 1, batch_wait_s: float = 0.01
) -> Classifier:
    """The process-wide classifier for the currently served version of `model_name`.

    The served marker is re-read on each call (a small JSON file) so `pneumo models serve`
    takes effect without restarting workers; the model itself is loaded once per version.
    """
    # Only the marker is read per image; the card is read (and checked) when a version loads.
    version = registry.served_versions(models_dir).get(model_name, "")
    key = (model_name, version)
    with _cache_lock:
        if key not in _cache:
            version = registry.resolve(model_name, models_dir).version  # names what is missing
            key = (model_name, version)
            _cache[key] = Classifier(f"{model_name}@{version}", models_dir, batch_size, batch_wait_s)
        return _cache[key]
