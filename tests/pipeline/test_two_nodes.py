"""More than one machine, run here as separate processes (issue 21 item 6): two `pneumo node`s and
two `pneumo worker`s sharing one PostgreSQL database and one Redis broker. Images go to either
node, some to both at once; every image must be stored once and reach a terminal state once."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import redis
from pydicom import dcmread
from sqlalchemy import select

from core.db import TERMINAL_STATES, AuditEvent, Instance, Result, session_factory
from ops.send import wrap_image
from tests.conftest import DATA, REDIS_TEST_URL, REPO
from tests.helpers import dcmtk, echo, free_port, wait_for
from tests.pipeline.conftest import embedded_env

IMAGES = [*sorted((DATA / "test" / "NORMAL").iterdir())[:6],
          *sorted((DATA / "test" / "PNEUMONIA").iterdir())[:6]]


def started(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen([sys.executable, "-m", "ops.cli", *command], env=env, cwd=REPO,
                            stdout=handle, stderr=subprocess.STDOUT)


def store(port: int, files: list[Path]) -> subprocess.Popen:
    return subprocess.Popen([dcmtk("storescu"), "-aet", "STORESCU", "-aec", "PNEUMO", "127.0.0.1", str(port),
                             *map(str, files)], stderr=subprocess.PIPE)


@pytest.mark.timeout(900)
def test_two_nodes_and_two_workers_share_the_database_and_broker(
    tmp_path: Path, tiny_registry: Path, database_url_postgres_fresh: str
) -> None:
    broker = f"{REDIS_TEST_URL}/11"
    redis.Redis.from_url(broker).flushdb()
    envs = []
    for name in ("a", "b"):
        env = embedded_env(tmp_path / f"home-{name}", "PACS@127.0.0.1:1", tiny_registry)
        env.update(PNEUMO_DATABASE_URL=database_url_postgres_fresh, PNEUMO_BROKER_URL=broker,
                   PNEUMO_NODE_PROCESSES="2", PNEUMO_PORT=str(free_port()), PNEUMO_PACS="")
        envs.append(env)
    subprocess.run([sys.executable, "-m", "ops.cli", "db", "upgrade"], env=envs[0], cwd=REPO, check=True,
                   capture_output=True)
    processes = [started(["node"], env, tmp_path / f"node-{i}.log") for i, env in enumerate(envs)]
    processes += [started(["worker", "--queues", "inference-cpu"], env, tmp_path / f"worker-{i}.log")
                  for i, env in enumerate(envs)]
    try:
        for env in envs:
            wait_for(lambda env=env: echo(env["PNEUMO_PORT"]), 90, "a node to answer C-ECHO", 0.5)
        files = []
        for index, image in enumerate(IMAGES):
            path = tmp_path / f"{index}.dcm"
            wrap_image(image).save_as(path, enforce_file_format=True)
            files.append(path)
        ports = [int(env["PNEUMO_PORT"]) for env in envs]
        # A third of the images to each node, a third to both at the same time.
        senders = [store(ports[0], files[0::3]), store(ports[1], files[1::3]),
                   store(ports[0], files[2::3]), store(ports[1], files[2::3])]
        for sender in senders:
            _, errors = sender.communicate(timeout=180)
            assert sender.returncode == 0 and b"Store Failed" not in errors, errors[-500:]
        sent = {str(dcmread(path, stop_before_pixels=True).SOPInstanceUID) for path in files}
        sessions = session_factory(database_url_postgres_fresh)

        def all_terminal() -> bool:
            with sessions() as session:
                states = session.execute(select(Instance.sop_instance_uid, Instance.state)).all()
            return len(states) == len(sent) and all(state in TERMINAL_STATES for _, state in states)

        wait_for(all_terminal, 600, "every image to reach a terminal state", 2)
        with sessions() as session:
            instances = session.execute(select(Instance.id, Instance.sop_instance_uid)).all()
            ended = Counter(session.scalars(select(AuditEvent.entity_id).where(
                AuditEvent.entity == "instance", AuditEvent.event.in_([str(s) for s in TERMINAL_STATES]))))
            results = Counter(session.scalars(select(Result.instance_id)))
        assert {uid for _, uid in instances} == sent  # each stored once, whichever node got it
        assert {ended[instance_id] for instance_id, _ in instances} == {1}  # terminal exactly once
        assert max(results.values(), default=0) <= 1
        stored = [path for env in envs for path in Path(env["PNEUMO_HOME"], "storage").rglob("*.dcm")]
        assert len(stored) == len(sent)
        sessions.kw["bind"].dispose()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        redis.Redis.from_url(broker).flushdb()
