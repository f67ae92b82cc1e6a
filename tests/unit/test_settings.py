"""Settings, names and the light modules."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from completion_queue.celery_app import celery_priority, create_app, resolve_broker_url
from completion_queue.constants import queue_name
from completion_queue.errors import ConfigError
from completion_queue.settings import Settings, redact_url


def test_defaults_run_on_one_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    settings = Settings()
    assert settings.broker_url is None
    assert settings.resolved_database_url() == f"sqlite:///{tmp_path / '.cq' / 'cq.db'}"
    assert settings.model_path() == str(tmp_path / ".cq" / "models" / "tiny-gpt2")
    assert settings.model_path("gpt2") == "gpt2"


def test_settings_come_from_cq_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CQ_BATCH_SIZE", "8")
    monkeypatch.setenv("CQ_MODEL", "gpt2")
    monkeypatch.setenv("CQ_BROKER_URL", "redis://h:6379/3")
    settings = Settings()
    assert (settings.batch_size, settings.model, settings.broker_url) == (
        8,
        "gpt2",
        "redis://h:6379/3",
    )


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("rediss://user:s3cret@host/0", "rediss://user:***@host/0"),
        ("postgresql+psycopg://cq:pw@db:5432/cq", "postgresql+psycopg://cq:***@db:5432/cq"),
        ("redis://host:6379/0", "redis://host:6379/0"),
        (None, ""),
    ],
)
def test_redact_url_hides_passwords(url: str | None, expected: str) -> None:
    assert redact_url(url) == expected


def test_celery_app_accepts_json_only_and_acks_late() -> None:
    app = create_app(Settings(batch_size=16), "redis://127.0.0.1:1/0")
    conf = app.conf
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 2 * 16 * Settings().batch_lookahead
    assert conf.broker_transport_options["visibility_timeout"] > Settings().job_timeout_s
    with pytest.raises(ConfigError, match="broker_url must be a redis"):
        create_app(Settings(), "amqp://guest@localhost//")


def test_broker_url_must_be_known(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CQ_BROKER_URL is unset"):
        resolve_broker_url(Settings(data_dir=tmp_path))


def test_queue_names_and_priorities() -> None:
    assert queue_name("gpt2") == "cq.model.gpt2"
    assert queue_name("org/model v2") == "cq.model.org/model_v2"
    assert celery_priority(9) == 0 and celery_priority(0) == 9


def test_producer_imports_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import producer, producer.cli, producer.client, db, completion_queue.celery_app\n"
        "print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr
