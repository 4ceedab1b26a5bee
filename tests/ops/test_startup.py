"""How commands start: the node without Keras or TensorFlow, and one line for invalid settings."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from core.db import Instance, InstanceState, session_factory
from ops.send import wrap_image
from tests.conftest import DATA, REDIS_TEST_URL, REPO
from tests.helpers import dcmtk, free_port, wait_for

IMAGE = sorted((DATA / "test" / "NORMAL").iterdir())[0]
BROKER = f"{REDIS_TEST_URL}/13"
NO_MODEL_LIBRARIES = '''
"""Stands for a virtual environment without the model libraries (building a second venv in CI
costs minutes): they are not found, so `import keras` raises ImportError and `find_spec` says
None, as there."""
import sys
from importlib.machinery import PathFinder

BLOCKED = {"tensorflow", "keras", "jax", "torch"}


class WithoutModelLibraries(PathFinder):
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        return PathFinder.find_spec(name, path, target)


sys.meta_path[sys.meta_path.index(PathFinder)] = WithoutModelLibraries
'''


def without_model_libraries(tmp_path: Path, **settings: str) -> dict[str, str]:
    """The environment of a host without TensorFlow, Keras, JAX or PyTorch and no KERAS_BACKEND."""
    blocker = tmp_path / "no-model-libraries"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(NO_MODEL_LIBRARIES)
    env = {key: value for key, value in os.environ.items()
           if not key.startswith("PNEUMO_") and key != "KERAS_BACKEND"}
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), str(REPO), env.get("PYTHONPATH", "")])
    return {**env, **settings}


def test_the_blocker_blocks(tmp_path: Path) -> None:
    """Else the test below would pass on a host with TensorFlow for the wrong reason."""
    code = ("import importlib.util\n"
            "assert all(importlib.util.find_spec(n) is None for n in ('tensorflow', 'jax', 'torch'))\n"
            "import keras")
    result = subprocess.run([sys.executable, "-c", code], env=without_model_libraries(tmp_path),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "ModuleNotFoundError: No module named 'keras'" in result.stderr


def test_node_runs_and_receives_without_keras_or_tensorflow(tmp_path: Path) -> None:
    import redis

    redis.Redis.from_url(BROKER).flushdb()
    port = free_port()
    env = without_model_libraries(
        tmp_path, PNEUMO_HOME=str(tmp_path / "home"), PNEUMO_PORT=str(port), PNEUMO_HOST="127.0.0.1",
        PNEUMO_BROKER_URL=BROKER)
    upgrade = subprocess.run([sys.executable, "-m", "ops.cli", "db", "upgrade"], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    assert upgrade.returncode == 0, upgrade.stderr
    log = (tmp_path / "node.log").open("w")
    node = subprocess.Popen([sys.executable, "-m", "ops.cli", "node"], env=env, cwd=REPO,
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        def echo() -> bool:
            if node.poll() is not None:
                raise AssertionError(f"the node exited: {(tmp_path / 'node.log').read_text()[-2000:]}")
            return subprocess.run([dcmtk("echoscu"), "-aec", "PNEUMO", "127.0.0.1", str(port)],
                                  capture_output=True, timeout=30).returncode == 0

        wait_for(echo, 120, "the node to answer C-ECHO")
        dataset = wrap_image(IMAGE)
        path = tmp_path / "image.dcm"
        dataset.save_as(path, enforce_file_format=True)
        stored = subprocess.run([dcmtk("storescu"), "-aec", "PNEUMO", "127.0.0.1", str(port), str(path)],
                                capture_output=True, text=True, timeout=60)
        assert stored.returncode == 0, stored.stderr
    finally:
        node.terminate()
        node.wait(timeout=30)
        log.close()
    with session_factory(f"sqlite:///{tmp_path / 'home' / 'pneumo.db'}")() as session:
        instance = session.scalar(select(Instance))
    assert instance is not None and instance.sop_instance_uid == dataset.SOPInstanceUID
    assert instance.state == InstanceState.QUEUED  # queued by task name: the workers' message is there
    assert redis.Redis.from_url(BROKER).llen("inference-cpu") == 1
    redis.Redis.from_url(BROKER).flushdb()
    assert "Traceback" not in (tmp_path / "node.log").read_text()


@pytest.mark.parametrize("command", ["node", "worker", "scheduler", "status", "dashboard", "run",
                                     "db upgrade", "resend 1.2.3", "retention --older-than-days 1"])
def test_invalid_settings_are_one_line_for_every_command(tmp_path: Path, command: str) -> None:
    env = {**os.environ, "PNEUMO_HOME": str(tmp_path), "PNEUMO_PORT": "abc",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-m", "ops.cli", *command.split()], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "error: invalid settings: PNEUMO_PORT: Input should be a valid integer, unable to parse string "
        "as an integer"], result.stderr
    assert "abc" not in result.stderr  # a value is never echoed: it could be a password
