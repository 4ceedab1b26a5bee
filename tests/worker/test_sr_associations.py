"""SR delivery on shared associations (issue 21 item 2), against a real pynetdicom PACS: SRs to
one PACS reuse an association, at most `per_destination` at once, and each SR's state is its own
(a refused or aborted SR never marks another delivered, nor is another lost with it).

The SR itself is stubbed (`write_sr` returns a small SR file per delivery): what is tested is the
state machine and the associations, not the report's content (tests/pipeline/test_delivery.py).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import ComprehensiveSRStorage

from core.db import Delivery, DeliveryState, Study
from core.migrate import upgrade
from core.settings import Settings
from devtools.processes import free_port, wait_for
from tests.conftest import REPO
from worker import delivery as sr_delivery


class Pacs:
    """A pynetdicom storage SCP that counts associations (opened, at once) and stores; answers
    `fail` SOP instances with 0xA700 and aborts the association on `abort` ones (`abort_once`:
    only their first time)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.port = free_port()
        self.delay_s = delay_s
        self.fail: set[str] = set()
        self.abort: set[str] = set()
        self.abort_once: set[str] = set()
        self.stored: list[str] = []
        self.opened = self.open = self.most_open = self.released = 0
        self._lock = threading.Lock()
        ae = AE(ae_title="PACS")
        ae.add_supported_context(ComprehensiveSRStorage, ExplicitVRLittleEndian)
        handlers = [(evt.EVT_ESTABLISHED, self._established), (evt.EVT_RELEASED, self._closed),
                    (evt.EVT_ABORTED, self._closed), (evt.EVT_C_STORE, self._store),
                    (evt.EVT_RELEASED, self._released)]
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers)

    @property
    def address(self) -> str:
        return f"PACS@127.0.0.1:{self.port}"

    def _established(self, _event) -> None:
        with self._lock:
            self.opened += 1
            self.open += 1
            self.most_open = max(self.most_open, self.open)

    def _closed(self, _event) -> None:
        with self._lock:
            self.open -= 1

    def _released(self, _event) -> None:
        with self._lock:
            self.released += 1

    def _store(self, event) -> int:
        time.sleep(self.delay_s)
        uid = str(event.request.AffectedSOPInstanceUID)
        if uid in self.abort or uid in self.abort_once:
            self.abort_once.discard(uid)
            event.assoc.abort()
            return 0xC000
        if uid in self.fail:
            return 0xA700
        with self._lock:
            self.stored.append(uid)
        return 0x0000


@pytest.fixture
def pacs():
    peer = Pacs()
    yield peer
    peer.server.shutdown()


@pytest.fixture
def database_url(tmp_path: Path) -> str:
    """SQLite only: the state machine is the same SQL on both back-ends (test_delivery.py runs both)."""
    url = f"sqlite:///{tmp_path / 'pneumo.db'}"
    upgrade(url)
    return url


def sr_file(folder: Path) -> tuple[Path, str]:
    uid = generate_uid()
    dataset = Dataset()
    dataset.SOPClassUID, dataset.SOPInstanceUID, dataset.Modality = ComprehensiveSRStorage, uid, "SR"
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = ComprehensiveSRStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = uid
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{uid}.dcm"
    dataset.save_as(path, enforce_file_format=True)
    return path, uid


def deliveries(sessions, tmp_path: Path, destination: str, count: int,
               monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, str]]:
    """`count` pending deliveries to `destination`, each with its own SR file: (id, SR UID)."""
    made, paths = [], {}
    with sessions() as session, session.begin():
        for _ in range(count):
            study = Study(study_instance_uid=generate_uid())
            session.add(study)
            session.flush()
            path, uid = sr_file(tmp_path / "sr")
            row = Delivery(study_id=study.id, model_name="m", model_version="1", destination=destination,
                           sr_sop_instance_uid=uid, state=DeliveryState.PENDING, attempts=0)
            session.add(row)
            session.flush()
            made.append((row.id, uid))
            paths[row.id] = path
    monkeypatch.setattr(sr_delivery, "write_sr", lambda _sessions, delivery_id, _dir, *_: paths[delivery_id])
    return made


def state(sessions, delivery_id: int) -> tuple[str, str | None]:
    with sessions() as session:
        row = session.get(Delivery, delivery_id)
        return row.state, row.last_error


def settings_for(pacs: Pacs, tmp_path: Path, **values) -> Settings:
    return Settings(home=tmp_path / "home", pacs=pacs.address, delivery_max_attempts=3,
                    delivery_backoff_s=1, network_timeout_s=5, **values)


def test_srs_to_one_pacs_share_one_association(sessions, pacs, tmp_path, monkeypatch) -> None:
    """Was one association per SR (0.3-1 SR/s after a burst); now one for all of them."""
    settings = settings_for(pacs, tmp_path)
    made = deliveries(sessions, tmp_path, pacs.address, 5, monkeypatch)
    pool = sr_delivery.pacs_sender(settings)
    try:
        outcomes = [sr_delivery.attempt_delivery(sessions, i, settings, pool.send).state for i, _ in made]
    finally:
        pool.close()
    assert outcomes == ["delivered"] * 5
    assert [state(sessions, i)[0] for i, _ in made] == [DeliveryState.DELIVERED] * 5
    assert pacs.stored == [uid for _, uid in made]
    assert pacs.opened == 1


