"""A client dropped without close() stops its waits (on PostgreSQL: its LISTEN thread)."""

from __future__ import annotations

import gc
from pathlib import Path

import pytest

from completion_queue import Settings
from producer import CompletionClient
from producer import waits as waits_module


def test_dropped_client_closes_its_waits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    closed: list[object] = []
    monkeypatch.setattr(waits_module.Waits, "close", lambda self: closed.append(self))
    client = CompletionClient(
        database_url=f"sqlite:///{tmp_path}/cq.db", settings=Settings(data_dir=tmp_path)
    )
    waits = client._waits()
    view = client.as_tenant("t")
    del client
    gc.collect()
    assert closed == []  # a tenant view still uses the client
    del view
    gc.collect()
    assert closed == [waits]
