"""docker-compose.yml is valid for a real compose client and has the production shape: every
service, the GPU worker only in profile "gpu" with an NVIDIA reservation, health checks on the
long-running services, commands the CLI has, Orthanc's config and Lua mounted where the config
names them, and secrets only from the environment. No Docker daemon is needed for any of it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import typer
import yaml

from deploy.requirements import requirement_name, requirements
from ops.cli import app as cli_app

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ORTHANC_CONFIG = REPO / "deploy" / "orthanc" / "orthanc.json"
SERVICES = {"redis", "postgres", "migrate", "node", "worker-cpu", "worker-gpu", "scheduler", "flower",
            "dashboard", "orthanc"}
ONE_SHOT = {"migrate"}
SECRET_KEY = re.compile(r"PASSWORD|TOKEN|SECRET|BASIC_AUTH", re.IGNORECASE)


def compose_client() -> list[str] | None:
    """`docker compose` (v2 plugin) where it works, else Debian's `docker-compose` (v1)."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


# The secrets compose requires (no default): a deployment sets them in .env.
REQUIRED_SECRETS = {"POSTGRES_PASSWORD": "pg-test-3k", "ORTHANC_PASSWORD": "orthanc-test-5m",
                    "FLOWER_PASSWORD": "flower-test-8p", "PNEUMO_DASHBOARD_TOKEN": "token-test-2w"}


