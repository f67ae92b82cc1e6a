"""Completion webhooks: POST each finished job to its callback URL, signed, with retries.

Delivery runs in a dispatcher thread of the API process that reads finished jobs
from the database, not in the worker: a worker's time belongs to the GPU, and a
slow or dead callback endpoint must never hold a batch or its acks back. The
database row stays the truth: a job written by any worker is delivered by any
running API process, attempts are claimed with a guarded UPDATE (so several API
processes never send the same attempt twice), and the status, attempt count,
last error and delivery time are recorded on the job row.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
from datetime import timedelta

import httpx
from sqlalchemy.orm import Session, sessionmaker

from api.views import job_view
from completion_queue import Settings
from db import Job, claim_webhook, due_webhooks, record_webhook, utcnow
from producer.callbacks import NonPublicAddress, resolve_public

log = logging.getLogger(__name__)

#: The header that carries ``sha256=<hex HMAC-SHA256 of the body>``.
SIGNATURE_HEADER = "X-CQ-Signature"


def sign(secret: str, body: bytes) -> str:
    """Return the signature header value of ``body`` under ``secret``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class WebhookDispatcher:
    """A daemon thread that delivers due webhooks every ``webhook_poll_ms``."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        if not settings.webhook_secret:
            raise ValueError("webhook_secret is required to sign webhooks")
        self.settings = settings
        self.secret = settings.webhook_secret
        self.sessions = sessions
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start delivering in the background."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="cq-webhooks", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop after the delivery in flight, if any."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _loop(self) -> None:
        with httpx.Client(timeout=self.settings.webhook_timeout_s) as http:
            while not self._stop.is_set():
                try:
                    self.run_once(http)
                except Exception:
                    log.exception("webhook dispatch failed; retrying")
                self._stop.wait(self.settings.webhook_poll_ms / 1000)

    def run_once(self, http: httpx.Client) -> int:
        """Deliver every webhook due now; return how many attempts were made."""
        now = utcnow()
        with self.sessions() as session:
            due = due_webhooks(session, now=now)
        lease = now + timedelta(seconds=self.settings.webhook_timeout_s + 30)
        made = 0
        for job in due:
            with self.sessions.begin() as session:
                if not claim_webhook(
                    session, job_id=job.id, attempts=job.webhook_attempts, lease_until=lease
                ):
                    continue
            made += 1
            try:
                error, final = self.deliver(http, job), False
            except NonPublicAddress as exc:
                # Never retried: the address will not become public by waiting.
                error, final = (
                    f"callback_url refused: {exc} (CQ_WEBHOOK_ALLOW_PRIVATE allows it)",
                    True,
                )
            self._record(job, attempt=job.webhook_attempts + 1, error=error, final=final)
        return made

    def deliver(self, http: httpx.Client, job: Job) -> str | None:
        """POST ``job`` to its callback URL; return why it failed, or None.

        Raises :class:`NonPublicAddress` when the URL's host is not public and
        ``CQ_WEBHOOK_ALLOW_PRIVATE`` is off (see producer/callbacks.py).
        """
        assert job.callback_url is not None
        body = json.dumps(job_view(job), ensure_ascii=False).encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.secret, body),
            "X-CQ-Job-Id": str(job.id),
        }
        url = httpx.URL(job.callback_url)
        extensions = {}
        if not self.settings.webhook_allow_private:
            port = url.port or (443 if url.scheme == "https" else 80)
            try:
                address = resolve_public(url.host, port)
            except OSError as exc:
                return f"cannot resolve {url.host}: {exc}"[:500]
            # Connect to the address just checked; the name goes in Host and TLS (SNI, cert).
            headers["Host"] = url.netloc.decode("ascii")
            extensions["sni_hostname"] = url.host
            url = url.copy_with(host=address)
        try:
            response = http.post(url, content=body, headers=headers, extensions=extensions)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:500]
        if response.is_success:
            return None
        return f"HTTP {response.status_code}"

    def _record(self, job: Job, *, attempt: int, error: str | None, final: bool = False) -> None:
        retry_at = None
        if error is not None and not final and attempt < self.settings.webhook_max_attempts:
            delay = self.settings.webhook_backoff_s * 2 ** (attempt - 1)
            retry_at = utcnow() + timedelta(seconds=delay)
            log.warning("webhook of job %s failed (%s); retry in %.1fs", job.id, error, delay)
        elif error is not None:
            log.warning("webhook of job %s failed for good after %d attempts", job.id, attempt)
        with self.sessions.begin() as session:
            record_webhook(
                session, job_id=job.id, delivered=error is None, error=error, retry_at=retry_at
            )
