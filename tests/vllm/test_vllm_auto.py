"""``CQ_ENGINE=auto`` where vLLM is installed and runs: the worker runs the vLLM engine."""

from __future__ import annotations

import pytest

from completion_queue import Settings
from workers.main import resolve_engine

pytestmark = pytest.mark.timeout(600)


def test_auto_picks_vllm_where_its_kernels_load() -> None:
    # Given this venv, where vLLM is installed and its kernels load (else every test here
    # skips, saying why)
    # When a worker's start makes CQ_ENGINE=auto an engine
    settings = resolve_engine(Settings(engine="auto"))
    # Then it is vLLM; and the engines asked for by name stay as they are
    assert settings.engine == "vllm"
    assert resolve_engine(Settings(engine="static")).engine == "static"
