"""The one settings object, read from ``CQ_*`` environment variables at the edges."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from completion_queue.constants import DEFAULT_DATA_DIR, TINY_MODEL_NAME


class Settings(BaseSettings):
    """Configuration for producers, workers and the CLI; built once and passed in."""

    model_config = SettingsConfigDict(env_prefix="CQ_", extra="ignore")

    broker_url: str | None = Field(
        default=None, description="Redis URL; unset starts an embedded redis-server."
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; unset uses a SQLite file in data_dir."
    )
    data_dir: Path = Field(default=Path(DEFAULT_DATA_DIR), description="Local state directory.")
    model: str = Field(
        default=TINY_MODEL_NAME, description="Default model: a Hugging Face id or local path."
    )
    device: str = Field(default="auto", description="Worker device: auto, cpu or cuda:N.")
    dtype: str = Field(
        default="auto", description="Worker dtype: auto, float32, float16, bfloat16."
    )
    engine: Literal["static", "continuous", "vllm", "auto", "paced"] = Field(
        default="static",
        description="Worker engine: static batches, continuous batching, vLLM (`make "
        "install-vllm`), auto: vLLM where it is installed and runs here, else static; or "
        "paced, a test and bench engine with no model that sleeps paced_step_ms per step.",
    )
    paced_step_ms: float = Field(
        default=25.0,
        gt=0,
        le=60_000,
        description="The paced test engine's decoding step (CQ_ENGINE=paced only).",
    )
    torch_threads: int = Field(
        default=0,
        ge=0,
        description="CPU threads for torch in a worker (0: all cores but one on CPU).",
    )
    batch_size: int = Field(default=32, ge=1, le=1024, description="Jobs per micro-batch.")
    batch_lookahead: int = Field(
        default=8,
        ge=1,
        le=64,
        description="Batches' worth of jobs a worker takes at once, to group by length.",
    )
    batch_wait_ms: int = Field(
        default=50,
        ge=0,
        le=60_000,
        description="Wait to fill a micro-batch (up to 4x while a burst still arrives).",
    )
    prefix_min_tokens: int = Field(
        default=64,
        ge=0,
        description=(
            "Shortest prompt prefix that all jobs of a group must share for the worker to "
            "compute it once for all of them (0: never)."
        ),
    )
    progress_interval_ms: int = Field(
        default=500,
        ge=0,
        le=60_000,
        description=(
            "How often a running job's row shows its partial output, and a worker checks "
            "for cancelled jobs (0: no partial output; cancels are still checked)."
        ),
    )
    max_prompt_chars: int = Field(default=32_000, ge=1, description="Longest accepted prompt.")
    max_new_tokens_limit: int = Field(default=1024, ge=1, description="Largest max_new_tokens.")
    max_n: int = Field(default=8, ge=1, description="Largest n (choices per job).")
    max_queued_jobs: int = Field(
        default=0,
        ge=0,
        description="Most jobs queued at once; a submit beyond it is refused (0: no limit).",
    )
    max_batch_requests: int = Field(
        default=10_000, ge=1, description="Most requests per submit_many."
    )
    job_timeout_s: float = Field(
        default=600.0, gt=0, description="Longest a job's generation may run; then it fails."
    )
    model_load_timeout_s: float = Field(
        default=900.0,
        gt=0,
        description="Longest a replacement model process may take to load and warm up its "
        "model (after the last one died); past it, it is killed and another started.",
    )
    max_attempts: int = Field(
        default=5,
        ge=1,
        le=100,
        description=(
            "Most times a job is claimed; a job lost with its worker this often fails "
            "(keep it 3 or more: from the third claim, such jobs run alone)."
        ),
    )
    db_retry_s: float = Field(
        default=600.0,
        ge=0,
        description="How long a worker retries an unreachable database before giving up a batch.",
    )
    reap_interval_s: float = Field(
        default=15.0, ge=0, description="How often each worker runs the reaper (0: never)."
    )
    reap_running_after_s: float = Field(
        default=7200.0,
        gt=0,
        description="A job running this long without a result is requeued by the reaper.",
    )
    reap_queued_after_s: float = Field(
        default=30.0,
        gt=0,
        description="A job queued this long while its queue is empty and nothing is unacked "
        "lost its message; the reaper sends it again.",
    )
    queue_timeout_s: float = Field(
        default=86_400.0,
        gt=0,
        description="A job queued this long (no worker took it) fails with QueueTimeout.",
    )
    visibility_timeout_s: int = Field(
        default=30,
        ge=1,
        description="A message a worker holds goes back to the queue this long after the "
        "worker's last heartbeat (it died); live workers renew theirs every quarter of it.",
    )
    drain_s: float = Field(
        default=600.0,
        gt=0,
        description="How long a stopping worker (SIGTERM) may take to finish the jobs it "
        "started; past it, it hands them back and its model process is killed.",
    )
    log_level: str = Field(default="INFO", description="Log level for workers and the CLI.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer tokens the HTTP API accepts (comma-separated); empty: loopback only.",
    )
    api_wait_timeout_s: float = Field(
        default=60.0, gt=0, le=3600, description="Longest /v1/completions waits for its jobs."
    )
    api_max_waits_per_tenant: int = Field(
        default=256,
        ge=1,
        le=100_000,
        description="/v1/completions calls a tenant may have waiting.",
    )
    api_max_body_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Largest request body the API reads."
    )
    api_page_size: int = Field(
        default=100, ge=1, le=10_000, description="Jobs per page of GET /v1/jobs."
    )
    webhook_secret: str | None = Field(
        default=None, description="HMAC-SHA256 key of webhook bodies; unset: no callbacks."
    )
    webhook_max_attempts: int = Field(
        default=5, ge=1, le=100, description="Deliveries tried per webhook before it fails."
    )
    webhook_backoff_s: float = Field(
        default=1.0, gt=0, le=3600, description="Delay before the first retry; doubles after."
    )
    webhook_timeout_s: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="Deadline of one webhook delivery: resolve, connect, send and read the answer.",
    )
    webhook_concurrency: int = Field(
        default=16, ge=1, le=1000, description="Webhook deliveries in flight at once per API."
    )
    webhook_poll_ms: int = Field(
        default=500, ge=10, le=60_000, description="How often the API looks for due webhooks."
    )
    webhook_allow_private: bool = Field(
        default=False,
        description="Allow callback URLs on loopback, private or reserved addresses.",
    )

    @field_validator("api_keys", "operator_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [key.strip() for key in value.split(",") if key.strip()]
        return value

    task_sent_events: bool = Field(
        default=False,
        description="Producers send task-sent events, so Flower lists jobs still queued.",
    )
    metrics_port: int = Field(
        default=0, ge=0, le=65535, description="Worker's Prometheus /metrics port; 0 turns it off."
    )
    metrics_address: str = Field(
        default="127.0.0.1", description="Address the worker's /metrics listens on."
    )
    flower_address: str = Field(default="127.0.0.1", description="Address `cq flower` binds.")
    flower_port: int = Field(default=5555, ge=1, le=65535, description="Port `cq flower` binds.")
    flower_basic_auth: str | None = Field(
        default=None,
        description="user:password[,user:password]; required when Flower binds non-loopback.",
    )
    flower_db: Path | None = Field(
        default=None, description="File for Flower's persistent state; unset keeps it in memory."
    )
    operator_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Bearer tokens that may read the API's /backlog and /metrics (comma-separated; "
        "tenant keys may not); without one, loopback peers only.",
    )
    scale_drain_target_s: float = Field(
        default=300.0,
        gt=0,
        description="The backlog signal asks for enough workers to drain the queued tokens "
        "within this many seconds.",
    )
    scale_worker_tokens_per_s: float = Field(
        default=1000.0,
        gt=0,
        description="Tokens per second one worker is assumed to serve until it has been measured "
        "(no job of the model finished in the last minute).",
    )

    @model_validator(mode="after")
    def _check_timeouts(self) -> Settings:
        # The reaper must wait for Redis to give a dead worker's messages back before it
        # resends a running job itself.
        if self.reap_running_after_s <= self.visibility_timeout_s:
            raise ValueError(
                f"reap_running_after_s ({self.reap_running_after_s:g}) must be above "
                f"visibility_timeout_s ({self.visibility_timeout_s:g}): the reaper would "
                "requeue jobs that Redis is about to redeliver"
            )
        return self

    def resolved_database_url(self) -> str:
        """Return the database URL, defaulting to a SQLite file under ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'cq.db').resolve()}"

    def model_path(self, model: str | None = None) -> str:
        """Return where ``model`` loads from: the tiny model's local dir, or the id itself."""
        name = model or self.model
        if name == TINY_MODEL_NAME:
            return str((self.data_dir / "models" / TINY_MODEL_NAME).resolve())
        return name


