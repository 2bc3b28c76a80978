"""Outbound destination policy: where the platform may send HTTP on a caller's behalf.

Two features POST to URLs that a caller chose: the gateway's async callbacks
(``X-Callback-Url``) and EMS webhooks (``PUT /meters/{id}/ems/route``). Without a policy
they are a server-side request forgery: a caller makes the platform reach loopback, the
cluster network or a cloud metadata endpoint (169.254.169.254, fd00:ec2::254). This module
is the one policy both apply (settings ``destination_*``, see docs/security.md):

* the scheme must be allowed (``destination_allowed_schemes``, default ``https,http``);
* when ``destination_allowed_hosts`` is set, the host must be one of its names (``*.example.com``
  matches every subdomain); the list narrows, it never lets an address through;
* every address the name resolves to must be a global unicast address, unless it lies in
  ``destination_allowed_cidrs``: loopback, private, link-local, carrier-grade NAT,
  unique-local, documentation, multicast, reserved, and IPv6 forms that embed an IPv4
  address (mapped, 6to4, NAT64) are refused.

The check runs twice: when the URL is accepted (:meth:`DestinationPolicy.check_url`, a 400
naming it) and when a connection is opened. The second check is what defeats DNS
rebinding: the transports of :func:`guarded_client` and :func:`guarded_async_client`
resolve the name once, check those addresses and connect to a checked address, while TLS
still verifies the certificate of the name (SNI) and the ``Host`` header stays the name.
They follow no redirects, ignore proxy variables (a proxy would bypass the check), bound
every network wait by ``destination_timeout_s`` and read at most
``destination_max_response_bytes`` of an answer (:func:`read_bounded`).
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpcore
import httpx

from metertwin.core.errors import InvalidInput
from metertwin.core.settings import Settings, get_settings

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: ``(host, port) -> addresses``; replaceable so tests can play a rebinding DNS server.
Resolver = Callable[[str, int], list[str]]

#: Ranges ``ipaddress`` calls global that still lead back inside: 6to4 and NAT64 embed an IPv4 address.
#: IPv6 forms that carry an IPv4 address: 6to4, NAT64 (well-known and local-use), the deprecated
#: IPv4-compatible ``::a.b.c.d`` and SIIT's IPv4-translated ``::ffff:0:a.b.c.d``.
_EMBEDDING_V4 = tuple(ipaddress.ip_network(n) for n in (
    "2002::/16", "64:ff9b::/96", "64:ff9b:1::/48", "::/96", "::ffff:0:0:0/96"))
_DEFAULT_PORTS = {"http": 80, "https": 443}


class DestinationRefused(InvalidInput):
    """A URL, or the address it resolves to, is not an allowed outbound destination."""

    code = "destination_refused"


def system_resolver(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (TCP), in the resolver's order, without duplicates."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]).split("%", 1)[0] for info in infos))


def split_list(raw: str) -> list[str]:
    """A comma- or space-separated setting as a list of its non-empty items."""
    return [item for item in raw.replace(",", " ").split() if item]


@dataclass
class DestinationPolicy:
    """What outbound HTTP may reach. Build from settings with :func:`policy_from_settings`."""

    schemes: frozenset[str] = frozenset({"https", "http"})
    #: Allowed host names (lower case; ``*.suffix`` for subdomains); empty: any name.
    hosts: tuple[str, ...] = ()
    #: Ranges allowed although they would be refused (e.g. ``127.0.0.1/32`` for a local demo).
    allowed_networks: tuple[IPNetwork, ...] = ()
    resolver: Resolver = field(default=system_resolver)
    timeout_s: float = 5.0
    max_response_bytes: int = 65_536

    # -- checks -------------------------------------------------------------------------------
    def address_refusal(self, address: str) -> str | None:
        """Why ``address`` is refused, or None when it may be connected to."""
        try:
            ip: IPAddress = ipaddress.ip_address(address)
        except ValueError:
            return f"{address!r} is not an IP address"
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if any(ip.version == net.version and ip in net for net in self.allowed_networks):
            return None
        if (not ip.is_global or ip.is_multicast
                or any(ip.version == net.version and ip in net for net in _EMBEDDING_V4)):
            return (f"address {ip} is loopback, private, link-local, metadata or otherwise non-public "
                    "(allow it with destination_allowed_cidrs)")
        return None

    def host_allowed(self, host: str) -> bool:
        if not self.hosts:
            return True
        name = host.lower().rstrip(".")
        return any(name == h or (h.startswith("*.") and name.endswith(h[1:])) for h in self.hosts)

    def checked_addresses(self, host: str, port: int) -> list[str]:
        """Resolve ``host`` once and return its addresses if every one is allowed (connect time)."""
        try:
            addresses = self.resolver(host, port)
        except (OSError, UnicodeError) as exc:
            raise DestinationRefused(f"host {host!r} does not resolve: {exc}", host=host) from None
        if not addresses:
            raise DestinationRefused(f"host {host!r} resolves to no address", host=host)
        for address in addresses:
            reason = self.address_refusal(address)
            if reason is not None:
                # One refused address refuses the name: a client may pick any of them.
                raise DestinationRefused(f"host {host!r} resolves to {address}: {reason}", host=host,
                                         address=address)
        return addresses

    def check_url(self, url: str, what: str = "destination") -> httpx.URL:
        """Raise :class:`DestinationRefused` (a 400 naming ``url``) unless ``url`` may be called now."""
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, TypeError) as exc:
            raise DestinationRefused(f"{what} {url!r} is not a URL: {exc}", url=url) from None
        if parsed.scheme not in self.schemes:
            raise DestinationRefused(f"{what} {url!r}: scheme {parsed.scheme!r} is not allowed "
                                     f"(allowed: {sorted(self.schemes)})", url=url)
        host = parsed.host
        if not host:
            raise DestinationRefused(f"{what} {url!r} has no host", url=url)
        if not self.host_allowed(host):
            raise DestinationRefused(f"{what} {url!r}: host {host!r} is not in destination_allowed_hosts",
                                     url=url)
        port = parsed.port or _DEFAULT_PORTS.get(parsed.scheme, 443)
        try:
            self.checked_addresses(host, port)
        except DestinationRefused as exc:
            raise DestinationRefused(f"{what} {url!r} refused: {exc.message}", url=url) from None
        return parsed


def policy_from_settings(settings: Settings | None = None, resolver: Resolver = system_resolver
                         ) -> DestinationPolicy:
    """The policy the ``destination_*`` settings describe."""
    s = settings or get_settings()
    networks: list[IPNetwork] = []
    for item in split_list(s.destination_allowed_cidrs):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError as exc:
            raise InvalidInput(f"destination_allowed_cidrs: {item!r} is not a CIDR range: {exc}") from None
    return DestinationPolicy(
        schemes=frozenset(x.lower() for x in split_list(s.destination_allowed_schemes)),
        hosts=tuple(x.lower().rstrip(".") for x in split_list(s.destination_allowed_hosts)),
        allowed_networks=tuple(networks),
        resolver=resolver,
        timeout_s=s.destination_timeout_s,
        max_response_bytes=s.destination_max_response_bytes,
    )


# -- transports that connect only to checked addresses ---------------------------------------
class _GuardedBackend(httpcore.SyncBackend):
    def __init__(self, policy: DestinationPolicy) -> None:
        self.policy = policy

    def connect_tcp(self, host: str, port: int, timeout: float | None = None, local_address: str | None = None,
                    socket_options: Iterable[Any] | None = None) -> httpcore.NetworkStream:
        last: Exception | None = None
        for address in self.policy.checked_addresses(host, port):
            try:
                return super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last = exc
        raise last or httpcore.ConnectError(f"no address of {host!r} answered")


class _AsyncGuardedBackend(httpcore.AnyIOBackend):
    def __init__(self, policy: DestinationPolicy) -> None:
        self.policy = policy

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None, socket_options: Iterable[Any] | None = None
                          ) -> httpcore.AsyncNetworkStream:
        # The resolver blocks (getaddrinfo): off the event loop.
        addresses = await asyncio.to_thread(self.policy.checked_addresses, host, port)
        last: Exception | None = None
        for address in addresses:
            try:
                return await super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                last = exc
        raise last or httpcore.ConnectError(f"no address of {host!r} answered")


def _pool_options(ssl_context: ssl.SSLContext, limits: httpx.Limits) -> dict[str, Any]:
    return {"ssl_context": ssl_context, "max_connections": limits.max_connections,
            "max_keepalive_connections": limits.max_keepalive_connections,
            "keepalive_expiry": limits.keepalive_expiry}


def guarded_client(policy: DestinationPolicy, *, limits: httpx.Limits | None = None) -> httpx.Client:
    """A sync client whose every connection passes ``policy`` (no redirects, no proxies, bounded waits)."""
    limits = limits or httpx.Limits(max_connections=20, max_keepalive_connections=5)
    transport = httpx.HTTPTransport(trust_env=False, limits=limits)
    transport._pool = httpcore.ConnectionPool(  # the one pool option httpx does not expose
        network_backend=_GuardedBackend(policy), **_pool_options(httpx.create_ssl_context(), limits))
    return httpx.Client(transport=transport, timeout=httpx.Timeout(policy.timeout_s), follow_redirects=False,
                        trust_env=False)


def guarded_async_client(policy: DestinationPolicy, *, limits: httpx.Limits | None = None) -> httpx.AsyncClient:
    """The async twin of :func:`guarded_client`."""
    limits = limits or httpx.Limits(max_connections=50, max_keepalive_connections=10)
    transport = httpx.AsyncHTTPTransport(trust_env=False, limits=limits)
    transport._pool = httpcore.AsyncConnectionPool(
        network_backend=_AsyncGuardedBackend(policy), **_pool_options(httpx.create_ssl_context(), limits))
    return httpx.AsyncClient(transport=transport, timeout=httpx.Timeout(policy.timeout_s),
                             follow_redirects=False, trust_env=False)


def read_bounded(chunks: Iterable[bytes], limit: int, deadline: float | None = None) -> bytes:
    """At most ``limit`` bytes of a streamed answer; the rest is never read.

    With ``deadline`` (a ``time.monotonic()`` value), :class:`httpx.ReadTimeout` once it has
    passed: a timeout per read alone lets a peer that trickles a byte at a time hold the caller
    for ``limit`` times that timeout.
    """
    out = bytearray()
    for chunk in chunks:
        out += chunk[: limit - len(out)]
        if len(out) >= limit:
            break
        if deadline is not None and time.monotonic() > deadline:
            raise httpx.ReadTimeout(f"answer not complete by the deadline ({len(out)} bytes read)")
    return bytes(out)


def post(client: httpx.Client, policy: DestinationPolicy, url: str, *, content: bytes,
         headers: dict[str, str]) -> tuple[int, bytes]:
    """POST through a guarded client; (status, at most ``max_response_bytes`` of the body), the
    answer's body read within twice ``timeout_s`` (as :func:`post_async` bounds its exchange)."""
    deadline = time.monotonic() + 2 * policy.timeout_s
    with client.stream("POST", url, content=content, headers=headers) as resp:
        return resp.status_code, read_bounded(resp.iter_bytes(), policy.max_response_bytes, deadline)


async def post_async(client: httpx.AsyncClient, policy: DestinationPolicy, url: str, *, content: bytes,
                     headers: dict[str, str]) -> tuple[int, bytes]:
    """:func:`post` for the async client, the whole exchange bounded by twice ``timeout_s``."""

    async def exchange() -> tuple[int, bytes]:
        async with client.stream("POST", url, content=content, headers=headers) as resp:
            out = bytearray()
            async for chunk in resp.aiter_bytes():
                out += chunk[: policy.max_response_bytes - len(out)]
                if len(out) >= policy.max_response_bytes:
                    break
            return resp.status_code, bytes(out)

    return await asyncio.wait_for(exchange(), 2 * policy.timeout_s)

