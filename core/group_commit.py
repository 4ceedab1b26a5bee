"""Group commit: the short transactions of many threads committed together, one commit for all.

Why: a worker on Celery's thread pool classifies a batch of images at once (worker.batching), and
each image claims its instance before the model and records its outcome after it: two
transactions, each a session, a BEGIN and a COMMIT (an fsync on SQLite). At 224 px that was a
third of the worker's time per image (docs/benchmarks.md). Here the threads hand their transaction
to one writer thread and wait; the writer runs everything that has arrived in one transaction and
commits once. No timer: while one group commits the next one gathers, so a lone image waits for
nothing but its own commit.

Each unit is a function of a session, all-or-nothing as before: when any unit of a group raises,
or the commit fails, the whole group is rolled back and each unit is run again in a transaction
of its own, so one bad unit fails alone and the others' outcomes are the ones they would have had.
A caller's `run` returns only after its unit is committed (a Celery task acknowledges after that).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)

T = TypeVar("T")
Unit = Callable[[Session], object]
MAX_GROUP = 64  # units per transaction: bounds how long a group's row locks are held
IDLE_S = 10.0  # the writer thread ends after this long without work (the next unit starts one)


class GroupCommit:
    """One writer thread that commits the units of any number of threads in shared transactions."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        # Weakly: a writer must not keep its session factory (its engine, its pool) alive.
        self._sessions = weakref.ref(sessions)
        self._pending: queue.SimpleQueue[tuple[Unit, Future]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running = False
        self.group_sizes: list[int] = []  # the latest groups' sizes (tests, benchmarks); bounded

    def run(self, unit: Callable[[Session], T], timeout_s: float | None = None) -> T:
        """`unit(session)` committed; its value, or the exception it raised (then not committed)."""
        future: Future = Future()
        with self._lock:
            self._pending.put((unit, future))
            if not self._running:  # the thread ends when idle: a process keeps none it does not use
                self._running = True
                threading.Thread(target=self._loop, name="group-commit", daemon=True).start()
        return future.result(timeout=timeout_s)

    def _loop(self) -> None:
        while True:
            try:
                group = [self._pending.get(timeout=IDLE_S)]
            except queue.Empty:
                with self._lock:  # run() puts under this lock: nothing can arrive unseen
                    if self._pending.empty():
                        self._running = False
                        return
                continue
            while len(group) < MAX_GROUP:
                try:
                    group.append(self._pending.get_nowait())
                except queue.Empty:
                    break
            self.group_sizes[:] = [*self.group_sizes[-999:], len(group)]
            if len(group) == 1 or not self._run_together(group):
                for unit, future in group:
                    self._run_alone(unit, future)

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
