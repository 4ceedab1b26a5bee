"""Dynamic batching (worker.batching): tasks in threads share one model call, and each task gets
its own image's output, the same as unbatched."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from core.db import Instance, InstanceState, Result
from ops.send import wrap_image
from tests.conftest import DATA
from tests.worker.test_worker import store
from worker import classify
from worker.batching import MicroBatcher
from worker.inference import Classifier


def test_concurrent_submissions_run_as_one_batch_with_outputs_in_order() -> None:
    calls: list[int] = []

    def predict(batch: np.ndarray) -> np.ndarray:
        calls.append(len(batch))
        return batch.reshape(len(batch), -1).sum(axis=1) * 10

    batcher = MicroBatcher(predict, max_batch=8, max_wait_s=5.0)
    start = threading.Barrier(8)

    def one(value: int) -> float:
        start.wait()
        output, per_image_ms = batcher.submit(np.full((2, 2), value, np.float32)).result(timeout=10)
        assert per_image_ms >= 0
        return float(output[0])

    with ThreadPoolExecutor(8) as pool:
        outputs = list(pool.map(one, range(8)))
    assert outputs == [value * 4 * 10 for value in range(8)]
    assert calls == [8]  # a full batch does not wait out max_wait_s


def test_a_lone_image_waits_at_most_max_wait_and_batches_never_exceed_max() -> None:
    batcher = MicroBatcher(lambda batch: batch[:, 0], max_batch=3, max_wait_s=0.05)
    assert float(batcher.submit(np.array([7.0])).result(timeout=5)[0][0]) == 7.0
    futures = [batcher.submit(np.array([float(i)])) for i in range(7)]
    assert [float(f.result(timeout=5)[0][0]) for f in futures] == list(range(7))
    assert batcher.batch_sizes[0] == 1 and max(batcher.batch_sizes) <= 3
    assert sum(batcher.batch_sizes) == 8


def test_a_model_error_reaches_every_task_of_the_batch_and_the_next_batch_still_runs() -> None:
    fail = threading.Event()
    fail.set()

    def predict(batch: np.ndarray) -> np.ndarray:
        if fail.is_set():
            fail.clear()
            raise MemoryError("out of GPU memory")
        return batch[:, 0]

    batcher = MicroBatcher(predict, max_batch=4, max_wait_s=0.2)
    futures = [batcher.submit(np.array([1.0])) for _ in range(3)]
    for future in futures:
        with pytest.raises(MemoryError, match="GPU memory"):
            future.result(timeout=5)
    assert float(batcher.submit(np.array([2.0])).result(timeout=5)[0][0]) == 2.0


def test_batched_classification_equals_unbatched(
    sessions, tiny_registry: Path, tmp_path: Path
) -> None:
    """classify_instance from 8 threads with a batching classifier: every instance classified,
    with the probability the unbatched model gives its image, and the model ran in batches."""
    images = sorted((DATA / "test" / "NORMAL").iterdir())[:4] + sorted(
        (DATA / "test" / "PNEUMONIA").iterdir())[:4]
    ids = []
    for index, image in enumerate(images):
        folder = tmp_path / str(index)
        folder.mkdir()
        ids.append(store(wrap_image(image), sessions, folder))
    batched = Classifier("pneumonia-transfer", tiny_registry, batch_size=8, batch_wait_s=0.5)
    single = Classifier("pneumonia-transfer", tiny_registry)

    with ThreadPoolExecutor(8) as pool:
        states = list(pool.map(lambda i: classify.classify_instance(sessions, i, lambda: batched), ids))
    assert states == [InstanceState.CLASSIFIED] * 8
    assert max(batched._batcher.batch_sizes) > 1

    with sessions() as session:
        rows = session.execute(select(Instance.path, Result.probability).join(Result)).all()
    assert len(rows) == 8
    from pydicom import dcmread

    from serving.decode import grayscale_pixels
    from serving.image import preprocess

    for path, probability in rows:
        expected = single.predict(preprocess(grayscale_pixels(dcmread(path)))).probability
        assert probability == pytest.approx(expected, abs=1e-5)


def test_pneumo_run_gives_a_batching_inference_worker_threads(tmp_path: Path) -> None:
    """Batches form only among tasks of one process: with a batch size the embedded inference
    worker runs Celery's thread pool with room for two batches; without, one prefork process."""
    from core.settings import Settings
    from ops.supervisor import child_commands

    def inference_command(**overrides) -> list[str]:
        settings = Settings(home_dir=tmp_path, **overrides)
        return next(c.command for c in child_commands(settings) if c.name == "worker-inference")

    batched = inference_command(inference_batch_size=8)
    assert batched[batched.index("-P") + 1] == "threads" and batched[batched.index("-c") + 1] == "16"
    single = inference_command()
    assert "-P" not in single and single[single.index("-c") + 1] == "1"
