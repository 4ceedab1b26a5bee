"""Free ports, waiting, and dcmtk's tools: what tests, drills and benchmarks need to start the
product and its DICOM peers as separate processes. Written once here, so benchmarks import nothing
from tests and tests nothing from benchmarks."""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def free_port() -> int:
    """A TCP port free on the loopback interface right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(predicate: Callable[[], T], timeout_s: float, what: str, interval_s: float = 0.1) -> T:
    """Poll until `predicate` returns something truthy and return it; TimeoutError naming `what`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s} s waiting for {what}")


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


@contextlib.contextmanager
def served_in_thread(app: Any) -> Iterator[int]:
    """An ASGI app (the dashboard) served by uvicorn on a free loopback port in a thread of this
    process, for a browser to load; yields the port, stops the server on leaving."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started, 30, "the dashboard to listen")
        yield port
    finally:
        server.should_exit = True
        thread.join(10)
