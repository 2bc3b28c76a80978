"""Locust MQTT scenario for ``loadtest.compare``: the application talks to the meter directly, no twin.

Seed 000's baselines without the architecture: ``t1'`` (Scenario 1, app <-> meter) and ``t5''``
(Scenario 3, on-demand read from the meter itself). Each request is an MQTT v5
request/response with the meter (``meters/<id>/down/read`` with ResponseTopic and
CorrelationData, answered on ``meters/<id>/up/resp/<requester>``) through the broker the
meters are attached to, reached over the app's emulated links. Timings are reported to
Locust as request events (``request_type`` ``MQTT``), so the JSON output has the same shape
as the HTTP runs. ``P2P-direct`` runs ``iterations`` such exchanges with two meters in turn
(Scenario 2's ``t2'``: the meters take part in every negotiation round).

Config (``MT_LOCUST_CONFIG``): ``broker_host``, ``broker_port``, ``username``, ``password``,
``meters``, ``case`` (``t1'`` | ``t5''`` | ``t2'``), ``max_requests``, ``meter_timeout_s``,
``iterations``.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import time
import uuid
from pathlib import Path
from typing import Any

import gevent
from gevent.event import AsyncResult
from locust import User, constant, events, task
from locust.exception import StopUser
from paho.mqtt import client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

CFG: dict[str, Any] = json.loads(Path(os.environ["MT_LOCUST_CONFIG"]).read_text())
if CFG["broker_host"] not in ("127.0.0.1", "localhost"):
    raise SystemExit(f"broker_host {CFG['broker_host']!r} is not loopback")

_budget = itertools.count()
_MAX = int(CFG.get("max_requests", 100))
_rng = random.Random(CFG.get("seed", 2))


def _on_start(environment: Any, **_: Any) -> None:
    def watch() -> None:
        while environment.runner is not None:
            gevent.sleep(0.1)
            if environment.runner.stats.total.num_requests >= _MAX:
                environment.runner.quit()
                return

    gevent.spawn(watch)


events.test_start.add_listener(_on_start)  # type: ignore[no-untyped-call]
_failures_logged = itertools.count()


def _log_failure(name: str = "", exception: Exception | None = None, response: Any = None, **_: Any) -> None:
    # The first few failures go to the log, with the answer's body, so failure counts can be explained.
    if exception is not None and next(_failures_logged) < 10:
        body = getattr(response, "text", None) or ""
        print(f"failure: {name}: {exception!r} {body[:300]}"[:500], flush=True)


events.request.add_listener(_log_failure)  # type: ignore[no-untyped-call]


class DirectMeterUser(User):
    """An application server reaching meters over MQTT, without twins."""

    wait_time = constant(float(CFG.get("think_s", 0.0)))

    def on_start(self) -> None:
        self.requester = f"direct-{uuid.uuid4().hex[:8]}"
        self.pending: dict[bytes, AsyncResult] = {}
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.requester,
                             protocol=mqtt.MQTTv5)
        client.username_pw_set(CFG["username"], CFG["password"])
        client.on_message = self._on_message
        connected = AsyncResult()
        client.on_connect = lambda c, u, f, rc, p=None: connected.set(rc)
        client.connect(CFG["broker_host"], int(CFG["broker_port"]), keepalive=60)
        client.loop_start()
        rc = connected.get(timeout=10)
        if getattr(rc, "is_failure", False):
            raise StopUser()
        done = AsyncResult()
        client.on_subscribe = lambda c, u, mid, rcs, p=None: done.set(True)
        client.subscribe(f"meters/+/up/resp/{self.requester}", qos=1)
        done.get(timeout=10)
        self.client = client

    def on_stop(self) -> None:
        client = getattr(self, "client", None)
        if client is not None:
            client.disconnect()
            client.loop_stop()

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        corr = getattr(msg.properties, "CorrelationData", None)
        if corr is not None and corr in self.pending:
            self.pending.pop(corr).set(msg.payload)

    def _exchange(self, meter: str) -> int:
        corr = uuid.uuid4().bytes
        result = AsyncResult()
        self.pending[corr] = result
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = f"meters/{meter}/up/resp/{self.requester}"
        props.CorrelationData = corr
        self.client.publish(f"meters/{meter}/down/read", json.dumps({}), qos=1, properties=props)
        try:
            payload = result.get(timeout=float(CFG.get("meter_timeout_s", 5)))
        finally:
            self.pending.pop(corr, None)
        return len(payload)

    def _timed(self, name: str, fn: Any) -> None:
        if next(_budget) >= _MAX:
            raise StopUser()
        start = time.perf_counter()
        exc: Exception | None = None
        length = 0
        try:
            length = fn()
        except (Exception, gevent.Timeout) as e:
            # gevent.Timeout is a BaseException: without it here a meter that does not answer in time
            # would kill the simulated user instead of counting as a failed request.
            exc = e if isinstance(e, Exception) else TimeoutError(f"meter did not answer: {e}")
        self.environment.events.request.fire(
            request_type="MQTT", name=name, response_time=(time.perf_counter() - start) * 1000,
            response_length=length, exception=exc, context={},
        )

    @task
    def request(self) -> None:
        case = CFG["case"]
        meters = CFG["meters"]
        if case == "t2'":
            a, b = _rng.sample(meters, 2) if len(meters) > 1 else (meters[0], meters[0])
            iterations = int(CFG.get("iterations", 10))
            self._timed(case, lambda: sum(self._exchange(a if i % 2 == 0 else b) for i in range(iterations)))
        else:
            self._timed(case, lambda: self._exchange(_rng.choice(meters)))
