"""The integrators' entry point: one :class:`Client` over the three zone gateways (edge, fog, cloud).

Each function has its namespace: ``client.read.reading("m-1")``, ``client.mdms.load_profile(...)``,
``client.registry.iter_meters()``. Every call carries the client's bearer token, retries
429/503 with back-off honouring ``Retry-After`` and raises :class:`metertwin.client.errors.ApiError`
subclasses mapped from our JSON error bodies. ``Client.from_env()`` reads what
``source .run/demo.env`` (``make demo``) sets.
"""

from __future__ import annotations

import os
from typing import Any, Self, TypeVar

import httpx

from metertwin.client.errors import ApiError
from metertwin.client.fleet import Fleet
from metertwin.client.grid import Grid
from metertwin.client.jobs import Jobs
from metertwin.client.markets import DemandResponse, P2PBid, P2PMarket, Upgrades
from metertwin.client.mdms import Archive, MdmsIngest, MdmsQuery
from metertwin.client.transport import Api, Transport
from metertwin.client.twins import Forward, Ingest, Read, ReadV2, Registry, Write

A = TypeVar("A", bound=Api)


class System:
    """A zone gateway's own API (``/system/*`` behind basic auth, ``/healthz``, ``/openapi.json``)."""

    def __init__(self, transport: Transport, basic_auth: tuple[str, str] | None) -> None:
        self._t = transport
        self._auth = basic_auth

    def _basic(self) -> tuple[str, str]:
        if self._auth is None:
            raise ApiError("no basic-auth credentials for /system (pass basic_auth=(user, password))")
        return self._auth

    def functions(self) -> list[dict[str, Any]]:
        """Deployed functions with their invocation counts."""
        return list(self._t.send("GET", "/system/functions", auth=self._basic()).json())

    def info(self) -> dict[str, Any]:
        return dict(self._t.send("GET", "/system/info", auth=self._basic()).json())

    def healthy(self) -> bool:
        try:
            self._t.send("GET", "/healthz")
        except ApiError:
            return False
        return True

    def openapi(self) -> dict[str, Any]:
        """The zone's OpenAPI document (every function's routes): feed it to a client generator."""
        return dict(self._t.send("GET", "/openapi.json").json())

    def invoke_async(self, function: str, path: str, *, callback_url: str, json: Any = None) -> str:
        """``POST /async-function/<function><path>``: queued (202); the answer is POSTed to ``callback_url``.
        Returns the call id (``X-Call-Id``)."""
        resp = self._t.send("POST", f"/async-function/{function}{path}", json=json,
                            headers={"X-Callback-Url": callback_url})
        return str(resp.headers.get("X-Call-Id", ""))


class Zone:
    """The functions of one zone behind its gateway."""

    def __init__(self, transport: Transport, basic_auth: tuple[str, str] | None) -> None:
        self.transport = transport
        self.system = System(transport, basic_auth)


class Client:
    """Typed access to every REST route of every metertwin function.

    ``edge``, ``fog`` and ``cloud`` are the zones' gateway URLs (a zone left out is not reachable
    through this client). ``token`` is a bearer token (``python -m metertwin.tokens issue``).
    """

    def __init__(
        self, *, edge: str | None = None, fog: str | None = None, cloud: str | None = None, token: str | None = None,
        timeout_s: float = 30.0, retries: int = 4, basic_auth: tuple[str, str] | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self._owned = http is None
        self._http = http or httpx.Client(timeout=httpx.Timeout(timeout_s))
        self._urls = {"edge": edge, "fog": fog, "cloud": cloud}
        self.token, self.timeout_s, self.retries, self.basic_auth = token, timeout_s, retries, basic_auth
        self.zones: dict[str, Zone] = {
            name: Zone(Transport(url, token, timeout_s, retries, http=self._http), basic_auth)
            for name, url in self._urls.items() if url
        }
        self.registry = self._api(Registry, "edge")
        self.fleet = self._api(Fleet, "edge")
        self.jobs = self._api(Jobs, "edge")
        self.read = self._api(Read, "edge")
        self.read_v2 = self._api(ReadV2, "edge")
        self.write = self._api(Write, "edge")
        self.forward = self._api(Forward, "edge")
        self.ingest = self._api(Ingest, "edge")
        self.ingest_v2 = self._api(Ingest, "edge", "edge-ingest-v2")
        self.p2p = self._api(P2PMarket, "edge")
        self.p2p_bid = self._api(P2PBid, "edge")
        self.dr = self._api(DemandResponse, "edge")
        self.upgrades = self._api(Upgrades, "edge")
        self.mdms_ingest = self._api(MdmsIngest, "fog")
        self.mdms = self._api(MdmsQuery, "fog")
        self.grid = self._api(Grid, "fog")
        self.archive = self._api(Archive, "cloud")

    def _api(self, cls: type[A], zone: str, function: str | None = None) -> A:
        z = self.zones.get(zone)
        transport = z.transport if z else Transport(f"http://unconfigured-{zone}-gateway.invalid", self.token,
                                                    self.timeout_s, 0, http=self._http)
        api = cls(transport)
        if function:
            api.function = function
        return api

    @classmethod
    def from_env(cls, *, token: str | None = None, **kwargs: Any) -> Self:
        """Gateways from ``EDGE_GATEWAY_URL``, ``FOG_GATEWAY_URL``, ``CLOUD_GATEWAY_URL``; the token from
        ``token`` or ``METERTWIN_TOKEN``; basic auth from ``GATEWAY_USER`` and ``GATEWAY_PASSWORD_FILE``."""
        auth = None
        pw_file = os.environ.get("GATEWAY_PASSWORD_FILE")
        if pw_file and os.path.exists(pw_file):
            with open(pw_file) as f:
                auth = (os.environ.get("GATEWAY_USER", "admin"), f.read().strip())
        return cls(edge=os.environ.get("EDGE_GATEWAY_URL"), fog=os.environ.get("FOG_GATEWAY_URL"),
                   cloud=os.environ.get("CLOUD_GATEWAY_URL"), token=token or os.environ.get("METERTWIN_TOKEN"),
                   basic_auth=kwargs.pop("basic_auth", auth), **kwargs)

    def with_token(self, token: str) -> Client:
        """The same gateways and connection pool under another token (e.g. a consumer's)."""
        return Client(**self._urls, token=token, timeout_s=self.timeout_s,
                      retries=self.retries, basic_auth=self.basic_auth, http=self._http)

    def system(self, zone: str) -> System:
        return self.zones[zone].system

    def close(self) -> None:
        if self._owned:
            self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
