"""One running architecture as the scenarios see it, and what its start-up and scenarios share.

:class:`Arch` holds the URLs as the apps reach them (through the emulated links), tokens,
the simulated meters and the proxy's byte counters; :mod:`loadtest.launch` starts it.
"""

from __future__ import annotations

import signal
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from loadtest.topology import Topology
from storage.embedded import Mosquitto

ROOT = Path(__file__).resolve().parent.parent
LOADTEST = Path(__file__).resolve().parent
#: Which capability decides where a stack function runs (by its name without the zone prefix).
CAPABILITY_OF: dict[str, str] = {
    "read": "read", "registry": "read", "write": "write", "forward": "write", "ingest": "ingest",
    "p2p-market": "p2p", "p2p-bid": "p2p", "mdms-query": "mdms-query", "mdms": "mdms-query",
    "mdms-ingest": "mdms-query", "mdms-archive": "cold-store", "dr-event": "write", "probe": "read",
}
#: Default zone of a function whose capability is unknown, by its original prefix.
ZONE_CAPABILITY: dict[str, str] = {"edge": "read", "fog": "mdms-query", "cloud": "cold-store"}


class CompareError(RuntimeError):
    """The comparison could not be set up or run."""


#: Seed 001: two readings per device and day; the billing queries cover this window.
MDMS_WINDOW_S = 86_400.0


@dataclass
class Arch:
    """One running architecture: URLs as the apps see them (through the links), tokens, meters, proxy stats."""

    topo: Topology
    dir: Path
    signing_key: str
    app_urls: dict[str, str]  # capability -> gateway base URL through the apps' links
    direct_urls: dict[str, str]  # zone -> gateway base URL without links (set-up only)
    function_names: dict[str, str]  # capability or base name -> deployed function name
    app_broker_port: int
    mosquitto: Mosquitto
    stats_port: int
    meters: list[str] = field(default_factory=list)
    ami_meters: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def token(self, *scopes: str) -> str:
        """A bearer token with ``scopes``, signed with this architecture's key."""
        from metertwin.core.auth import issue_token

        return issue_token("loadtest", set(scopes), ttl_s=4 * 3600, key=self.signing_key)

    def fn_url(self, base: str) -> str | None:
        """URL of the function serving ``base`` (``read``, ``probe``, ``mdms-query``...) as apps reach it."""
        name = self.function_names.get(base)
        if name is None:
            return None
        cap = CAPABILITY_OF.get(base, base)
        return f"{self.app_urls[cap]}/function/{name}"

    def proxy_stats(self) -> dict[str, Any]:
        """The proxy's byte counters per link and direction since the last :meth:`reset_proxy`."""
        r = httpx.get(f"http://127.0.0.1:{self.stats_port}/stats", timeout=5)
        r.raise_for_status()
        data: dict[str, Any] = r.json()
        return data

    def reset_proxy(self) -> None:
        """Zero the proxy's counters (before each Locust run)."""
        httpx.post(f"http://127.0.0.1:{self.stats_port}/reset", timeout=5).raise_for_status()


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM ``proc`` and wait for it (SIGKILL after 10 s)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
