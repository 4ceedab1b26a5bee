"""Helpers the tests share, written once: ports, waiting, external tools (dcmtk, Orthanc, Chromium).

Fixtures stay in the conftest files; plain functions live here so that a test imports them by
name instead of from a conftest. Ports, waiting and dcmtk come from devtools.processes, which
the drills and benchmarks use too (benchmarks import nothing from tests).
"""

from __future__ import annotations

import shutil
import signal
import subprocess

import pytest

from devtools.processes import dcmtk, echo, free_port, wait_for

__all__ = ["dcmtk", "echo", "free_port", "interrupt", "requires_program", "wait_for"]


def interrupt(process: subprocess.Popen, timeout_s: float = 60) -> str:
    """Ctrl-C (SIGINT), as an operator would stop `pneumo run`; killed if it has not exited within
    `timeout_s`. Its captured output."""
    process.send_signal(signal.SIGINT)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
    return output


def requires_program(program: str, package: str) -> pytest.MarkDecorator:
    """The one rule for external programs a test needs: skipped with the reason where missing.

    `.ci/run` installs every one of them, so CI runs these tests; a developer without them sees
    which Debian package to install instead of a failure that looks like a product bug.
    """
    return pytest.mark.skipif(
        shutil.which(program) is None, reason=f"{program} missing: install Debian's {package} (.ci/run does)"
    )
