"""The served model, loaded once per worker process, verified against its card."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core import registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prediction:
    probability: float
    label: str
    inference_ms: float


class Classifier:
    """Wraps one registered model version; `predict` takes the contract's input tensors."""

    def __init__(self, spec: str, models_dir: Path) -> None:
        self.model, self.version = registry.load(spec, models_dir)
        self._lock = threading.Lock()
        log.info("serving %s (threshold %.4f)", self.version.label, self.version.threshold)

    @property
    def name(self) -> str:
        return self.version.name

    @property
    def threshold(self) -> float:
        return self.version.threshold

    def predict_batch(self, tensors: np.ndarray) -> list[Prediction]:
        started = time.perf_counter()
        with self._lock:
            output = np.asarray(self.model.predict_on_batch(tensors)).reshape(-1)
        elapsed = (time.perf_counter() - started) * 1000 / max(1, len(tensors))
        return [
            Prediction(float(p), "PNEUMONIA" if p >= self.threshold else "NORMAL", elapsed)
            for p in output
        ]

    def predict(self, tensor: np.ndarray) -> Prediction:
        return self.predict_batch(tensor[np.newaxis])[0]


_cache: dict[tuple[str, str], Classifier] = {}
_cache_lock = threading.Lock()


def served_classifier(model_name: str, models_dir: Path) -> Classifier:
    """The process-wide classifier for the currently served version of `model_name`.

    The served marker is re-read on each call (a small JSON file) so `pneumo models serve`
    takes effect without restarting workers; the model itself is loaded once per version.
    """
    version = registry.resolve(model_name, models_dir).version
    key = (model_name, version)
    with _cache_lock:
        if key not in _cache:
            _cache[key] = Classifier(f"{model_name}@{version}", models_dir)
        return _cache[key]
