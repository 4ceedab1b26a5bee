"""Dynamic batching: many classify tasks running in threads share one `predict_on_batch` call.

Why: a GPU predicts a batch of 32 about 30 times faster per image than one image at a time, but a
Celery message is one instance, and acknowledging per message is what keeps a killed worker from
losing a study. So the messages stay single and the worker batches inside the process: a task
thread hands its tensor to the batcher and waits; the batcher runs the model on whatever arrived
within `max_wait_s` of the first tensor (at most `max_batch`), then wakes every waiter with its own
output. Used with Celery's thread pool (`pneumo worker --pool threads`).
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

import numpy as np

PredictBatch = Callable[[np.ndarray], np.ndarray]


class MicroBatcher:
    """Collects single tensors from any thread and predicts them in batches on one thread."""

    def __init__(self, predict_batch: PredictBatch, max_batch: int, max_wait_s: float) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self._predict_batch = predict_batch
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._pending: queue.Queue[tuple[np.ndarray, Future]] = queue.Queue()
        # The sizes of the latest batches (tests and benchmarks read them); bounded, as a worker
        # runs for months.
        self.batch_sizes: deque[int] = deque(maxlen=10_000)
        threading.Thread(target=self._loop, name="micro-batcher", daemon=True).start()

    def submit(self, tensor: np.ndarray) -> Future:
        """A future of (model output for this tensor, milliseconds per image of its batch)."""
        future: Future = Future()
        self._pending.put((tensor, future))
        return future

    def _next_batch(self) -> list[tuple[np.ndarray, Future]]:
        batch = [self._pending.get()]
        deadline = time.monotonic() + self.max_wait_s
        while len(batch) < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                batch.append(
                    self._pending.get(timeout=remaining) if remaining > 0 else self._pending.get_nowait()
                )
            except queue.Empty:
                break
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._next_batch()
            started = time.perf_counter()
            try:
                outputs = np.asarray(self._predict_batch(np.stack([t for t, _ in batch])))
            except Exception as error:  # every waiter sees the model's error as its own
                for _, future in batch:
                    future.set_exception(error)
                continue
            per_image_ms = (time.perf_counter() - started) * 1000 / len(batch)
            self.batch_sizes.append(len(batch))
            for (_, future), output in zip(batch, outputs.reshape(len(batch), -1), strict=True):
                future.set_result((output, per_image_ms))
