"""Where images may be fetched from: allowed hosts, and public addresses unless trusted.

Server-side request forgery is the risk of an image proxy: a task's ``imageUrl`` comes from an
upstream, and a fetch must never be steered to the gateway's own network (a metadata service,
an admin port, Redis). So:

- the URL's host must be allowed: listed exactly in ``images.allowed_hosts`` or matched by a
  wildcard there (``*``, ``*.example.com``), or an upstream's own host;
- an exactly listed host (or an upstream's) is trusted, and may resolve to any address; a host
  allowed only by a wildcard must resolve to public addresses, and the connection goes to the
  very addresses that were checked (``GuardedResolver`` is the connector's resolver, so a
  second lookup cannot answer differently);
- every redirect is checked again (``fetch`` follows them itself).
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from yarl import URL

__all__ = ["GuardedResolver", "HostPolicy", "Refused", "is_public", "refusal_in"]


class Refused(OSError):
    """A fetch the host policy forbids; nothing was sent."""


def is_public(address: str) -> bool:
    """A globally routable unicast address (IPv4-mapped IPv6 judged as the IPv4 inside)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def _normal(host: str) -> str:
    return host.strip().lower().rstrip(".").strip("[]")


class HostPolicy:
    """Decides which hosts may be fetched from, and which of them may be private."""

    def __init__(self, allowed: Iterable[str], trusted: Iterable[str]) -> None:
        entries = [_normal(entry) for entry in allowed]
        self._exact = {e for e in entries if not e.startswith("*")} | {_normal(h) for h in trusted}
        self._any = "*" in entries
        self._suffixes = tuple(e[1:] for e in entries if e.startswith("*."))

    def trusted(self, host: str) -> bool:
        """Listed exactly (or an upstream's host): may resolve to a private address."""
        return _normal(host) in self._exact

    def allows(self, host: str) -> bool:
        name = _normal(host)
        return self._any or name in self._exact or name.endswith(self._suffixes)

    def check(self, url: URL) -> None:
        """Raise Refused unless ``url`` may be fetched: http(s), an allowed host, and (for a
        literal address that is not trusted) a public one. Names are checked again when they
        resolve."""
        if url.scheme not in ("http", "https") or not url.host:
            raise Refused(f"not an http(s) URL: {url.scheme}://")
        if url.user or url.password:
            raise Refused("a URL with credentials")
        host = url.host
        if not self.allows(host):
            raise Refused(f"host {host} is not in images.allowed_hosts")
        if _is_address(host) and not self.trusted(host) and not is_public(_normal(host)):
            raise Refused(f"{host} is not a public address")


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(_normal(host))
    except ValueError:
        return False
    return True


class GuardedResolver(AbstractResolver):
    """The connector's resolver: a host that is not trusted resolves to its public addresses
    only, and to none at all (Refused) when it has no public one."""

    def __init__(self, policy: HostPolicy, inner: AbstractResolver | None = None) -> None:
        self.policy = policy
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        if self.policy.trusted(host):
            return results
        public = [r for r in results if is_public(r["host"])]
        if not public:
            raise Refused(f"{host} resolves to no public address")
        return public

    async def close(self) -> None:
        await self._inner.close()


def refusal_in(exc: BaseException | None) -> Refused | None:
    """The Refused behind an aiohttp connection error, if that is what it was."""
    while exc is not None:
        if isinstance(exc, Refused):
            return exc
        exc = exc.__cause__
    return None
