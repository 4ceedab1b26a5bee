"""Group commit: the short transactions of many threads committed together, one commit for all.

Why: a worker on Celery's thread pool classifies a batch of images at once (worker.batching), and
each image claims its instance before the model and records its outcome after it: two
transactions, each a session, a BEGIN and a COMMIT (an fsync on SQLite). At 224 px that was a
third of the worker's time per image (docs/benchmarks.md). Here the threads hand their transaction
to one writer thread and wait; the writer runs everything that has arrived in one transaction and
commits once. No timer: while one transaction commits the next group gathers, and a thread that
finds nothing running commits its own unit itself, so a lone image waits for nothing.

Each unit is a function of a session, all-or-nothing as before: when any unit of a group raises,
or the commit fails, the whole group is rolled back and each unit is run again in a transaction
of its own, so one bad unit fails alone and the others' outcomes are the ones they would have had.
A caller's `run` returns only after its unit is committed (a Celery task acknowledges after that).
"""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

T = TypeVar("T")
Unit = Callable[[Session], object]
MAX_GROUP = 64  # units per transaction: bounds how long a group's row locks are held


class GroupCommit:
    """Commits the units of any number of threads, one at a time or in shared transactions."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        # Weakly: a writer must not keep its session factory (its engine, its pool) alive.
        self._sessions = weakref.ref(sessions)
        self._pending: deque[tuple[Unit, Future]] = deque()
        self._lock = threading.Lock()
        self._busy = False  # a unit or group is running: at most one transaction at a time
        self._writer_running = False
        self.group_sizes: deque[int] = deque(maxlen=1000)  # the latest groups' sizes (tests, benchmarks)

    def run(self, unit: Callable[[Session], T], timeout_s: float | None = None) -> T:
        """`unit(session)` committed; its value, or the exception it raised (then not committed).

        With nothing else running, the caller runs its unit itself (a lone worker thread pays no
        hand-over); otherwise it queues it for the writer thread, which commits what has queued
        meanwhile as one group."""
        future: Future = Future()
        with self._lock:
            inline = not self._busy
            if inline:
                self._busy = True
            else:
                self._pending.append((unit, future))
                self._start_writer()
        if inline:
            try:
                self.group_sizes.append(1)
                with self._session() as session, session.begin():
                    return unit(session)
            finally:
                with self._lock:
                    self._busy = False
                    if self._pending:
                        self._start_writer()
        return future.result(timeout=timeout_s)

    def _start_writer(self) -> None:
        """Under the lock: a writer thread, unless one runs (it ends when nothing is queued)."""
        if not self._writer_running:
            self._writer_running = True
            threading.Thread(target=self._loop, name="group-commit", daemon=True).start()

    def _loop(self) -> None:
        while True:
            with self._lock:
                if self._busy or not self._pending:  # a caller's own unit runs: it restarts us
                    self._writer_running = False
                    return
                self._busy = True
                group = [self._pending.popleft() for _ in range(min(MAX_GROUP, len(self._pending)))]
            try:
                self.group_sizes.append(len(group))
                if len(group) == 1 or not self._run_together(group):
                    for unit, future in group:
                        self._run_alone(unit, future)
            finally:
                with self._lock:
                    self._busy = False

    def _session(self) -> Session:
        sessions = self._sessions()
        if sessions is None:
            raise RuntimeError("the session factory of this group commit is gone")
        return sessions()

    def _run_together(self, group: list[tuple[Unit, Future]]) -> bool:
        """All units in one transaction; False (nothing committed) if any of them, or the commit,
        failed."""
        try:
            with self._session() as session, session.begin():
                values = [unit(session) for unit, _ in group]
        except Exception as error:  # each unit is run again alone, to find whose it was
            log.info("a group of %d transactions rolled back (%s); each runs alone",
                     len(group), type(error).__name__)
            return False
        for (_, future), value in zip(group, values, strict=True):
            future.set_result(value)
        return True

    def _run_alone(self, unit: Unit, future: Future) -> None:
        try:
            with self._session() as session, session.begin():
                value = unit(session)
        except BaseException as error:  # the caller's own error, raised in its thread
            future.set_exception(error)
        else:
            future.set_result(value)


_writers: weakref.WeakKeyDictionary[sessionmaker, tuple[int, GroupCommit]] = weakref.WeakKeyDictionary()
_writers_lock = threading.Lock()


def writer_for(sessions: sessionmaker[Session]) -> GroupCommit:
    """The process's writer for this session factory (a forked child starts its own: the parent's
    thread does not exist in it)."""
    with _writers_lock:
        pid, writer = _writers.get(sessions, (None, None))
        if writer is None or pid != os.getpid():
            writer = GroupCommit(sessions)
            _writers[sessions] = (os.getpid(), writer)
        return writer
