"""core.logsafe.RepeatLimit: one message repeated in a flood is logged a few times, with a count
(issue 23 row 6: each of 100,000 unknown PDUs was one log line); distinct messages all pass."""

from __future__ import annotations

import io
import logging

import pytest

from core import logsafe


@pytest.fixture
def logger() -> tuple[logging.Logger, io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logsafe.install([handler])
    log = logging.getLogger("pynetdicom.test-repeats")
    log.addHandler(handler)
    log.propagate = False
    yield log, stream
    log.removeHandler(handler)


def test_a_flood_of_one_message_is_cut_to_the_burst(logger) -> None:
    log, stream = logger
    for _ in range(100_000):
        log.error("Unknown PDU type received '0x08'")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 20


def test_distinct_messages_all_pass(logger) -> None:
    log, stream = logger
    for n in range(500):
        log.warning("association from 192.0.2.1:%d aborted", 40000 + n)
    assert len(stream.getvalue().splitlines()) == 500


def test_the_next_window_says_how_many_were_left_out(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(logsafe.time, "monotonic", lambda: clock[0])
    limit = logsafe.RepeatLimit(burst=2, window_s=60)

    def record() -> logging.LogRecord:
        return logging.LogRecord("node", logging.ERROR, "", 0, "peer %s sent junk", ("A",), None)

    assert [limit.filter(record()) for _ in range(5)] == [True, True, False, False, False]
    clock[0] += 61
    summary = record()
    assert limit.filter(summary)
    assert summary.getMessage() == "peer A sent junk [and 3 more identical in the last 60 s, not logged]"
