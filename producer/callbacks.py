"""Where webhooks may go: public addresses only, unless the deployment allows its own network.

A callback URL comes from a client this service may not trust. Without a guard,
the API would POST wherever it points: to a cloud metadata endpoint, an admin
port on loopback, a database in the private network (server-side request
forgery). So a callback host must be a public address (and an IPv6 address that
carries an IPv4 one, as 6to4, NAT64 or Teredo do, must carry public ones):

- at submit, the URL is parsed as delivery will parse it (:func:`parse_callback`:
  httpx's parser, the IDNA form of the host, DNS's limits on names), so a URL
  that could only fail later is refused then, naming ``callback_url``; and a
  literal address or ``localhost`` that is not public is refused (no DNS
  lookup: a name may resolve differently later);
- at delivery, the host is resolved, every address it resolves to must be
  public, and the POST goes to the address that was checked (the name still
  goes in ``Host`` and in TLS's SNI and certificate check), so a name that
  resolves anew between the check and the connection cannot slip through.

``CQ_WEBHOOK_ALLOW_PRIVATE=true`` lifts the guard for callbacks inside one's
own network. Redirects are never followed (httpx's default), so a public
endpoint cannot bounce a webhook inward either.
"""

from __future__ import annotations

import ipaddress
import re
import socket

import httpx

#: Names that are loopback on every machine, whatever DNS says.
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


#: The longest DNS name (RFC 1035), and a label of one: ASCII (IDNA-encoded), 1-63 characters.
MAX_NAME_CHARS = 253
LABEL = re.compile(r"[A-Za-z0-9_-]{1,63}")

#: NAT64's well-known prefix (RFC 6052): the last 32 bits are the IPv4 address reached.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
#: IPv4-compatible addresses (``::a.b.c.d``, deprecated by RFC 4291).
IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
#: Not public, though the ``ipaddress`` of Python 3.11 calls them global: site-local
#: (deprecated, RFC 3879) and local-use NAT64 (RFC 8215, whose IPv4 may sit anywhere).
NOT_PUBLIC_V6 = (ipaddress.IPv6Network("fec0::/10"), ipaddress.IPv6Network("64:ff9b:1::/48"))


class NonPublicAddress(ValueError):
    """A callback host that is, or resolves to, a loopback, private or reserved address."""


class InvalidCallback(ValueError):
    """A callback URL that cannot be delivered to, whatever the network says."""


def parse_callback(value: str) -> httpx.URL:
    """Parse ``value`` exactly as delivery does; raise :class:`InvalidCallback` saying why not.

    httpx parses the URL and IDNA-encodes the host (its ``raw_host``); decoding it
    back checks the A-labels; every label must then be one DNS and the resolver
    accept, or ``getaddrinfo`` raises ``UnicodeError`` at delivery.
    """
    try:
        url = httpx.URL(value)
        url.host  # noqa: B018 - decodes the IDNA form: a bad A-label raises here, not later
    except (httpx.InvalidURL, UnicodeError) as exc:
        raise InvalidCallback(f"is not a valid URL: {exc}") from None
    if url.scheme not in ("http", "https") or not url.raw_host:
        raise InvalidCallback("must be an http:// or https:// URL with a host")
    if url.port is not None and not 0 < url.port < 65536:
        raise InvalidCallback(f"has port {url.port}; a port is 1 to 65535")
    host = url.raw_host.decode("ascii")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        name = host.removesuffix(".")
        if len(name) > MAX_NAME_CHARS:
            raise InvalidCallback(
                f"has a host name of {len(name)} characters; at most {MAX_NAME_CHARS}"
            ) from None
        if not all(LABEL.fullmatch(label) for label in name.split(".")):
            raise InvalidCallback(
                f"has host {host!r}: each dot-separated part must be 1 to 63 letters, "
                "digits, '-' or '_'"
            ) from None
    return url


def callback_host(url: httpx.URL) -> str:
    """The host of a parsed callback URL as the resolver takes it (ASCII, no brackets)."""
    return url.raw_host.decode("ascii")


def carried_ipv4(ip: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses a packet to ``ip`` may end up at: 6to4, NAT64, IPv4-compatible, Teredo."""
    if ip.sixtofour is not None:
        return [ip.sixtofour]
    if ip.teredo is not None:
        return list(ip.teredo)  # the server, and the client (un-obfuscated)
    if ip in NAT64 or (ip in IPV4_COMPATIBLE and int(ip) > 1):  # not :: nor ::1
        return [ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)]
    return []


def is_public(address: str) -> bool:
    """True when ``address`` (an IP) is reachable on the internet: not private, not reserved.

    An IPv6 address that carries an IPv4 address reaches it too: an IPv4-mapped one
    is judged as its IPv4 address, and every one :func:`carried_ipv4` finds must be public.
    """
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        elif any(ip in network for network in NOT_PUBLIC_V6) or not all(
            is_public(str(carried)) for carried in carried_ipv4(ip)
        ):
            return False
    return ip.is_global and not ip.is_multicast


def refuse_literal(host: str) -> None:
    """Raise :class:`NonPublicAddress` if ``host`` is ``localhost`` or a non-public literal IP."""
    name = host.strip("[]").lower().rstrip(".")
    if name in LOOPBACK_NAMES or name.endswith(".localhost"):
        raise NonPublicAddress(f"{host} is a loopback name")
    try:
        public = is_public(name)
    except ValueError:
        return  # a name: checked when it is resolved, at delivery
    if not public:
        raise NonPublicAddress(f"{host} is not a public address")


def resolve_public(host: str, port: int) -> str:
    """Return an address of ``host`` to connect to; every address it has must be public.

    Raises :class:`NonPublicAddress` naming the first address that is not, and
    ``OSError`` when the name does not resolve (worth retrying later).
    """
    refuse_literal(host)
    infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    for address in addresses:
        if not is_public(address):
            raise NonPublicAddress(f"{host} resolves to {address}, which is not public")
    return addresses[0]
