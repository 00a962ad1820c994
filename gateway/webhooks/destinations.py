"""Where callbacks may go: ``webhooks.allow`` (hosts, ``host:port``s, CIDRs), and never to a
link-local or cloud metadata address, whatever the allow-list says.

A URL is checked before it is accepted, and every address a destination's name resolves to
is checked again when a delivery connects (``GuardedResolver``), so a name that resolves to
a forbidden address later (DNS rebinding) is still never called.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

__all__ = ["Destinations", "GuardedResolver", "forbidden_address"]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Cloud instance metadata services: AWS (and its IPv6 twin), GCP, Azure, Alibaba, Oracle.
_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in ("169.254.169.254", "fd00:ec2::254", "100.100.100.200", "192.0.0.192")
)
_METADATA_NAMES = frozenset(
    {"metadata", "metadata.google.internal", "metadata.azure.internal", "instance-data"}
)


def forbidden_address(address: IPAddress) -> bool:
    """Link-local, metadata, unspecified and multicast addresses are never called."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        address in _METADATA
        or address.is_link_local
        or address.is_unspecified
        or address.is_multicast
    )


def _address(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


class Destinations:
    """``webhooks.allow`` (as the config normalized it), applied to URLs and addresses."""

    def __init__(self, allow: tuple[str, ...]) -> None:
        self.hosts: set[str] = set()
        self.host_ports: set[tuple[str, int]] = set()
        self.networks: list[IPNetwork] = []
        for entry in allow:
            if "/" in entry:
                self.networks.append(ipaddress.ip_network(entry))
                continue
            host, colon, port = entry.rpartition(":")
            if colon and port.isdigit() and (host.startswith("[") or ":" not in host):
                self.host_ports.add((host.strip("[]"), int(port)))
            else:
                self.hosts.add(entry)

    def _named(self, host: str, port: int) -> bool:
        return host in self.hosts or (host, port) in self.host_ports

    def refusal(self, url: str) -> str | None:
        """Why a URL may not be called; None when it may (its name is checked again, by
        address, on every connection)."""
        parts = urlsplit(url)
        try:
            host, port = parts.hostname, parts.port
        except ValueError:
            return "not a valid URL"
        if parts.scheme not in ("http", "https") or not host:
            return "not an http:// or https:// URL with a host"
        port = port or (443 if parts.scheme == "https" else 80)
        address = _address(host)
        if address is not None:
            if forbidden_address(address):
                return "a link-local or metadata address: never called"
            if self._named(str(address), port) or any(address in n for n in self.networks):
                return None
        elif host in _METADATA_NAMES:
            return "a metadata host: never called"
        elif self._named(host, port) or self.networks:
            return None
        return "not in webhooks.allow"

    def address_allowed(self, host: str, port: int, address: IPAddress) -> bool:
        """May a connection to ``host`` (a name) go to ``address``?"""
        if forbidden_address(address):
            return False
        return self._named(host, port) or any(address in n for n in self.networks)


class GuardedResolver(AbstractResolver):
    """The system resolver, keeping only the addresses ``Destinations`` allows."""

    def __init__(self, destinations: Destinations) -> None:
        self._destinations = destinations
        self._resolver = DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        found = await self._resolver.resolve(host, port, family)
        allowed = [
            result
            for result in found
            if (address := _address(result["host"])) is not None
            and self._destinations.address_allowed(host.lower(), port, address)
        ]
        if not allowed:
            message = f"{host} resolves to no address webhooks.allow lets mjgate call"
            raise OSError(errno.EACCES, message)
        return allowed

    async def close(self) -> None:
        await self._resolver.close()
