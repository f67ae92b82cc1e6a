"""docker-compose.yml, checked statically (no Docker engine runs here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from completion_queue.settings import Settings
from producer.cli import cli

ROOT = Path(__file__).resolve().parents[2]


def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_every_service_runs_a_real_cq_command() -> None:
    for name, service in compose()["services"].items():
        command = service.get("command")
        if command and command[0] == "cq":
            group: Any = cli
            for word in command[1:]:
                if word.startswith("-"):
                    break
                assert word in group.commands, f"{name}: cq has no command {word!r}"
                group = group.commands[word]


def test_every_cq_variable_is_a_real_setting() -> None:
    fields = set(Settings.model_fields)
    text = (ROOT / "docker-compose.yml").read_text() + (ROOT / ".env.example").read_text()
    names = set(re.findall(r"\bCQ_([A-Z_]+)\b", text))
    assert names, "no CQ_ variables found"
    assert {n.lower() for n in names} <= fields


def test_worker_reserves_a_gpu_and_redis_persists() -> None:
    services = compose()["services"]
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "--appendonly" in services["redis"]["command"]
    assert (
        services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1]
        == "yes"
    )
    assert (
        services["worker"]["depends_on"]["migrate"]["condition"] == "service_completed_successfully"
    )
