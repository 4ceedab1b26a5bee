"""A suspect image (its earlier attempt never finished) is decoded in a child process: the same
tensor as in the worker, the same recorded reasons, and a crash that ends only the child."""

from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from sqlalchemy import select

from core.db import Instance, InstanceState, Result
from serving.decode import DecodeError, grayscale_pixels
from serving.image import preprocess
from tests.conftest import REAL_DICOM
from tests.pipeline.test_bad_input import j2k_bomb
from tests.worker.test_worker import store
from worker import classify
from worker.inference import Classifier
from worker.isolation import decode_in_child

CHEST = REAL_DICOM / "nih_cxr14_dx_implicit.dcm"


def decoder_children() -> list[int]:
    """Pids of this process's `python -m worker.isolation` children."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            command = (proc / "cmdline").read_bytes().split(b"\0")
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if parent == os.getpid() and b"worker.isolation" in command:
            pids.append(int(proc.name))
    return pids


def crash_the_decoder_while(action, signal_number: int = signal.SIGSEGV):
    """Run `action` in a thread, end its decoder child with `signal_number` (what a native decoder
    crashing, or the OOM killer, does to it), and return what `action` returned or raised."""
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = action()
        except Exception as error:  # handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 30
    while not (children := decoder_children()):
        assert time.monotonic() < deadline and thread.is_alive(), "no decoder child was started"
        time.sleep(0.005)
    for pid in children:
        os.kill(pid, signal_number)
    thread.join(60)
    return outcome


def in_process(path: Path) -> np.ndarray:
    return preprocess(grayscale_pixels(dcmread(path)))


@pytest.mark.parametrize("name", ["nih_cxr14_dx_implicit.dcm", "konica_cr_mono1_jpeg.dcm",
                                  "nema_rg1_cr_chest_j2k_lossy.dcm"])
def test_child_gives_the_workers_tensor(name: str) -> None:
    tensor = decode_in_child(REAL_DICOM / name)
    assert tensor.dtype == np.float32
    np.testing.assert_array_equal(tensor, in_process(REAL_DICOM / name))


def test_undecodable_image_gets_the_same_reason_as_in_the_worker() -> None:
    path = REAL_DICOM / "canon_dx_j2k_corrupt.dcm"
    with pytest.raises(DecodeError) as in_worker:
        in_process(path)
    with pytest.raises(DecodeError) as in_child:
        decode_in_child(path)
    assert str(in_child.value) == str(in_worker.value)[:500]


def test_a_crashing_decoder_ends_only_its_child() -> None:
    outcome = crash_the_decoder_while(lambda: decode_in_child(CHEST))
    assert isinstance(outcome.get("error"), DecodeError), outcome
    assert "killed its process (SIGSEGV" in str(outcome["error"])
    # This process (the worker) is alive and the next suspect decodes.
    np.testing.assert_array_equal(decode_in_child(CHEST), in_process(CHEST))


def test_a_decoder_that_needs_more_memory_than_the_limit_fails_in_the_child(tmp_path: Path) -> None:
    """Header and codestream both say 40000x40000 (the worker's filters refuse that; the child
    does not run them): the 3 GB buffer is refused by the child's address-space limit at once."""
    dataset = j2k_bomb()
    dataset.Rows = dataset.Columns = 40000
    dataset.save_as(tmp_path / "bomb.dcm")
    with pytest.raises(DecodeError, match=r"Unable to allocate 2\.98 GiB"):
        decode_in_child(tmp_path / "bomb.dcm", timeout_s=60)


def test_a_decoder_that_does_not_finish_is_stopped() -> None:
    with pytest.raises(DecodeError, match=r"did not finish within 0\.05 s"):
        decode_in_child(CHEST, timeout_s=0.05)
    assert decoder_children() == []


def suspect(sessions, tmp_path: Path, name: str = "nih_cxr14_dx_implicit.dcm") -> int:
    """An instance whose first attempt started and never finished (its worker died)."""
    folder = tmp_path / name
    folder.mkdir(parents=True)
    instance_id = store(REAL_DICOM / name, sessions, folder)
    with sessions() as session, session.begin():
        instance = session.get(Instance, instance_id)
        instance.state, instance.attempts = InstanceState.PROCESSING, 1
    return instance_id


@pytest.fixture
def no_decoding_in_the_worker(monkeypatch) -> None:
    def refuse(dataset):
        raise AssertionError("decoded in the worker's own process")

    monkeypatch.setattr(classify, "grayscale_pixels", refuse)


def test_first_attempt_decodes_in_the_worker(
    sessions, classifier, tmp_path: Path, no_decoding_in_the_worker
) -> None:
    instance_id = store(CHEST, sessions, tmp_path)
    with pytest.raises(AssertionError, match="worker's own process"):
        classify.classify_instance(sessions, instance_id, classifier)


def test_suspect_is_decoded_apart_and_classified(
    sessions, classifier, tmp_path: Path, no_decoding_in_the_worker
) -> None:
    instance_id = suspect(sessions, tmp_path)
    assert classify.classify_instance(sessions, instance_id, classifier) == InstanceState.CLASSIFIED
    with sessions() as session:
        assert session.get(Instance, instance_id).attempts == 2
        result = session.scalars(select(Result).where(Result.instance_id == instance_id)).one()
    expected = classifier().predict(in_process(CHEST)).probability
    assert result.probability == pytest.approx(expected, abs=1e-6)


def test_suspect_that_crashes_its_decoder_fails_alone_with_the_signal(
    sessions, classifier, tmp_path: Path
) -> None:
    crasher = suspect(sessions, tmp_path)
    other = suspect(sessions, tmp_path, "fuji_cr_chest_mono1_explicit.dcm")
    outcome = crash_the_decoder_while(lambda: classify.classify_instance(sessions, crasher, classifier))
    assert outcome.get("value") == InstanceState.FAILED, outcome
    assert classify.classify_instance(sessions, other, classifier) == InstanceState.CLASSIFIED
    with sessions() as session:
        failed = session.get(Instance, crasher)
        assert failed.attempts == 2
        assert "decoding killed its process (SIGSEGV" in failed.reason
        assert session.get(Instance, other).state == InstanceState.CLASSIFIED


def test_a_burst_of_suspects_on_the_thread_pool_is_classified_a_few_children_at_a_time(
    sessions, tiny_registry: Path, tmp_path: Path
) -> None:
    """What a crashed threaded worker leaves: every image it had in flight comes back as a
    suspect at once. Each is decoded apart, at most one child per core runs, and all are
    classified through the shared batches."""
    names = ["nih_cxr14_dx_implicit.dcm", "fuji_cr_chest_mono1_explicit.dcm",
             "konica_cr_mono1_jpeg.dcm", "nema_rg1_cr_chest_j2k_lossy.dcm"] * 2
    suspects = [suspect(sessions, tmp_path / str(index), name) for index, name in enumerate(names)]
    model = Classifier("pneumonia-transfer", tiny_registry, batch_size=8, batch_wait_s=0.05)
    most_children, done = 0, threading.Event()

    def watch() -> None:
        nonlocal most_children
        while not done.is_set():
            most_children = max(most_children, len(decoder_children()))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(len(suspects)) as pool:
            states = list(pool.map(
                lambda instance_id: classify.classify_instance(sessions, instance_id, lambda: model),
                suspects))
    finally:
        done.set()
        watcher.join()
    assert states == [InstanceState.CLASSIFIED] * len(suspects)
    assert 1 <= most_children <= len(os.sched_getaffinity(0))
