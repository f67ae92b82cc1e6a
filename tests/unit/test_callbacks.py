"""Which callback addresses are public, and the pinned, signed request a webhook makes."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import hmac
import json
import time

import httpx
import pytest
import standardwebhooks

from api import webhooks
from completion_queue import Settings, ValidationError
from db import Job, JobStatus, utcnow
from producer import callbacks
from producer.callbacks import NonPublicAddress, is_public, refuse_literal
from producer.schema import Limits, validate_request
from tests.factories import make_job


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.215.14", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("169.254.169.254", False),  # cloud metadata
        ("100.64.0.1", False),  # carrier-grade NAT
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("2002:7f00:1::", False),  # 6to4 of 127.0.0.1
        ("2002:5db8:d70e::", True),  # 6to4 of 93.184.215.14
        ("64:ff9b::a00:1", False),  # NAT64 of 10.0.0.1
        ("64:ff9b::5db8:d70e", True),  # NAT64 of 93.184.215.14
        ("64:ff9b:1::5db8:d70e", False),  # local-use NAT64
        ("::127.0.0.1", False),  # IPv4-compatible
        ("::169.254.169.254", False),
        ("2001:0:4136:e378:8000:63bf:80ff:fffe", False),  # Teredo, client 127.0.0.1
        ("fec0::1", False),  # site-local
    ],
)
def test_public_addresses(address: str, public: bool) -> None:
    assert is_public(address) is public


@pytest.mark.parametrize(
    "host", ["localhost", "LOCALHOST.", "app.localhost", "127.0.0.1", "[::1]", "10.0.0.7"]
)
def test_loopback_names_and_private_literals_are_refused(host: str) -> None:
    with pytest.raises(NonPublicAddress):
        refuse_literal(host)


@pytest.mark.parametrize("host", ["example.com", "93.184.215.14", "[2606:4700:4700::1111]"])
def test_names_and_public_literals_pass_until_resolved(host: str) -> None:
    refuse_literal(host)


def test_submit_refuses_a_private_callback_naming_the_field() -> None:
    data = {"prompt": "hi", "callback_url": "http://169.254.169.254/latest/meta-data"}
    with pytest.raises(ValidationError) as caught:
        validate_request(data, Limits())
    assert caught.value.field == "callback_url"
    assert "public address" in str(caught.value) and "CQ_WEBHOOK_ALLOW_PRIVATE" in str(caught.value)
    allowed = validate_request(data, Limits(allow_private_callbacks=True))
    assert allowed.callback_url == data["callback_url"]
    assert validate_request({**data, "callback_url": "https://hooks.example.com/x"}, Limits())


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://" + "a" * 64 + ".com/", "1 to 63"),  # getaddrinfo: UnicodeError
        ("http://a..b/", "1 to 63"),  # getaddrinfo: UnicodeError
        ("http://x.example/\n", "non-printable"),  # httpx.InvalidURL
        ("http://xn--zz.com/", "A-label"),  # idna.IDNAError
        ("http://exa mple.com/", "1 to 63"),
        ("http://" + "a." * 127 + "com/", "at most 253"),
        ("http://x.example:99999/", "port 99999"),
        ("ftp://x.example/", "http:// or https://"),
        ("https:///path", "with a host"),
    ],
)
def test_submit_refuses_a_url_that_delivery_could_not_parse(url: str, says: str) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_request({"prompt": "hi", "callback_url": url}, Limits())
    assert caught.value.field == "callback_url"
    assert says in str(caught.value)


@pytest.mark.parametrize(
    "url",
    ["https://b\u00fccher.example/h", "http://[2606:4700:4700::1111]:8080/", "http://a.b_c.com./"],
)
def test_international_names_and_literals_parse_as_delivery_sends_them(url: str) -> None:
    assert validate_request({"prompt": "hi", "callback_url": url}, Limits()).callback_url == url
    assert callbacks.callback_host(callbacks.parse_callback(url)).isascii()


def test_delivery_connects_to_the_checked_address_with_the_name_in_host_and_sni(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given a name that resolves to a public address (the resolver is the stand-in here)
    resolved: list[tuple[str, int]] = []

    def resolve(host: str, port: int) -> str:
        resolved.append((host, port))
        return "93.184.215.14"

    monkeypatch.setattr(webhooks, "resolve_public", resolve)
    sent: list[httpx.Request] = []

    def endpoint(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(204, stream=httpx.ByteStream(b""))  # a body still to read

    settings = Settings(webhook_secret="s")
    dispatcher = webhooks.WebhookDispatcher(settings, sessions=None)  # type: ignore[arg-type]
    job = job_with_callback("https://hooks.example.com:8443/cq?x=1")

    # When the webhook is delivered
    async def deliver() -> str | None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(endpoint)) as http:
            return await dispatcher.deliver(http, job)

    assert asyncio.run(deliver()) is None
    # Then the connection goes to the checked address; the name is in Host and TLS
    assert resolved == [("hooks.example.com", 8443)]
    (request,) = sent
    assert request.url.host == "93.184.215.14" and request.url.port == 8443
    assert request.url.path == "/cq" and request.url.query == b"x=1"
    assert request.headers["Host"] == "hooks.example.com:8443"
    assert request.extensions["sni_hostname"] == "hooks.example.com"
    assert json.loads(request.content)["id"] == str(job.id)


#: A secret in the Standard Webhooks format: ``whsec_`` and the base64 of the key.
WHSEC = "whsec_" + base64.b64encode(b"k" * 32).decode()


@pytest.mark.parametrize(
    ("secret", "verifier_secret"),
    [(WHSEC, WHSEC), ("a plain secret", base64.b64encode(b"a plain secret").decode())],
    ids=["whsec", "plain"],
)
def test_a_standard_webhooks_verifier_accepts_deliveries_and_refuses_tampering_and_replays(
    secret: str, verifier_secret: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a job's webhook delivered twice (a retry) under the secret
    settings = Settings(webhook_secret=secret, webhook_allow_private=True)
    job = job_with_callback("https://hooks.example.com/cq")
    first, retry = delivered(settings, job), delivered(settings, job)
    verifier = standardwebhooks.Webhook(verifier_secret)
    # Then a third-party verifier accepts it; the id is the same on every attempt
    assert verifier.verify(first.content, dict(first.headers))["id"] == str(job.id)
    assert first.headers["webhook-id"] == retry.headers["webhook-id"] == f"msg_{job.id.hex}"
    assert first.headers["X-CQ-Signature"] == webhooks.sign(secret, first.content)
    assert first.headers["X-CQ-Job-Id"] == str(job.id)
    # But a tampered body is refused
    tampered = first.content.replace(b'"cancelled"', b'"succeeded"')
    assert tampered != first.content
    with pytest.raises(standardwebhooks.WebhookVerificationError, match="signature"):
        verifier.verify(tampered, dict(first.headers))
    # and so is a delivery signed 10 minutes ago, replayed now
    now = time.time()
    monkeypatch.setattr(webhooks.time, "time", lambda: now - 600)
    old = delivered(settings, job)
    monkeypatch.undo()
    with pytest.raises(standardwebhooks.WebhookVerificationError, match="too old"):
        verifier.verify(old.content, dict(old.headers))


def test_a_whsec_secret_that_is_not_base64_is_refused() -> None:
    with pytest.raises(ValueError, match="base64 after whsec_"):
        webhooks.signing_key("whsec_n*t")
    with pytest.raises(ValueError, match="no key"):
        webhooks.signing_key("whsec_")


def test_the_standard_signature_is_the_specs_hmac_of_the_bytes_sent() -> None:
    # Given a job whose body holds text beyond ASCII, under a whsec_ secret
    settings = Settings(webhook_secret=WHSEC, webhook_allow_private=True)
    job = dataclasses.replace(
        job_with_callback("https://hooks.example.com/cq"), prompt="héllo ✓ 日本"
    )
    # When it is delivered
    request = delivered(settings, job)
    # Then webhook-signature is v1, base64 HMAC-SHA256 of "id.timestamp." + the body's bytes
    assert "héllo ✓ 日本".encode() in request.content
    signed = (
        f"{request.headers['webhook-id']}.{request.headers['webhook-timestamp']}.".encode()
        + request.content
    )
    digest = hmac.new(b"k" * 32, signed, hashlib.sha256).digest()
    assert request.headers["webhook-signature"] == "v1," + base64.b64encode(digest).decode()


def delivered(settings: Settings, job: Job) -> httpx.Request:
    """Deliver ``job``'s webhook to a stand-in endpoint; return the request it got."""
    sent: list[httpx.Request] = []

    def endpoint(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return httpx.Response(204, stream=httpx.ByteStream(b""))

    dispatcher = webhooks.WebhookDispatcher(settings, sessions=None)  # type: ignore[arg-type]

    async def deliver() -> str | None:
        async with httpx.AsyncClient(transport=httpx.MockTransport(endpoint)) as http:
            return await dispatcher.deliver(http, job)

    assert asyncio.run(deliver()) is None
    (request,) = sent
    return request


def test_a_private_resolution_raises_before_any_request(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        callbacks.socket, "getaddrinfo", lambda *a, **k: [(2, 1, 6, "", ("10.0.0.5", 80))]
    )
    with pytest.raises(NonPublicAddress, match=r"resolves to 10\.0\.0\.5"):
        callbacks.resolve_public("hooks.example.com", 80)


def job_with_callback(url: str) -> Job:
    """A finished job as the dispatcher reads it."""
    return make_job(
        "p",
        status=JobStatus.CANCELLED,
        attempts=0,
        worker=None,
        started_at=None,
        finished_at=utcnow(),
        callback_url=url,
    )
