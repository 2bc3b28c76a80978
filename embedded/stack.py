"""The whole of metertwin on one machine: what ``make demo``, the benchmarks and the load tests start.

Real processes on free loopback ports: one Mosquitto (dynamic security), a Redis per
zone (edge, fog, cloud), moto's S3 server, and one gateway process per zone serving
that zone's functions from ``stack.yml``. Secrets are generated into a private
temporary directory laid out as OpenFaaS mounts them. :meth:`EmbeddedStack.stop`
stops everything it started, in reverse order.
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

from metertwin.core.auth import issue_token
from storage.embedded import Mosquitto, MotoS3, RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "stack.yml"
ZONES = ("edge", "fog", "cloud")


@dataclass
class EmbeddedStack:
    """Start with :meth:`start` (or as a context manager); everything is stopped by :meth:`stop`."""

    zones: tuple[str, ...] = ZONES
    stack_path: Path = STACK
    gateway_args: list[str] = field(default_factory=list)
    with_s3: bool = True

    def __post_init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="metertwin-stack-"))
        self.secrets_dir = self.dir / "secrets"
        self.signing_key = secrets.token_urlsafe(32)
        self.basic_auth_password = secrets.token_urlsafe(16)
        self.broker: Mosquitto | None = None
        self.redis: dict[str, RedisServer] = {}
        self.s3: MotoS3 | None = None
        self.gateways: dict[str, Any] = {}
        self.ports: dict[str, int] = {}
        self._http: httpx.Client | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> Self:
        from gateway.server import GatewayProcess

        try:
            self.broker = Mosquitto()
            for zone in ZONES:
                self.redis[zone] = RedisServer()
            if self.with_s3:
                self.s3 = MotoS3()
            self._write_secrets()
            # Ports first: functions reach their own zone's gateway (forwards, nudges), so the
            # environment must name every gateway's URL before any of them starts.
            self.ports = {zone: free_port() for zone in self.zones}
            env = self.environment()
            for zone in self.zones:
                self.gateways[zone] = GatewayProcess(
                    self.stack_path, zone, port=self.ports[zone], secrets_dir=self.secrets_dir, env=env,
                    args=self.gateway_args, log_path=self.dir / f"gateway-{zone}.log",
                )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None
        for gw in reversed(list(self.gateways.values())):
            with contextlib.suppress(Exception):
                gw.stop()
        self.gateways.clear()
        for svc in [self.s3, *self.redis.values(), self.broker]:
            if svc is not None:
                with contextlib.suppress(Exception):
                    svc.stop()
        self.redis.clear()
        self.s3 = self.broker = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- configuration --------------------------------------------------------------------
    def _write_secrets(self) -> None:
        assert self.broker is not None
        self.secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        values = {
            "token-signing-key": self.signing_key,
            "mqtt-password": self.broker.service_password,
            "gateway-basic-auth-password": self.basic_auth_password,
            "s3-access-key-id": "testing",
            "s3-secret-access-key": "testing",
        }
        for name, value in values.items():
            path = self.secrets_dir / name
            path.write_text(value)
            path.chmod(0o600)

    def environment(self) -> dict[str, str]:
        """The variables stack.yml's ``${...}`` placeholders read, pointing at this stack."""
        assert self.broker is not None
        env = {
            "MQTT_USERNAME": self.broker.service_user,
            "OPENFAAS_URL": "",
        }
        for zone in ZONES:
            z = zone.upper()
            env[f"{z}_REDIS_URL"] = self.redis[zone].url
            env[f"{z}_MQTT_HOST"] = self.broker.host
            env[f"{z}_MQTT_PORT"] = str(self.broker.port)
        if self.s3 is not None:
            env["S3_ENDPOINT_URL"] = self.s3.url
        for zone, port in self.ports.items():
            env[f"{zone.upper()}_GATEWAY_URL"] = f"http://127.0.0.1:{port}"
        return env

    # -- clients --------------------------------------------------------------------------
    def url(self, zone: str) -> str:
        return str(self.gateways[zone].url)

    def token(self, *scopes: str, meter: str | None = None, subject: str = "demo") -> str:
        return issue_token(subject, set(scopes), meter=meter, key=self.signing_key)

    @property
    def http(self) -> httpx.Client:
        if self._http is None:
            self._http = httpx.Client(timeout=httpx.Timeout(30.0))
        return self._http

    def call(
        self, zone: str, function: str, method: str, path: str, *, token: str | None = None, **kwargs: Any
    ) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}) or {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        return self.http.request(method, f"{self.url(zone)}/function/{function}{path}", headers=headers, **kwargs)

    def provision(self, meter_ids: list[str], profile: dict[str, Any] | None = None) -> dict[str, str]:
        """Provision twins in the edge zone; returns ``{meter_id: mqtt_password}``."""
        meters = [{"meter_id": m, **({"profile": profile} if profile else {})} for m in meter_ids]
        credentials: dict[str, str] = {}
        admin = self.token("admin")
        for start in range(0, len(meters), 5000):
            resp = self.call("edge", "edge-registry", "POST", "/meters/bulk", token=admin,
                             json={"meters": meters[start : start + 5000]})
            if resp.status_code != 201:
                raise RuntimeError(f"provisioning failed: {resp.status_code} {resp.text[:300]}")
            credentials.update({m["meter_id"]: m["password"] for m in resp.json()["meters"]})
        return credentials
