"""Completion webhooks: POST each finished job to its callback URL, signed, with retries.

Each POST is signed twice: ``X-CQ-Signature`` (HMAC-SHA256 of the body), and the
Standard Webhooks headers (``webhook-id``, the same for every attempt of a job so a
receiver can drop repeats; ``webhook-timestamp``; ``webhook-signature`` over
id.timestamp.body, made by the ``standardwebhooks`` library itself), so a receiver can
refuse replays with any Standard Webhooks library.

Delivery runs in a dispatcher thread of the API process that reads finished jobs
from the database, not in the worker: a worker's time belongs to the GPU, and a
slow or dead callback endpoint must never hold a batch or its acks back. The
database row stays the truth: a job written by any worker is delivered by any
running API process, attempts are claimed with a guarded UPDATE (so several API
processes never send the same attempt twice, and none more often than
``CQ_WEBHOOK_MAX_ATTEMPTS``), and the status, attempt count, last error and
delivery time are recorded on the job row.

No receiver can hold the others back or exhaust the API:

- the thread runs an asyncio loop with up to ``CQ_WEBHOOK_CONCURRENCY``
  deliveries in flight; it claims more as slots free up, so a slow receiver
  takes one slot, not the dispatcher;
- each delivery has one deadline, ``CQ_WEBHOOK_TIMEOUT_S``, for everything
  (resolving, connecting, sending, the answer): httpx's own timeouts are per
  read, so a receiver that sends a byte every few seconds would never trip them;
- at most ``MAX_ANSWER_BYTES`` of an answer are read, undecoded (no gzip bomb);
- a claimed attempt is leased for the deadline plus ``LEASE_MARGIN_S``, so no
  other API process takes it while it may still be running;
- any exception in one delivery is recorded on that job as its error, and the
  others go on. A URL that can never be delivered to (refused at submit today,
  but perhaps stored before that check) fails for good at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import httpx
import standardwebhooks
from sqlalchemy.orm import Session, sessionmaker

from api.views import job_view
from completion_queue import Settings
from db import Job, claim_webhook, due_webhooks, give_up_webhook, record_webhook, utcnow
from producer.callbacks import (
    InvalidCallback,
    NonPublicAddress,
    callback_host,
    parse_callback,
    resolve_public,
)

log = logging.getLogger(__name__)

#: The header that carries ``sha256=<hex HMAC-SHA256 of the body>``.
SIGNATURE_HEADER = "X-CQ-Signature"
#: How a secret in the Standard Webhooks format starts: ``whsec_<base64 of the key>``.
WHSEC_PREFIX = "whsec_"
#: The most of a receiver's answer that is read (its start goes into ``webhook_error``).
MAX_ANSWER_BYTES = 4096
#: How much longer than the deadline an attempt stays claimed by its dispatcher.
LEASE_MARGIN_S = 30.0


def sign(secret: str, body: bytes) -> str:
    """Return the signature header value of ``body`` under ``secret``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def signing_key(secret: str) -> bytes:
    """Return the Standard Webhooks key of ``secret``: base64 after ``whsec_``, else its UTF-8."""
    if not secret.startswith(WHSEC_PREFIX):
        return secret.encode()
    encoded = secret.removeprefix(WHSEC_PREFIX)
    try:
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error as exc:
        raise ValueError(f"webhook_secret must be base64 after {WHSEC_PREFIX}: {exc}") from None
    if not key:
        raise ValueError(f"webhook_secret has no key after {WHSEC_PREFIX}")
    return key


def standard_signature(
    signer: standardwebhooks.Webhook, msg_id: str, timestamp: int, body: bytes
) -> str:
    """Return the ``webhook-signature`` value: ``v1,`` base64 HMAC-SHA256 of id.timestamp.body."""
    # The body is JSON encoded as UTF-8, so its text signs the very same bytes; a str is
    # what every standardwebhooks release from our floor (1.1) on signs.
    return signer.sign(msg_id, datetime.fromtimestamp(timestamp, tz=UTC), body.decode())


