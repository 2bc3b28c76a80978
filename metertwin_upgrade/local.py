"""One edge zone with the versioned functions on this machine: Redis, a gateway process, a broker.

What the end-to-end tests and ``loadtest/upgrade_bench.py`` start. The gateway serves the
stack written by :func:`metertwin_upgrade.stackfile.write_stack` on a port chosen first, so
that ``GATEWAY_URL`` (forwards and nudges) points at it.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Protocol, Self

import httpx

from metertwin.core.auth import issue_token
from metertwin_upgrade.stackfile import write_stack
from storage.embedded import Mosquitto, RedisServer, free_port

#: The functions a test zone needs (the P2P functions are left out: faster start).
FUNCTIONS = ("edge-registry", "edge-read", "edge-write", "edge-ingest", "edge-read-v2", "edge-ingest-v2",
             "edge-upgrade-manager")


class Broker(Protocol):
    """What the zone needs of an MQTT broker: where it is and a privileged (service) account."""

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def service_user(self) -> str: ...

    @property
    def service_password(self) -> str: ...


class UpgradeZone:
    """Start with :meth:`start` or as a context manager; :meth:`stop` stops what it started."""

    def __init__(
        self,
        *,
        broker: Broker | None = None,
        schedule: str | None = "*/1 * * * * *",
        gateway_args: list[str] | None = None,
        functions: tuple[str, ...] | None = FUNCTIONS,
        redis_maxmemory_mb: int | None = None,
    ) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="metertwin-upgrade-"))
        self.secrets_dir = self.dir / "secrets"
        self.signing_key = secrets.token_urlsafe(32)
        self.basic_auth_password = secrets.token_urlsafe(16)
        self._own_broker = broker is None
        self.broker: Broker | None = broker
        self.redis: RedisServer | None = None
        self.gateway: Any = None
        self.schedule = schedule
        self.gateway_args = gateway_args or []
        self.functions = functions
        self.redis_maxmemory_mb = redis_maxmemory_mb
        self.port = free_port()
        self._http: httpx.Client | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Self:
        from gateway.server import GatewayProcess

        try:
            if self.broker is None:
                self.broker = Mosquitto()
            self.redis = RedisServer(maxmemory_mb=self.redis_maxmemory_mb)
            self.secrets_dir.mkdir(mode=0o700, parents=True)
            for name, value in {"token-signing-key": self.signing_key,
                                "mqtt-password": self.broker.service_password,
                                "gateway-basic-auth-password": self.basic_auth_password}.items():
                (self.secrets_dir / name).write_text(value)
            stack = write_stack(self.dir / "stack.yml", schedule=self.schedule, functions=self.functions)
            self.gateway = GatewayProcess(stack, "edge", port=self.port, secrets_dir=self.secrets_dir,
                                          env=self.environment(), args=self.gateway_args,
                                          log_path=self.dir / "gateway.log")
            self.wait_connectors()
        except BaseException:
            self.stop()
            raise
        return self

    def environment(self) -> dict[str, str]:
        assert self.broker is not None
        assert self.redis is not None
        return {"EDGE_REDIS_URL": self.redis.url, "EDGE_MQTT_HOST": self.broker.host,
                "EDGE_MQTT_PORT": str(self.broker.port), "MQTT_USERNAME": self.broker.service_user,
                "EDGE_GATEWAY_URL": self.url, "OPENFAAS_URL": ""}

    def wait_connectors(self, timeout_s: float = 20.0) -> None:
        """Until the gateway's MQTT connector has subscribed (acks and readings are not missed)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            info = self.http.get(f"{self.url}/system/info", auth=("admin", self.basic_auth_password)).json()
            if info["connectors"]["mqtt"] == "subscribed":
                return
            time.sleep(0.05)
        raise TimeoutError(f"the gateway's MQTT connector did not subscribe within {timeout_s} s")

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        if self.gateway is not None:
            with contextlib.suppress(Exception):
                self.gateway.stop()
            self.gateway = None
        if self.redis is not None:
            with contextlib.suppress(Exception):
                self.redis.stop()
            self.redis = None
        if self._own_broker and isinstance(self.broker, Mosquitto):
            with contextlib.suppress(Exception):
                self.broker.stop()
            self.broker = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- clients ------------------------------------------------------------------------------
    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(timeout=httpx.Timeout(30.0),
                                      limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
        return self._http

    def token(self, *scopes: str, meter: str | None = None, subject: str = "upgrade-test") -> str:
        return issue_token(subject, set(scopes), meter=meter, key=self.signing_key, ttl_s=6 * 3600)

    def call(self, function: str, method: str, path: str, *, token: str | None = None,
             **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return self.http.request(method, f"{self.url}/function/{function}{path}", headers=headers, **kwargs)

    def provision(self, meter_ids: list[str]) -> dict[str, str]:
        """Twins and MQTT accounts; returns ``{meter_id: password}``."""
        out: dict[str, str] = {}
        admin = self.token("admin")
        for start in range(0, len(meter_ids), 5000):
            chunk = [{"meter_id": m} for m in meter_ids[start:start + 5000]]
            resp = self.call("edge-registry", "POST", "/meters/bulk", token=admin, json={"meters": chunk},
                             timeout=300)
            if resp.status_code != 201:
                raise RuntimeError(f"provisioning failed: {resp.status_code} {resp.text[:300]}")
            out.update({m["meter_id"]: m["password"] for m in resp.json()["meters"]})
        return out

    def metrics(self) -> str:
        return self.http.get(f"{self.url}/metrics").text
