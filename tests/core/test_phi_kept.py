"""core.phi keeps what a library names itself: a dead Celery pool child's name, pid and signal
(issue 22: it was logged as `Process <withheld>`), while a header value in the same shape is still
withheld."""

from __future__ import annotations

import io
import logging

import pytest

from core import phi
from tests.core.test_phi import captured  # noqa: F401 - the fixture


@pytest.mark.parametrize("status", ["signal 9 (SIGKILL)", "signal 15 (SIGTERM)", "exitcode 1", "signal 64"])
def test_a_dead_pool_child_is_logged_with_its_exit_signal(captured: io.StringIO, status: str) -> None:  # noqa: F811
    # billiard.pool.Pool._join_exited_workers, word for word
    logging.getLogger("celery.concurrency").error("Process %r pid:%r exited with %r",
                                                  "ForkPoolWorker-2", 4242, status)
    assert f"Process 'ForkPoolWorker-2' pid:4242 exited with '{status}'" in captured.getvalue()


@pytest.mark.parametrize(("name", "status"), [
    ("Zyx^Jane", "signal 9 (SIGKILL)"),
    ("ForkPoolWorker-2", "signal 9 (SIGKILL)' Zyx^Jane '"),
    ("ForkPoolWorker-2' Zyx '", "exitcode 1"),
])
def test_the_same_shape_carrying_anything_else_is_still_withheld(
    captured: io.StringIO, name: str, status: str  # noqa: F811
) -> None:
    logging.getLogger("billiard").error("Process %r pid:%r exited with %r", name, 7, status)
    text = captured.getvalue()
    assert "zyx" not in text.lower() and phi.WITHHELD in text


def test_the_unknown_pdu_type_is_kept(captured: io.StringIO) -> None:  # noqa: F811
    logging.getLogger("pynetdicom.dul").error("Unknown PDU type received '0x08'")  # as dul.py words it
    logging.getLogger("pynetdicom.dul").error("Unknown PDU type received 'Zyx'")
    text = captured.getvalue()
    assert "Unknown PDU type received '0x08'" in text and "zyx" not in text.lower()