class WebhookDispatcher:
    """A daemon thread that delivers due webhooks, polling every ``webhook_poll_ms``."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        if not settings.webhook_secret:
            raise ValueError("webhook_secret is required to sign webhooks")
        self.settings = settings
        self.secret = settings.webhook_secret
        self.signer = standardwebhooks.Webhook(signing_key(settings.webhook_secret))
        self.sessions = sessions
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def start(self) -> None:
        """Start delivering in the background."""
        self._stop.clear()
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._serve()), name="cq-webhooks", daemon=True
        )
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop, giving the deliveries in flight until ``timeout_s`` to end.

        One cut short was claimed and counted: its lease runs out and it is tried again.
        """
        self._stop.set()
        if self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop has already ended
                self._loop.call_soon_threadsafe(self._wake.set)
        if self._thread is not None:
            self._thread.join(timeout_s)

    def deliver_due(self) -> int:
        """Deliver every webhook due now and wait for them; return how many were tried."""
        return asyncio.run(self._deliver_due())

    def _client(self) -> httpx.AsyncClient:
        limits = httpx.Limits(max_connections=self.settings.webhook_concurrency)
        return httpx.AsyncClient(timeout=self.settings.webhook_timeout_s, limits=limits)

    def _executor(self) -> ThreadPoolExecutor:
        # The database and the resolver block: one thread per slot, plus the claim.
        workers = self.settings.webhook_concurrency + 2
        return ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cq-webhooks")

    async def _deliver_due(self) -> int:
        asyncio.get_running_loop().set_default_executor(self._executor())
        async with self._client() as http:
            jobs = await asyncio.to_thread(self._claim, self.settings.webhook_concurrency)
            await asyncio.gather(*(self._attempt(http, job) for job in jobs))
        return len(jobs)

    async def _serve(self) -> None:
        self._loop, self._wake = asyncio.get_running_loop(), asyncio.Event()
        self._loop.set_default_executor(self._executor())
        in_flight: set[asyncio.Task[None]] = set()
        async with self._client() as http:
            while not self._stop.is_set():
                free = self.settings.webhook_concurrency - len(in_flight)
                try:
                    jobs = await asyncio.to_thread(self._claim, free) if free else []
                except Exception:
                    log.exception("webhook dispatch failed; retrying")
                    jobs = []
                for job in jobs:
                    task = asyncio.create_task(self._attempt(http, job))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.settings.webhook_poll_ms / 1000)
            if in_flight:
                _, late = await asyncio.wait(in_flight, timeout=5.0)
                for task in late:
                    task.cancel()

    def _claim(self, limit: int) -> list[Job]:
        """Claim up to ``limit`` due webhooks; fail those with no attempt left instead."""
        now, most = utcnow(), self.settings.webhook_max_attempts
        lease = now + timedelta(seconds=self.settings.webhook_timeout_s + LEASE_MARGIN_S)
        with self.sessions() as session:
            due = due_webhooks(session, now=now, limit=limit)
        claimed = []
        for job in due:
            with self.sessions.begin() as session:
                if job.webhook_attempts >= most:
                    if give_up_webhook(session, job_id=job.id, now=now, max_attempts=most):
                        log.warning(
                            "webhook of job %s failed: its last attempt never ended", job.id
                        )
                elif claim_webhook(
                    session,
                    job_id=job.id,
                    attempts=job.webhook_attempts,
                    max_attempts=most,
                    lease_until=lease,
                ):
                    claimed.append(job)
        return claimed

    async def _attempt(self, http: httpx.AsyncClient, job: Job) -> None:
        """Make one claimed delivery attempt of ``job`` and record how it went, whatever happens."""
        deadline = self.settings.webhook_timeout_s
        final = False
        try:
            async with asyncio.timeout(deadline):
                error = await self.deliver(http, job)
        except TimeoutError:
            error = f"no complete answer within {deadline:g}s (CQ_WEBHOOK_TIMEOUT_S)"
        except NonPublicAddress as exc:
            # Never retried: the address will not become public by waiting.
            error = f"callback_url refused: {exc} (CQ_WEBHOOK_ALLOW_PRIVATE allows it)"
            final = True
        except InvalidCallback as exc:
            error, final = f"callback_url {exc}", True
        except Exception as exc:  # one delivery's fault stays on its job
            log.exception("webhook of job %s raised", job.id)
            error = f"{type(exc).__name__}: {exc}"
        try:
            await asyncio.to_thread(
                self._record, job, attempt=job.webhook_attempts + 1, error=error, final=final
            )
        except Exception:
            log.exception("could not record the webhook of job %s; retried after its lease", job.id)

    async def deliver(self, http: httpx.AsyncClient, job: Job) -> str | None:
        """POST ``job`` to its callback URL; return why it failed, or None.

        Raises :class:`InvalidCallback` for a URL that cannot be delivered to, and
        :class:`NonPublicAddress` when its host is not public and
        ``CQ_WEBHOOK_ALLOW_PRIVATE`` is off (see producer/callbacks.py).
        """
        assert job.callback_url is not None
        url = parse_callback(job.callback_url)
        body = json.dumps(job_view(job), ensure_ascii=False).encode()
        msg_id, timestamp = f"msg_{job.id.hex}", int(time.time())
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(self.secret, body),
            "X-CQ-Job-Id": str(job.id),
            "webhook-id": msg_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": standard_signature(self.signer, msg_id, timestamp, body),
        }
        extensions = {}
        if not self.settings.webhook_allow_private:
            host = callback_host(url)
            port = url.port or (443 if url.scheme == "https" else 80)
            try:
                address = await asyncio.to_thread(resolve_public, host, port)
            except OSError as exc:
                return f"cannot resolve {host}: {exc}"
            # Connect to the address just checked; the name goes in Host and TLS (SNI, cert).
            headers["Host"] = url.netloc.decode("ascii")
            extensions["sni_hostname"] = host
            url = url.copy_with(host=address)
        try:
            async with http.stream(
                "POST", url, content=body, headers=headers, extensions=extensions
            ) as response:
                answer = await read_at_most(response, MAX_ANSWER_BYTES)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"
        if response.is_success:
            return None
        text = answer.decode("utf-8", "replace").strip()[:200]
        return f"HTTP {response.status_code}" + (f": {text}" if text else "")

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
                session,
                job_id=job.id,
                delivered=error is None,
                error=None if error is None else error[:500],
                retry_at=retry_at,
            )


async def read_at_most(response: httpx.Response, limit: int) -> bytes:
    """Read up to ``limit`` bytes of ``response``'s body as sent (not decompressed)."""
    answer = bytearray()
    async for chunk in response.aiter_raw():
        answer += chunk[: limit - len(answer)]
        if len(answer) >= limit:
            break
    return bytes(answer)
