"""The whole of metertwin on one machine: what ``make demo``, the benchmarks and the load tests start.

Real processes on free loopback ports: one Mosquitto (dynamic security), a Redis per
zone (edge, fog, cloud), moto's S3 server, and one gateway process per zone serving
that zone's functions from ``stack.yml``. Secrets are generated into a private
temporary directory laid out as OpenFaaS mounts them. :meth:`EmbeddedStack.stop`
stops everything it started, in reverse order.

Redis persists to an append-only file and Mosquitto its sessions, both in the stack's
data folder (``<dir>/data``), and each gateway has a stable instance name
(``stack-<zone>``, the key of its MQTT session): a child that dies comes back with its data
and its unacknowledged messages. A supervisor thread restarts every child that exits
(same port, same data), with back-off, and logs it (logger ``embedded.stack``), so the demo
keeps running through a crash; the fault suite (tests/embedded/test_faults.py,
``python -m loadtest.faults``) kills children and relies on the same mechanism.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import httpx

from metertwin.core.auth import issue_token
from storage.embedded import Mosquitto, MotoS3, RedisServer, free_port

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "stack.yml"
ZONES = ("edge", "fog", "cloud")
log = logging.getLogger("embedded.stack")

#: Supervisor: how often children are checked, and the restart back-off.
POLL_S = 0.1
BACKOFF_MIN_S = 0.2
BACKOFF_MAX_S = 10.0
#: A child that ran this long before dying is restarted after the minimum back-off again.
STABLE_S = 30.0


@dataclass
class _Child:
    """One supervised process: how to tell it is alive and how to start it again."""

    name: str
    alive: Callable[[], bool]
    start: Callable[[], None]
    started_at: float = field(default_factory=time.monotonic)
    backoff_s: float = BACKOFF_MIN_S
    restarts: int = 0


@dataclass
class EmbeddedStack:
    """Start with :meth:`start` (or as a context manager); everything is stopped by :meth:`stop`."""

    zones: tuple[str, ...] = ZONES
    stack_path: Path = STACK
    gateway_args: list[str] = field(default_factory=list)
    with_s3: bool = True
    #: Restart children that die (see the module docstring).
    supervise: bool = True
    #: Extra environment for the gateways (and so their functions), e.g. ``MDMS_S3_TIMEOUT_S``.
    extra_env: dict[str, str] = field(default_factory=dict)
    #: Fixed gateway ports by zone (``python -m embedded.zone --port 8080``); others get free ones.
    fixed_ports: dict[str, int] = field(default_factory=dict)

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
        self.data_dir = self.dir / "data"
        self._children: dict[str, _Child] = {}
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self) -> Self:
        from gateway.server import GatewayProcess

        try:
            self.broker = Mosquitto(data_dir=self.data_dir / "mosquitto")
            self._watch("mosquitto", self.broker.alive, self.broker.start)
            for zone in ZONES:
                server = self.redis[zone] = RedisServer(data_dir=self.data_dir / f"redis-{zone}")
                self._watch(f"redis-{zone}", server.alive, server.start)
            if self.with_s3:
                self.s3 = MotoS3()
                self._watch("s3", self.s3.alive, self.s3.start)
            self._write_secrets()
            # Ports first: functions reach their own zone's gateway (forwards, nudges), so the
            # environment must name every gateway's URL before any of them starts.
            self.ports = {zone: self.fixed_ports.get(zone) or free_port() for zone in self.zones}
            env = self.environment()
            for zone in self.zones:
                self._start_gateway(GatewayProcess, zone, env)
                self._watch(f"gateway-{zone}", self._gateway_alive(zone), self._gateway_starter(zone, env))
        except BaseException:
            self.stop()
            raise
        if self.supervise:
            self._supervisor = threading.Thread(target=self._supervise, name="stack-supervisor", daemon=True)
            self._supervisor.start()
        return self

    def _start_gateway(self, factory: Any, zone: str, env: dict[str, str]) -> None:
        args = list(self.gateway_args)
        if "--instance" not in args:
            # A stable instance name is a stable MQTT session: a restarted gateway gets the
            # messages its predecessor had not acknowledged.
            args += ["--instance", f"stack-{zone}"]
        if "--workers" not in args:
            # One worker per zone: plain subscriptions, which survive a broker restart.
            args.append("--mqtt-no-share")
        self.gateways[zone] = factory(
            self.stack_path, zone, port=self.ports[zone], secrets_dir=self.secrets_dir, env=env,
            args=args, log_path=self.dir / f"gateway-{zone}.log",
        )

    def _gateway_starter(self, zone: str, env: dict[str, str]) -> Callable[[], None]:
        from gateway.server import GatewayProcess

        def start() -> None:
            self._start_gateway(GatewayProcess, zone, env)

        return start

    def _gateway_alive(self, zone: str) -> Callable[[], bool]:
        return lambda: zone in self.gateways and self.gateways[zone].proc.poll() is None

    # -- supervision ----------------------------------------------------------------------
    def _watch(self, name: str, alive: Callable[[], bool], start: Callable[[], None]) -> None:
        self._children[name] = _Child(name, alive, start)

    def restarts(self) -> dict[str, int]:
        """How many times the supervisor restarted each child."""
        return {name: child.restarts for name, child in self._children.items()}

    def wait_restarted(self, name: str, count: int, timeout_s: float = 60.0) -> None:
        """Block until child ``name`` has been restarted ``count`` times in all and runs."""
        deadline = time.monotonic() + timeout_s
        child = self._children[name]
        while not (child.restarts >= count and child.alive()):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not restarted {count} times within {timeout_s} s "
                                   f"({child.restarts} so far)")
            time.sleep(0.02)

    def _supervise(self) -> None:
        while not self._stopping.wait(POLL_S):
            for child in list(self._children.values()):
                if self._stopping.is_set():
                    return
                if not child.alive():
                    self._restart(child)

    def _restart(self, child: _Child) -> None:
        if time.monotonic() - child.started_at >= STABLE_S:
            child.backoff_s = BACKOFF_MIN_S
        log.warning("%s died; restarting it in %.1f s (restart %d)", child.name, child.backoff_s,
                    child.restarts + 1)
        if self._stopping.wait(child.backoff_s):
            return
        try:
            child.start()
        except Exception as exc:  # keep supervising; the next poll tries again, later
            log.error("restarting %s failed: %s", child.name, exc)
            child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)
            return
        child.restarts += 1
        child.started_at = time.monotonic()
        log.warning("%s restarted", child.name)
        child.backoff_s = min(child.backoff_s * 2, BACKOFF_MAX_S)

    def stop(self) -> None:
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join(timeout=60)
            self._supervisor = None
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
        return {**env, **self.extra_env}

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
