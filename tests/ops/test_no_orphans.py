"""Nothing `pneumo run` starts outlives it, however it ends (issue 23 row 10: after SIGTERM and,
1 s later, SIGKILL, as a service manager does when a stop times out, the bundled Redis and the
beat scheduler ran on for over an hour with parent PID 1)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO
from tests.ops.test_supervisor import run_env


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    """The pids still alive after `seconds` (polled, so a quick exit returns at once)."""
    deadline = time.monotonic() + seconds
    while (alive := [pid for pid in pids if _alive(pid)]) and time.monotonic() < deadline:
        time.sleep(0.1)
    return alive


def test_a_child_dies_with_its_killed_parent() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", "import subprocess, sys, time\n"
         "from ops.supervisor import dies_with_us\n"
         "child = subprocess.Popen(dies_with_us(['sleep', '120']))\n"
         "print(child.pid, flush=True)\n"
         "time.sleep(120)\n"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )
    try:
        child = int(parent.stdout.readline())
        deadline = time.monotonic() + 30
        while psutil.Process(child).name() != "sleep" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert psutil.Process(child).name() == "sleep"  # the launcher became the command
    finally:
        parent.kill()
        parent.wait()
    leftover = _gone_within([child], 5)
    for pid in leftover:
        os.kill(pid, signal.SIGKILL)
    assert leftover == []


def _processes_of(home: Path, besides: int) -> list[psutil.Process]:
    """Every process whose environment or command line names this run's home."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if process.pid == besides:
            continue
        try:
            environ = Path(f"/proc/{process.pid}/environ").read_bytes()
        except OSError:
            continue
        if f"PNEUMO_HOME={home}".encode() in environ or str(home) in " ".join(process.info["cmdline"] or []):
            found.append(process)
    return found


@pytest.mark.timeout(300)
def test_nothing_outlives_a_killed_run(tmp_path: Path, tiny_registry: Path) -> None:
    env = run_env(tmp_path, tiny_registry)
    home = Path(env["PNEUMO_HOME"])
    run = subprocess.Popen([sys.executable, "-m", "ops.cli", "run"], env=env, cwd=REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    left_over: list[str] = ["not run"]
    try:
        for line in run.stdout:
            if "listening" in line:
                break
        # Up and idle, both workers waiting for tasks: from here a graceful stop took 8-13 s, so
        # the SIGKILL 1 s into it used to leave the rest running.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not all(
            (home / f"{name}.log").exists() and "ready." in (home / f"{name}.log").read_text(errors="replace")
            for name in ("worker-inference", "worker-delivery")
        ):
            time.sleep(0.5)
        started = _processes_of(home, besides=run.pid)
        names = " ".join(" ".join(p.info["cmdline"] or []) for p in started)
        assert "redis-server" in names and " beat " in names and " worker " in names, names
        run.send_signal(signal.SIGTERM)  # as a service manager stops it ...
        time.sleep(1)
        run.kill()  # ... and kills it when the stop takes longer than it waits
        run.wait()
        left = _gone_within([p.pid for p in started], 5)
        left += [p.pid for p in _processes_of(home, besides=run.pid) if p.pid not in left and _alive(p.pid)]
        left_over = [" ".join(psutil.Process(pid).cmdline())[:120] for pid in left if _alive(pid)]
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        for process in _processes_of(home, besides=run.pid):
            process.kill()
    assert left_over == []