#: A URL inside free text (an error message), up to the next space or quote.
URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>`]+")
#: A query parameter whose value is a secret: ``password``, ``ssl_password``, ``api_key``...
SECRET_PARAM = re.compile(r"(?i)([^&;=]*(?:pass|passwd|password|pwd|secret|token|key))=[^&;#]*")


def redact_url(url: str | None) -> str:
    """Return ``url`` with its secrets replaced by ``***``, safe for logs and errors.

    The password of ``user:password@`` and the values of secret query parameters
    (``?password=``, ``ssl_password=``, ``token=``, ``key=``...) are hidden, in every
    URL of a free text too (an error message that quotes one).
    """
    if not url:
        return ""
    return URL_IN_TEXT.sub(lambda found: _redact_one(found.group()), url)


def _redact_one(url: str) -> str:
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable url>"
    netloc, query = parts.netloc, SECRET_PARAM.sub(r"\1=***", parts.query)
    if parts.password is not None:
        # The host part as written: brackets of an IPv6 address kept, case unchanged.
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    if (netloc, query) == (parts.netloc, parts.query):
        return url
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def is_loopback(address: str) -> bool:
    """True when ``address`` reaches this machine only (``""`` and ``0.0.0.0`` do not)."""
    if address == "localhost":
        return True
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False