def run_compose(*args: str, env: dict[str, str] | None = None,
                secrets: bool = True) -> subprocess.CompletedProcess:
    client = compose_client()
    if client is None:
        pytest.skip("no compose client installed (.ci/run installs Debian's docker-compose)")
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("PNEUMO_", "POSTGRES_")) and k not in REQUIRED_SECRETS}
    given = {**(REQUIRED_SECRETS if secrets else {}), **(env or {})}
    return subprocess.run([*client, "-f", str(COMPOSE_FILE), *args], cwd=REPO, env={**clean, **given},
                          capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_compose_config_is_valid_with_and_without_the_gpu_profile() -> None:
    for profile in ([], ["--profile", "gpu"]):
        result = run_compose(*profile, "config", "-q")
        assert result.returncode == 0, result.stderr


def test_compose_takes_secrets_and_settings_from_the_environment() -> None:
    result = run_compose("config", env={"POSTGRES_PASSWORD": "from-env-7q", "ORTHANC_PASSWORD": "orth-9x",
                                        "PNEUMO_INFERENCE_QUEUE": "inference-gpu"})
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD"] == "from-env-7q"
    assert services["orthanc"]["environment"]["ORTHANC_PASSWORD"] == "orth-9x"
    for name in ("migrate", "node", "worker-cpu", "scheduler", "dashboard"):
        environment = services[name]["environment"]
        assert ":from-env-7q@postgres:5432/" in environment["PNEUMO_DATABASE_URL"], name
        assert environment["PNEUMO_INFERENCE_QUEUE"] == "inference-gpu", name
    defaults = yaml.safe_load(run_compose("--profile", "gpu", "config").stdout)["services"]
    assert defaults["node"]["environment"]["PNEUMO_INFERENCE_QUEUE"] == "inference-cpu"
    assert defaults["node"]["environment"]["PNEUMO_PACS"] == "ORTHANC@orthanc:4242"
    assert defaults["worker-gpu"]["environment"]["PNEUMO_INFERENCE_QUEUE"] == "inference-gpu"


def test_every_service_is_there_and_long_running_ones_have_health_checks(compose: dict) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service["restart"] == "no"
            continue
        test = service.get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"}, f"{name} has no health check"
        assert service.get("restart") == "unless-stopped", name
    assert services["migrate"]["command"] == ["pneumo", "db", "upgrade"]
    for name in ("node", "worker-cpu", "worker-gpu", "scheduler", "dashboard"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert "storage:/data" in services["node"]["volumes"]
    assert "postgres:/var/lib/postgresql/data" in services["postgres"]["volumes"]
    assert {"storage", "postgres", "redis", "orthanc"} <= set(compose["volumes"])


def test_gpu_worker_is_only_in_the_gpu_profile_and_reserves_an_nvidia_device(compose: dict) -> None:
    services = compose["services"]
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert [name for name, service in services.items() if "profiles" in service] == ["worker-gpu"]
    device = gpu["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    command = gpu["command"]
    assert command[:4] == ["pneumo", "worker", "--queues", "inference-gpu"]
    assert gpu["environment"]["PNEUMO_INFERENCE_QUEUE"] == "inference-gpu"
    # Batched inference: a thread pool with room for two batches.
    batch = int(gpu["environment"]["PNEUMO_INFERENCE_BATCH_SIZE"])
    assert command[command.index("--pool") + 1] == "threads" and batch > 1
    assert int(command[command.index("--concurrency") + 1]) >= 2 * batch
    assert gpu["build"]["dockerfile"] == "Dockerfile.gpu" and (REPO / "Dockerfile.gpu").is_file()
    cpu_queues = services["worker-cpu"]["command"][services["worker-cpu"]["command"].index("--queues") + 1]
    assert set(cpu_queues.split(",")) == {"inference-cpu", "delivery", "housekeeping"}


def test_service_commands_exist_in_the_cli(compose: dict) -> None:
    """`pneumo ...` commands and options in the compose file are ones `pneumo --help` lists."""
    root = typer.main.get_command(cli_app)
    for name, service in compose["services"].items():
        command = service.get("command") or []
        if command[:1] != ["pneumo"]:
            continue
        found = root  # typer's own click: a group is whatever has sub-commands
        for word in (w for w in command[1:] if not w.startswith("--")):
            if word not in getattr(found, "commands", {}):
                break
            found = found.commands[word]
        options = {opt for param in found.params for opt in param.opts}
        assert found is not root and not hasattr(found, "commands"), f"{name}: {command}"
        assert {w for w in command if w.startswith("--")} <= options, f"{name}: {command}"


def test_dashboard_and_flower(compose: dict) -> None:
    dashboard = compose["services"]["dashboard"]
    assert dashboard["command"] == ["pneumo", "dashboard"]
    assert "8080:8080" in dashboard["ports"]
    assert dashboard["environment"]["PNEUMO_DASHBOARD_PORT"] == "8080"
    assert "/healthz" in " ".join(dashboard["healthcheck"]["test"])
    flower = compose["services"]["flower"]
    assert "flower" in flower["command"]
    ops = requirements(["ops"], [])
    assert "flower" in {requirement_name(r) for r in ops}
    assert "deploy/requirements.py ops" in (REPO / "Dockerfile").read_text()


def test_gpu_image_installs_cuda_tensorflow_and_not_the_cpu_wheel() -> None:
    names = {requirement_name(r) for r in requirements(["gpu"], ["tensorflow-cpu"])}
    assert "tensorflow-cpu" not in names and "tensorflow" in names
    assert any("and-cuda" in r for r in requirements(["gpu"], ["tensorflow-cpu"]))
    dockerfile = (REPO / "Dockerfile.gpu").read_text()
    assert "deploy/requirements.py gpu --without tensorflow-cpu" in dockerfile
    assert "--no-deps /src" in dockerfile and "-e ." not in dockerfile


def test_orthanc_mounts_the_config_and_the_lua_where_the_config_names_them(compose: dict) -> None:
    orthanc = compose["services"]["orthanc"]
    mounts = dict(volume.split(":")[:2] for volume in orthanc["volumes"])
    config = json.loads(ORTHANC_CONFIG.read_text())
    assert mounts["./deploy/orthanc/orthanc.json"] == "/etc/orthanc/orthanc.json"
    assert mounts["./deploy/orthanc/route-to-pneumo.lua"] in config["LuaScripts"]
    assert (REPO / "deploy/orthanc/route-to-pneumo.lua").is_file()
    node = config["DicomModalities"]["pneumo"]
    assert node["AllowStore"] is True and config["DicomAlwaysAllowStore"] is False
    assert node["Host"] == "${PNEUMO_NODE_HOST:-node}"  # the compose service name by default
    assert orthanc["environment"]["PNEUMO_NODE_HOST"] == "node"


def test_lua_routes_the_body_parts_the_worker_classifies() -> None:
    """The Lua's pre-filter and worker/filters.py must not drift apart."""
    from worker.filters import CHEST_BODY_PARTS

    lua = (REPO / "deploy/orthanc/route-to-pneumo.lua").read_text()
    table = re.search(r"^local CHEST_BODY_PARTS = \{(.*)\}$", lua, re.MULTILINE)
    assert table is not None
    keys = re.findall(r'(?:\["([^"]*)"\]|(\w+))\s*=\s*true', table.group(1))
    assert {quoted or bare for quoted, bare in keys} == CHEST_BODY_PARTS


def strings(value, key: str = ""):
    """(key, string) pairs anywhere in a parsed YAML/JSON document."""
    if isinstance(value, dict):
        for k, v in value.items():
            yield from strings(v, str(k))
    elif isinstance(value, list):
        for item in value:
            yield from strings(item, key)
    elif isinstance(value, str):
        yield key, value


def test_no_secret_is_hard_coded(compose: dict) -> None:
    """Passwords and tokens come from the environment, in compose and Orthanc's config; compose
    gives them no default (`${VAR:?...}`): orthanc.json's default is never used under compose."""
    config = json.loads(ORTHANC_CONFIG.read_text())
    documents = [compose, config]
    checked = 0
    for document in documents:
        for key, value in strings(document):
            if SECRET_KEY.search(key):
                assert value.count("${") >= 1, f"{key}: {value!r} is not from the environment"
                checked += 1
    for user, password in config["RegisteredUsers"].items():
        assert password.startswith("${"), user
    for key, value in strings(compose):
        for url in re.findall(r"\w+(?:\+\w+)?://[^\s'\"]+", value):
            credentials = url.split("://", 1)[1].split("@", 1)
            if len(credentials) == 2 and ":" in credentials[0]:
                assert credentials[0].split(":", 1)[1].startswith("${"), f"{key}: {url}"
                checked += 1
    assert checked >= 5


def test_compose_refuses_to_start_without_each_secret() -> None:
    """No default password and no empty dashboard token on 0.0.0.0: each missing secret stops
    `config` with its name (issue 22: compose shipped POSTGRES_PASSWORD:-pneumo and an empty token)."""
    for name in REQUIRED_SECRETS:
        given = {k: v for k, v in REQUIRED_SECRETS.items() if k != name}
        result = run_compose("config", "-q", env=given, secrets=False)
        assert result.returncode != 0 and name in result.stderr, name
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    for key, value in strings(compose):
        if SECRET_KEY.search(key):
            assert ":?" in value and ":-" not in value, f"{key}: {value!r} has a default"


def test_the_registry_is_a_named_volume_shared_by_the_cli_and_the_workers() -> None:
    """A version served from one container is what the workers load, and survives a re-create."""
    services = yaml.safe_load(run_compose("--profile", "gpu", "config").stdout)["services"]
    for name in ("migrate", "node", "worker-cpu", "worker-gpu", "scheduler", "dashboard"):
        assert services[name]["environment"]["PNEUMO_MODELS_DIR"] == "/models", name
        mounts = [v if isinstance(v, str) else f"{v['source']}:{v['target']}"
                  for v in services[name]["volumes"]]
        assert any(m.split(":")[1:2] == ["/models"] and m.split(":")[0].endswith("models")
                   for m in mounts), (name, mounts)
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        text = (REPO / dockerfile).read_text()
        assert "PNEUMO_MODELS_DIR=/models" in text and "COPY models /models" in text, dockerfile
