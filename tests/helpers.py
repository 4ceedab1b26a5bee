"""Helpers the tests share, written once: ports, waiting, external tools (dcmtk, Orthanc, Chromium).

Fixtures stay in the conftest files; plain functions live here so that a test imports them by
name instead of from a conftest (benchmarks import nothing from tests: they have
benchmarks/common.py).
"""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")


def free_port() -> int:
    """A TCP port free on the loopback interface right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.5) -> T:
    """Poll until `predicate` returns something truthy and return it; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


@functools.cache
def dcmtk(tool: str) -> str:
    """dcmtk's `tool` by absolute path, the first on PATH that is not a Python script.

    pynetdicom installs apps of the same names (storescu, storescp, echoscu) into the venv; with
    the venv activated they come first on PATH, take other options and fail in confusing ways.
    """
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        path = Path(folder or ".") / tool
        if path.is_file() and os.access(path, os.X_OK):
            with path.open("rb") as head:
                if not (line := head.readline(200)).startswith(b"#!") or b"python" not in line:
                    return str(path)
    raise FileNotFoundError(f"dcmtk's {tool} is not on PATH: install dcmtk (.ci/run does)")


def echo(port: int | str, called: str = "PNEUMO", calling: str | None = "STORESCU") -> bool:
    """Whether a DICOM node on 127.0.0.1:`port` answers dcmtk's C-ECHO (`calling` None: echoscu's
    own default AE title)."""
    calling_ae = ["-aet", calling] if calling else []
    command = [dcmtk("echoscu"), *calling_ae, "-aec", called, "127.0.0.1", str(port)]
    return subprocess.run(command, capture_output=True).returncode == 0


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
