"""`pneumo run` as an operator meets it: it says "listening" only when it is, stops with the reason
when a child cannot start (a port in use), and Ctrl-C stops the parts together, the broker last."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.helpers import free_port


def run_env(tmp_path: Path, models: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PNEUMO_HOME": str(tmp_path / "home"), "PNEUMO_HOST": "127.0.0.1",
           "PNEUMO_PORT": str(free_port()), "PNEUMO_DASHBOARD_PORT": str(free_port()),
           "PNEUMO_MODELS_DIR": str(models), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}
    for name in ("PNEUMO_DATABASE_URL", "PNEUMO_BROKER_URL", "PNEUMO_SETTINGS_FILE"):
        env.pop(name, None)
    return env


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("variable", "setting_named"), [
    ("PNEUMO_PORT", "PNEUMO_HOST/PNEUMO_PORT"),
    ("PNEUMO_DASHBOARD_PORT", "PNEUMO_DASHBOARD_HOST/PNEUMO_DASHBOARD_PORT"),
])
def test_a_port_in_use_stops_the_run_with_the_reason_and_never_says_listening(
    tmp_path: Path, tiny_registry: Path, variable: str, setting_named: str
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = run_env(tmp_path, tiny_registry, **{variable: str(port)})
        if variable == "PNEUMO_DASHBOARD_PORT":
            env["PNEUMO_DASHBOARD_HOST"] = "127.0.0.1"
        try:
            result = subprocess.run([sys.executable, "-m", "ops.cli", "run"], env=env, cwd=REPO,
                                    capture_output=True, text=True, timeout=240)
        except subprocess.TimeoutExpired as expired:  # the old supervisor restarts it forever
            pytest.fail(f"`pneumo run` kept running on a port in use: {expired.stdout!r}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "listening" not in result.stdout
    assert f"cannot listen on 127.0.0.1:{port} ({setting_named}): Address already in use" in result.stderr
    assert "restarting" not in result.stderr
    assert result.stdout.rstrip().endswith("pneumo: stopped")


@pytest.mark.timeout(400)
def test_ctrl_c_stops_node_workers_scheduler_then_the_broker(tmp_path: Path, tiny_registry: Path) -> None:
    """The terminal's Ctrl-C reaches the whole foreground process group: the bundled Redis must
    not be in it, or it dies first and every worker logs `Connection to broker lost`."""
    env = run_env(tmp_path, tiny_registry)
    home = Path(env["PNEUMO_HOME"])
    process = subprocess.Popen([sys.executable, "-m", "ops.cli", "run"], env=env, cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # a process group of its own, as a shell gives
    try:
        listening = process.stdout.readline()
        while listening and "listening" not in listening:
            listening = process.stdout.readline()
        assert "listening" in listening
        # Both workers connected to the broker and waiting for work.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not all(
            "ready." in (home / f"{name}.log").read_text(errors="replace")
            for name in ("worker-inference", "worker-delivery")
            if (home / f"{name}.log").exists()
        ):
            time.sleep(1)
        time.sleep(2)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C does
        output, _ = process.communicate(timeout=180)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    assert process.returncode == 0, output
    assert output.rstrip().endswith("pneumo: stopped")
    for name in ("worker-inference", "worker-delivery", "scheduler"):
        log = (home / f"{name}.log").read_text(errors="replace")
        assert "ready." in log or name == "scheduler"
        assert "Connection to broker lost" not in log, f"{name}.log:\n{log[-3000:]}"
        assert "Traceback" not in log, f"{name}.log:\n{log[-3000:]}"
    assert "Received SIGINT" not in (home / "redis.log").read_text()
    order = [line.split("stopping ", 1)[1] for line in output.splitlines() if " stopping " in line]
    # All children at once (one after the other took 8-13 s idle), the broker after them all.
    assert order == ["node, worker-inference, worker-delivery, scheduler, dashboard",
                     "the bundled Redis"], output


def test_the_node_alone_on_a_port_in_use_exits_with_the_reason_and_the_cannot_start_status(
    tmp_path: Path, tiny_registry: Path
) -> None:
    from ops.supervisor import EXIT_CANNOT_START, PERMANENT_EXIT_CODES

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "ops.cli", "node"], cwd=REPO, capture_output=True,
                                text=True, timeout=120,
                                env=run_env(tmp_path, tiny_registry, PNEUMO_PORT=str(port)))
    assert result.returncode == EXIT_CANNOT_START and EXIT_CANNOT_START in PERMANENT_EXIT_CODES
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: cannot listen on 127.0.0.1:{port} (PNEUMO_HOST/PNEUMO_PORT): Address already in use")
    assert "Traceback" not in result.stderr and "listening" not in result.stderr
