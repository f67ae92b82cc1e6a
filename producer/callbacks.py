"""Where webhooks may go: public addresses only, unless the deployment allows its own network.

A callback URL comes from a client this service may not trust. Without a guard,
the API would POST wherever it points: to a cloud metadata endpoint, an admin
port on loopback, a database in the private network (server-side request
forgery). So a callback host must be a public address:

- at submit, a literal address or ``localhost`` that is not public is refused,
  naming ``callback_url`` (no DNS lookup: a name may resolve differently later);
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
import socket

#: Names that are loopback on every machine, whatever DNS says.
LOOPBACK_NAMES = ("localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback")


class NonPublicAddress(ValueError):
    """A callback host that is, or resolves to, a loopback, private or reserved address."""


def is_public(address: str) -> bool:
    """True when ``address`` (an IP) is reachable on the internet: not private, not reserved."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
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
