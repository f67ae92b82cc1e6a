"""Settings, names and the light modules."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pydantic
import pytest
import redis
from kombu import Connection

from completion_queue import (
    ConfigError,
    Settings,
    batch_line_rows,
    celery_priority,
    create_app,
    engine_rows,
    heartbeat_interval_s,
    most_held,
    prefetch_count,
    queue_name,
    redact_url,
    resolve_broker_url,
)


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
        (
            "rediss://:s3cret@[::1]:6380/0?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required",
            "rediss://:***@[::1]:6380/0?ssl_ca_certs=/etc/ca.pem&ssl_cert_reqs=required",
        ),
        ("rediss://h:6380/0?password=s3cret", "rediss://h:6380/0?password=***"),
        (
            "rediss://h/0?ssl_ca_certs=/ca.pem&ssl_password=pw;token=t&max_tokens=3#api_key",
            "rediss://h/0?ssl_ca_certs=/ca.pem&ssl_password=***;token=***&max_tokens=3#api_key",
        ),
        (
            "postgresql://db?sslpassword=a&passwd=b&pass=c&client_secret=d&API_KEY=e&n=1",
            "postgresql://db?sslpassword=***&passwd=***&pass=***&client_secret=***&API_KEY=***&n=1",
        ),
        (
            "could not queue 1 job(s) on redis://:pw@b.internal:6380/0?password=pw2 (refused)",
            "could not queue 1 job(s) on redis://:***@b.internal:6380/0?password=*** (refused)",
        ),
        ("Error 111 connecting to b.internal:6380.", "Error 111 connecting to b.internal:6380."),
        ("bad 'http://[::1' and http://u:pw@h/", "bad '<unparseable url>' and http://u:***@h/"),
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
    # Two flushes (one running, one forming), and a group of interactive calls past them.
    assert conf.worker_prefetch_multiplier == 2 * 16 * Settings().batch_lookahead + 16
    with pytest.raises(ConfigError, match="broker_url must be a redis"):
        create_app(Settings(), "amqp://guest@localhost//")


def test_a_vllm_worker_buffers_a_flush_more_than_its_engine_runs() -> None:
    # Given the default settings (batch size 32, lookahead 8: flushes of 256)
    static, vllm = Settings(engine="static"), Settings(engine="vllm")
    flush = static.batch_size * static.batch_lookahead
    # Then the static worker holds two flushes and a group of interactive calls
    assert prefetch_count(static) == 2 * flush and most_held(static) == 2 * flush + 32
    # and a vLLM worker's engine runs as many rows, of which batch lines leave the group
    # free, while the worker holds a flush more (buffered, sent as rows free)
    assert engine_rows(vllm) == most_held(static) == 544
    assert batch_line_rows(vllm) == 2 * flush == 512
    assert most_held(vllm) == engine_rows(vllm) + flush == 800


def tls_of(url: str) -> tuple[object, object]:
    """The certificate check kombu and redis-py each make of ``url``: (kombu's, redis-py's)."""
    kombu_ssl = Connection(url).ssl
    redis_kwargs = redis.ConnectionPool.from_url(url).connection_kwargs
    return kombu_ssl["ssl_cert_reqs"], redis_kwargs["ssl_cert_reqs"]


@pytest.mark.parametrize(
    ("query", "kombu_reqs", "redis_reqs"),
    [
        ("", ssl.CERT_REQUIRED, "required"),
        ("?ssl_ca_certs=/etc/cq/ca.pem", ssl.CERT_REQUIRED, "required"),
        ("?ssl_cert_reqs=CERT_OPTIONAL", ssl.CERT_OPTIONAL, "optional"),
        ("?ssl_cert_reqs=none", ssl.CERT_NONE, "none"),
    ],
)
def test_rediss_urls_verify_the_server_unless_told_not_to(
    query: str, kombu_reqs: int, redis_reqs: str
) -> None:
    # Given a rediss:// URL as a user writes it (a bare one alone makes kombu skip the check)
    url = create_app(Settings(), f"rediss://:pw@redis-host:6380/0{query}").conf.broker_url
    # Then kombu (the Celery connection) and redis-py (reaper, stats, metrics) check alike
    assert tls_of(url) == (kombu_reqs, redis_reqs)
    assert url.startswith("rediss://:pw@redis-host:6380/0?")
    if "ssl_ca_certs" in query:
        assert Connection(url).ssl["ssl_ca_certs"] == "/etc/cq/ca.pem"


def test_apps_with_other_tls_options_never_share_connections() -> None:
    # kombu pools connections process-wide by host, port and password, not TLS options
    base = "rediss://:pw@redis-host:6380/0"
    trusting = create_app(Settings(), f"{base}?ssl_ca_certs=/etc/cq/ca.pem")
    assert create_app(Settings(), base).pool is not trusting.pool
    assert create_app(Settings(), f"{base}?ssl_ca_certs=/etc/cq/ca.pem").pool is trusting.pool


def test_plain_redis_urls_are_left_alone() -> None:
    url = "redis://:pw@redis-host:6379/0?socket_timeout=5"
    assert create_app(Settings(), url).conf.broker_url == url


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("rediss://h/0?ssl_cert_reqs=maybe", "ssl_cert_reqs must be one of required"),
        ("rediss://h/0?ssl_check_hostname=perhaps", "ssl_check_hostname must be true or false"),
        ("redis://:pw@h/0?ssl_ca_certs=/ca.pem", "ssl_ca_certs need a rediss:// broker URL"),
    ],
)
def test_bad_tls_options_are_refused_naming_the_parameter(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as refused:
        create_app(Settings(), url)
    assert "pw" not in str(refused.value)


def test_broker_url_must_be_known(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="CQ_BROKER_URL is unset"):
        resolve_broker_url(Settings(data_dir=tmp_path))


def test_queue_names_and_priorities() -> None:
    assert queue_name("gpt2") == "cq.model.gpt2"
    assert queue_name("org/Model-v2.1@main") == "cq.model.org/Model-v2.1@main"
    assert queue_name("org/model v2").startswith("cq.model.org/model_v2#")
    assert celery_priority(9) == 0 and celery_priority(0) == 9


def test_models_that_sanitise_alike_get_queues_of_their_own() -> None:
    names = ["a b", "a_b", "a\tb", "a?b", "a_b#" + queue_name("a b").split("#")[1], "a b "]
    queues = [queue_name(name) for name in names]
    assert len(set(queues)) == len(names), queues
    assert queue_name("a b") == queue_name("a b")


def test_producer_api_cli_and_a_workers_main_process_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['transformers'] = None\n"
        "import producer, producer.client, db, completion_queue, api, cli, workers.app\n"
        "print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "ok", done.stderr


def test_settings_refuse_a_reap_delay_within_the_visibility_timeout() -> None:
    with pytest.raises(
        pydantic.ValidationError, match=r"reap_running_after_s \(30\) must be above"
    ):
        Settings(reap_running_after_s=30)


def test_the_defaults_recover_a_dead_worker_s_messages_within_a_minute() -> None:
    settings = Settings()
    conf = create_app(settings, "redis://127.0.0.1:1/0").conf
    options = conf.broker_transport_options
    # a dead worker's messages: one timeout past its last heartbeat, then the next sweep
    worst_s = options["visibility_timeout"] + options["unacked_restore_interval"]
    assert worst_s < 60 and options["unacked_restore_throttle"] == 1
    # a worker killed mid-sweep blocks the others' sweeps no longer than that
    assert options["unacked_mutex_expire"] <= options["visibility_timeout"]
    # a live worker renews its messages several times per timeout
    assert heartbeat_interval_s(settings) <= options["visibility_timeout"] / 3
    assert settings.reap_running_after_s > settings.visibility_timeout_s
