"""core.group_commit: many threads' transactions in one commit, and a failing one alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core import group_commit
from core.db import AuditEvent, audit, session_factory
from core.migrate import upgrade


@pytest.fixture
def sessions(tmp_path):
    url = f"sqlite:///{tmp_path / 'group.db'}"
    upgrade(url)
    factory = session_factory(url)
    yield factory
    factory.kw["bind"].dispose()


def _events(sessions) -> list[int]:
    with sessions() as session:
        return sorted(session.scalars(select(AuditEvent.entity_id)))


def test_threads_share_commits_and_each_gets_its_own_value(sessions) -> None:
    writer = group_commit.GroupCommit(sessions)
    gate = threading.Event()
    first_started = threading.Event()

    def slow_first(session: Session) -> int:
        first_started.set()
        gate.wait(10)  # the others queue up behind this group meanwhile
        audit(session, "test", 0, "first")
        return 0

    def unit(number: int):
        def write(session: Session) -> int:
            audit(session, "test", number, "written")
            return number * 10
        return write

    with ThreadPoolExecutor(9) as threads:
        first = threads.submit(writer.run, slow_first)
        assert first_started.wait(10)
        others = [threads.submit(writer.run, unit(n)) for n in range(1, 9)]
        while len(writer._pending) < 8:
            threading.Event().wait(0.01)
        gate.set()
        assert first.result(10) == 0
        assert [f.result(10) for f in others] == [n * 10 for n in range(1, 9)]
    assert _events(sessions) == list(range(9))
    assert list(writer.group_sizes)[:2] == [1, 8]  # the first alone, then eight units, one commit


def test_a_failing_unit_fails_alone(sessions) -> None:
    writer = group_commit.GroupCommit(sessions)
    gate = threading.Event()

    def hold(session: Session) -> None:
        gate.wait(10)

    def good(number: int):
        return lambda session: audit(session, "test", number, "written") or number

    def bad(session: Session) -> None:
        audit(session, "test", 99, "never committed")
        session.flush()
        raise LookupError("instance 99 does not exist")

    with ThreadPoolExecutor(5) as threads:
        held = threads.submit(writer.run, hold)
        futures = [threads.submit(writer.run, unit) for unit in (good(1), bad, good(2))]
        while len(writer._pending) < 3:
            threading.Event().wait(0.01)
        gate.set()
        held.result(10)
        assert futures[0].result(10) == 1 and futures[2].result(10) == 2
        with pytest.raises(LookupError, match="instance 99"):
            futures[1].result(10)
    assert _events(sessions) == [1, 2]  # the bad unit's row rolled back, the others' kept once
    assert list(writer.group_sizes)[:2] == [1, 3]


def test_a_lone_unit_runs_in_its_callers_thread_and_the_writer_thread_ends(sessions) -> None:
    writer = group_commit.GroupCommit(sessions)
    assert writer.run(lambda session: threading.current_thread()) is threading.current_thread()
    assert not writer._writer_running  # nothing queued: no thread was started
    gate = threading.Event()
    with ThreadPoolExecutor(2) as threads:
        held = threads.submit(writer.run, lambda session: gate.wait(10))
        while not writer._busy:
            threading.Event().wait(0.01)
        queued = threads.submit(writer.run, lambda session: threading.current_thread().name)
        gate.set()
        assert held.result(10) is True and queued.result(10) == "group-commit"
    for _ in range(500):
        if not writer._writer_running:
            break
        threading.Event().wait(0.01)
    assert not writer._writer_running  # the queue drained, its thread ended
    assert writer.run(lambda session: audit(session, "test", 2, "b") or "two") == "two"
    assert _events(sessions) == [2]


def test_writer_for_is_one_per_session_factory(sessions, tmp_path) -> None:
    other = session_factory(f"sqlite:///{tmp_path / 'other.db'}")
    assert group_commit.writer_for(sessions) is group_commit.writer_for(sessions)
    assert group_commit.writer_for(other) is not group_commit.writer_for(sessions)
    with sessions() as session:
        assert session.scalar(select(func.count()).select_from(AuditEvent)) == 0
