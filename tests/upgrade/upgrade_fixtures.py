"""Shared helpers of the upgrade tests against a real Redis: twins, readings, and meters played by the test.

The meter's side is played by :class:`Meters`: the manager's ``publish`` hook hands each rebind
to a function that answers like a meter (``on_ack``), drops it (a missed rebind) or holds it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from metertwin.core.clients import get_redis
from metertwin.twin import keys as twin_keys
from metertwin.twin.messages import CommandAck
from metertwin.twin.state import twin_store
from metertwin.upgrade import keys as upgrade_keys
from metertwin.upgrade import twin_v2
from metertwin.upgrade.inbox import v1_ingest
from metertwin.upgrade.operations import OperationSpec, UpgradeManager


def measurement(seq: int, kwh: float | None = None) -> str:
    return json.dumps({"ts": 1_700_000_000.0 + seq, "import_kwh": kwh if kwh is not None else 100.0 + seq / 1000,
                       "export_kwh": 0.5, "power_w": 1200.0 + seq, "voltage_v": 231.0})


def ingest(release: str, meter_id: str, seq: int) -> str:
    script = v1_ingest(get_redis()) if release == "v1" else twin_v2.v2_ingest(get_redis())
    return script.run(meter_id, measurement(seq), 1_700_000_000.0 + seq, seq).result


@pytest.fixture
def twins(env: dict[str, str]) -> Callable[[int], list[str]]:
    counter = iter(range(1_000_000))

    def make(n: int) -> list[str]:
        ids = [f"up-{next(counter)}-{i}" for i in range(n)]
        for meter_id in ids:
            assert twin_store(get_redis()).create(meter_id, "edge", {})
        return ids

    return make


class Meters:
    """Plays the meters for the manager: acks rebinds at once unless told to drop or hold them."""

    def __init__(self) -> None:
        self.manager: UpgradeManager | None = None
        self.sent: list[tuple[str, dict[str, Any]]] = []
        self.drop: set[str] = set()
        self.held: list[tuple[str, dict[str, Any]]] = []
        self.hold = False
        self.bindings: dict[str, str] = {}

    def publish(self, meter_id: str, payload: dict[str, Any], ttl_s: int) -> None:
        self.sent.append((meter_id, payload))
        if meter_id in self.drop:
            self.drop.discard(meter_id)  # lost once (meter offline, message expired)
            return
        if self.hold:
            self.held.append((meter_id, payload))
            return
        self.answer(meter_id, payload)

    def answer(self, meter_id: str, payload: dict[str, Any]) -> None:
        assert self.manager is not None
        self.bindings[meter_id] = payload["params"]["version"]
        ack = CommandAck(id=payload["params"]["id"], status="applied", reported={"binding": self.bindings[meter_id]},
                         ts=time.time())
        self.manager.on_ack(meter_id, ack)

    def release_held(self) -> None:
        held, self.held = self.held, []
        for meter_id, payload in held:
            self.answer(meter_id, payload)


@pytest.fixture
def meters(env: dict[str, str]) -> Meters:
    return Meters()


def manager(meters: Meters, **kwargs: Any) -> UpgradeManager:
    mgr = UpgradeManager(get_redis(), instance="test-manager", publish=meters.publish,
                         metrics=lambda url: "", **kwargs)
    meters.manager = mgr
    return mgr


def spec(ids: list[str], **kwargs: Any) -> OperationSpec:
    return OperationSpec.model_validate({"to": "v2", "select": {"meters": ids}, "drain_s": 0,
                                         "resend_after_s": 0.1, **kwargs})


def bound(meter_id: str) -> str:
    return str(get_redis().hget(twin_keys.twin(meter_id), "b") or "v1")


def switching(meter: str, op: str = "op1", phase: str = "synced") -> None:
    """A switch record of ``meter`` from v1 to v2 in ``phase``, as the manager writes it."""
    get_redis().hset(upgrade_keys.upgrade_switch(meter), mapping={"op": op, "from": "v1", "to": "v2", "phase": phase,
                                                          "rid": f"rb.{op}.v2", "s0": "-1"})
