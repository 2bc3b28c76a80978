"""Proxy wiring of one topology: every client-to-service path becomes a chain of hops, one port each."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

from loadtest.arch import CompareError
from loadtest.topology import Topology
from storage.embedded import free_port

_handed_out: set[int] = set()


def unique_port() -> int:
    """A free loopback port not handed out before by this process (ports are bound later, in other
    processes, so two calls to ``free_port`` alone could return the same one)."""
    for _ in range(1000):
        port = free_port()
        if port not in _handed_out:
            _handed_out.add(port)
            return port
    raise CompareError("no unused loopback port found")


@dataclass(frozen=True)
class Endpoint:
    """Where a client connects: a service's own port (no hop) or the first hop of a proxy chain."""

    port: int = 0
    route: str | None = None

    def resolve(self, ports: dict[str, int]) -> int:
        """The port, once the proxy has bound its routes (``ports``: route name -> port)."""
        return ports[self.route] if self.route is not None else self.port


@dataclass
class Wiring:
    """Proxy routes for one topology: every path becomes a chain of hops, one listening port each.

    The proxy binds every route's port itself (port 0) and chains hops by route name, so no port is
    picked in advance except the target services' own.
    """

    topo: Topology
    routes: list[dict[str, Any]] = field(default_factory=list)
    _memo: dict[tuple[tuple[str, ...], str], Endpoint] = field(default_factory=dict)

    def entry(self, path: list[str], service: str, target_port: int) -> Endpoint:
        """What the first node of ``path`` connects to, to reach ``service`` listening on ``target_port``."""
        if len(path) == 1:
            return Endpoint(port=target_port)
        key = (tuple(path), service)
        if key in self._memo:
            return self._memo[key]
        target: dict[str, Any] = {"target_port": target_port}
        name = ""
        for src, dst in reversed(list(itertools.pairwise(path))):
            link = self.topo.link(src, dst)
            name = f"{service}:{'>'.join(path)}:{src}->{dst}"
            self.routes.append({"name": name, "link": link.name, "src": src, "dst": dst, "listen_port": 0,
                                "target_host": "127.0.0.1", **target})
            target = {"target_route": name}
        self._memo[key] = Endpoint(route=name)
        return self._memo[key]

    def proxy_config(self) -> dict[str, Any]:
        """The ``loadtest.proxy --config`` document: every link's latency, jitter and bandwidth, every route."""
        links: dict[str, Any] = {}
        for link in self.topo.links:
            a, b = link.between
            bw = {d: v for d, v in ((f"{a}->{b}", link.bandwidth_from(a)), (f"{b}->{a}", link.bandwidth_from(b)))
                  if v is not None}
            links[link.name] = {"latency_ms": link.latency_ms, "jitter_ms": link.jitter_ms, "bandwidth_mbps": bw}
        return {"links": links, "routes": self.routes}