def test_a_refused_sr_in_a_shared_association_is_retried_alone(sessions, pacs, tmp_path, monkeypatch) -> None:
    """The PACS refuses the second SR: it alone is `retrying` with the status; the others, before
    and after it on the same association, are delivered; its retry delivers it."""
    settings = settings_for(pacs, tmp_path)
    made = deliveries(sessions, tmp_path, pacs.address, 3, monkeypatch)
    pacs.fail.add(made[1][1])
    pool = sr_delivery.pacs_sender(settings)
    try:
        outcomes = [sr_delivery.attempt_delivery(sessions, i, settings, pool.send).state for i, _ in made]
        assert outcomes == ["delivered", "retrying", "delivered"]
        assert state(sessions, made[1][0]) == (DeliveryState.RETRYING, f"{pacs.address} answered "
                                               "C-STORE status 0xA700")
        assert pacs.stored == [made[0][1], made[2][1]] and pacs.opened == 1
        pacs.fail.clear()
        assert sr_delivery.attempt_delivery(sessions, made[1][0], settings, pool.send).state == "delivered"
    finally:
        pool.close()
    assert [state(sessions, i)[0] for i, _ in made] == [DeliveryState.DELIVERED] * 3


def test_an_sr_the_peer_aborts_is_not_delivered_and_the_others_are(sessions, pacs, tmp_path,
                                                                      monkeypatch) -> None:
    """The PACS aborts the association on the second SR every time: that SR ends `dead` after
    its tries, never `delivered`; the third goes on a new association and is delivered. An abort
    once (a PACS that closed a kept association) costs the SR nothing: it is sent again fresh."""
    settings = settings_for(pacs, tmp_path)
    made = deliveries(sessions, tmp_path, pacs.address, 4, monkeypatch)
    pacs.abort.add(made[1][1])
    pacs.abort_once.add(made[3][1])
    pool = sr_delivery.pacs_sender(settings)
    try:
        outcomes = [sr_delivery.attempt_delivery(sessions, i, settings, pool.send).state for i, _ in made]
        assert outcomes == ["delivered", "retrying", "delivered", "delivered"]
        for _ in range(2):
            sr_delivery.attempt_delivery(sessions, made[1][0], settings, pool.send)
    finally:
        pool.close()
    assert state(sessions, made[1][0])[0] == DeliveryState.DEAD
    assert [state(sessions, i)[0] for i, _ in (made[0], made[2], made[3])] == [DeliveryState.DELIVERED] * 3
    assert sorted(pacs.stored) == sorted(uid for _, uid in (made[0], made[2], made[3]))


def test_associations_per_destination_are_bounded(tmp_path) -> None:
    """Eight SRs sent at once by eight threads through one pool bounded to 2: never more than
    2 associations open at the PACS, none opened beyond those 2, every SR stored."""
    pacs = Pacs(delay_s=0.1)
    pool = sr_delivery.AssociationPool("PNEUMO", 5, idle_s=30, per_destination=2)
    files = [sr_file(tmp_path) for _ in range(8)]
    try:
        threads = [threading.Thread(target=pool.send, args=(path, pacs.address)) for path, _ in files]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        pool.close()
        pacs.server.shutdown()
    assert sorted(pacs.stored) == sorted(uid for _, uid in files)
    assert pacs.most_open <= 2 and pacs.opened <= 2


def test_an_idle_association_is_released(pacs, tmp_path) -> None:
    """A PACS is not held open between bursts: released after `idle_s`, a later SR opens anew."""
    pool = sr_delivery.AssociationPool("PNEUMO", 5, idle_s=0.2, per_destination=1)
    try:
        pool.send(sr_file(tmp_path)[0], pacs.address)
        wait_for(lambda: pacs.released == 1, 10, "the idle association's release")
        pool.send(sr_file(tmp_path)[0], pacs.address)
    finally:
        pool.close()
    assert pacs.opened == 2 and len(pacs.stored) == 2


def test_pneumo_run_bounds_its_delivery_worker_by_the_setting(tmp_path) -> None:
    from ops.supervisor import child_commands

    settings = Settings(home=tmp_path, delivery_associations_per_destination=3)
    (worker,) = [child for child in child_commands(settings) if child.name == "worker-delivery"]
    assert worker.command[worker.command.index("-c") + 1] == "3"


def test_the_delivery_worker_loads_no_model_code() -> None:
    """worker.tasks imported Keras and TensorFlow: the delivery worker's children passed
    delivery_worker_max_memory_mb and Celery replaced one after nearly every SR (0.5 SR/s)."""
    code = "import sys, worker.tasks; print(sorted({'keras', 'tensorflow'} & set(sys.modules)))"
    output = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            check=True, timeout=120).stdout
    assert output.strip() == "[]"
