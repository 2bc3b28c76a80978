"""Fault scenarios while readings flow: every reading sent is stored once, whatever dies.

On the embedded stack (supervised: a child that dies is restarted by
:class:`embedded.stack.EmbeddedStack`), simulated meters (meter_sim) report over MQTT
while, one after the other: each zone gateway is killed with ``kill -9``, the edge and
fog Redis are killed with ``kill -9`` (they persist to an AOF), Mosquitto is restarted,
and S3 is made unavailable (the moto process paused) during an archive run.

For each fault, *sent* is the readings the meters generated from the start of the fault
until it was over and the flow ran again for a while; *stored* is those of them the fog
hot tier holds (``metertwin.mdms.keys.mdms_sequences``, distinct sequence numbers);
*duplicated* is readings the fog accepted more than once (``accepted`` counter minus
distinct sequence numbers). At the edge the twin keeps the latest reading only (its
``last_seq``, and a reading at or below it is a duplicate by construction, never applied
twice): the check is that every twin's ``last_seq`` caught up with its meter. The archive fault seeds four-day-old
readings of one meter, runs the archive with S3 paused (it must fail and keep the data
hot), then with S3 back (it must move them), and counts the rows the MDMS query returns.

    python -m loadtest.faults --meters 200 --seconds 10

tests/embedded/test_faults.py runs the same scenarios, small, in ``make test``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import paho.mqtt.client as mqtt
import redis
from paho.mqtt.enums import CallbackAPIVersion

from embedded.stack import EmbeddedStack
from metertwin.core import topics
from metertwin.mdms import keys as mdms_keys
from metertwin.twin import keys as twin_keys

#: Archive fault: readings of one meter, 15 minutes apart, four days ago (older than the tiering age).
ARCHIVE_READINGS = 24
#: The stack's archive must fail fast while S3 hangs.
STACK_ENV = {"MDMS_S3_TIMEOUT_S": "1", "MDMS_S3_MAX_ATTEMPTS": "1"}


@dataclass
class FaultResult:
    """Counts for one fault (see the module docstring)."""

    fault: str
    sent: int
    stored: int
    duplicated: int
    edge_caught_up: bool
    seconds: float

    @property
    def lost(self) -> int:
        return self.sent - self.stored

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicated == 0 and self.edge_caught_up


class FaultRun:
    """A stack, a fleet and the counters; :meth:`run` goes through every fault in turn."""

    def __init__(self, stack: EmbeddedStack, *, meters: int, interval_s: float, settle_s: float,
                 catch_up_s: float = 60.0, log: Callable[[str], None] = print) -> None:
        self.stack = stack
        self.meter_ids = [f"fault-{i:05d}" for i in range(meters)]
        self.interval_s = interval_s
        self.settle_s = settle_s
        self.catch_up_s = catch_up_s
        self.log = log
        self.fleet: Any = None
        self.results: list[FaultResult] = []

    # -- setup ----------------------------------------------------------------------------
    def start(self) -> None:
        from meter_sim import FleetThread

        credentials = self.stack.provision(self.meter_ids)
        assert self.stack.broker is not None
        self.fleet = FleetThread(
            broker_host=self.stack.broker.host, broker_port=self.stack.broker.port, credentials=credentials,
            reporting_interval_s=self.interval_s, link="lan", seed=7, ems_interval_s=None,
        )
        self.fleet.start(timeout_s=60)

    def stop(self) -> None:
        if self.fleet is not None:
            self.fleet.stop()
            self.fleet = None

    # -- counting -------------------------------------------------------------------------
    def _redis(self, zone: str) -> redis.Redis:
        return redis.Redis.from_url(self.stack.redis[zone].url, decode_responses=True, socket_timeout=5)

    def sent(self) -> dict[str, int]:
        """The highest sequence number each meter has generated (-1: none yet)."""
        return {m: int(self.fleet.meter(m).seq) for m in self.meter_ids}

    def fog(self) -> tuple[dict[str, set[int]], int]:
        """Distinct stored sequence numbers per meter, and the fog's ``accepted`` total."""
        r = self._redis("fog")
        pipe = r.pipeline(transaction=False)
        for m in self.meter_ids:
            pipe.zrange(mdms_keys.mdms_sequences(m), 0, -1)
            pipe.hget(mdms_keys.mdms_counters(m), "accepted")
        out = pipe.execute()
        r.close()
        seqs = {m: {int(s) for s in out[2 * i]} for i, m in enumerate(self.meter_ids)}
        return seqs, sum(int(out[2 * i + 1] or 0) for i in range(len(self.meter_ids)))

    def edge(self) -> dict[str, tuple[int, int]]:
        """``(last_seq, version)`` of each twin."""
        r = self._redis("edge")
        pipe = r.pipeline(transaction=False)
        for m in self.meter_ids:
            pipe.hmget(twin_keys.twin(m), ["s", "v"])
        out = pipe.execute()
        r.close()
        pairs = zip(self.meter_ids, out, strict=True)
        return {m: (int(s if s is not None else -1), int(v or 0)) for m, (s, v) in pairs}

    def _safe(self, fn: Callable[[], Any]) -> Any:
        """``fn()``, retried while the Redis it reads is itself restarting."""
        deadline = time.monotonic() + self.catch_up_s
        while True:
            try:
                return fn()
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    # -- one fault ------------------------------------------------------------------------
    def _wait_stored(self, upto: dict[str, int], since: dict[str, int] | None = None) -> None:
        """Until the fog holds every seq in (since, upto] and every twin's last_seq reached upto."""

        def stored() -> bool:
            seqs, _ = self.fog()
            edge = self.edge()
            return all(set(range((since or {}).get(m, -1) + 1, upto[m] + 1)) <= seqs[m] and edge[m][0] >= upto[m]
                       for m in self.meter_ids)

        deadline = time.monotonic() + self.catch_up_s
        while not self._safe(stored) and time.monotonic() < deadline:
            time.sleep(0.1)

    def fault(self, name: str, action: Callable[[], None]) -> FaultResult:
        """Inject ``action`` while readings flow; wait until everything sent so far is stored; count."""
        before = self.sent()
        self._wait_stored(before)  # what came before is not this fault's
        fog_before, accepted_before = self._safe(self.fog)
        t0 = time.monotonic()
        action()
        time.sleep(self.settle_s)  # the flow goes on after the fault: the readings to count
        after = self.sent()
        self._wait_stored(after, before)
        fog_after, accepted_after = self._safe(self.fog)
        edge_after = self._safe(self.edge)
        window = {m: set(range(before[m] + 1, after[m] + 1)) for m in self.meter_ids}
        result = FaultResult(
            fault=name, sent=sum(len(w) for w in window.values()),
            stored=sum(len(window[m] & fog_after[m]) for m in self.meter_ids),
            duplicated=(accepted_after - accepted_before)
            - sum(len(fog_after[m]) - len(fog_before[m]) for m in self.meter_ids),
            edge_caught_up=all(edge_after[m][0] >= after[m] for m in self.meter_ids),
            seconds=round(time.monotonic() - t0, 1),
        )
        self.results.append(result)
        self.log(f"  {name}: sent {result.sent} stored {result.stored} duplicated {result.duplicated} "
                 f"({result.seconds} s)")
        return result

    # -- the faults -----------------------------------------------------------------------
    def kill_gateway(self, zone: str) -> Callable[[], None]:
        def action() -> None:
            count = self.stack.restarts()[f"gateway-{zone}"]
            self.stack.gateways[zone].kill()
            self.stack.wait_restarted(f"gateway-{zone}", count + 1)

        return action

    def kill_redis(self, zone: str) -> Callable[[], None]:
        def action() -> None:
            count = self.stack.restarts()[f"redis-{zone}"]
            self.stack.redis[zone].kill()
            self.stack.wait_restarted(f"redis-{zone}", count + 1)

        return action

    def restart_broker(self) -> None:
        assert self.stack.broker is not None
        count = self.stack.restarts()["mosquitto"]
        self.stack.broker.terminate()  # graceful: the broker saves its sessions, the supervisor starts it
        self.stack.wait_restarted("mosquitto", count + 1)

    def archive_with_s3_down(self) -> FaultResult:
        """Old readings of one meter; archive with S3 paused (fails, data stay hot), then with S3 back."""
        assert self.stack.s3 is not None
        meter = "fault-archive"
        self.stack.provision([meter])
        day0 = (int(time.time()) // 86400 - 4) * 86400
        stamps = [day0 + 3600 + 900 * i for i in range(ARCHIVE_READINGS)]
        t0 = time.monotonic()
        publish_readings(self.stack, meter, stamps)
        r = self._redis("fog")
        deadline = time.monotonic() + self.catch_up_s
        while r.zcard(mdms_keys.mdms_sequences(meter)) < ARCHIVE_READINGS and time.monotonic() < deadline:
            time.sleep(0.05)
        mdms = self.stack.token("mdms")
        self.stack.s3.pause()
        try:
            down = self.stack.call("cloud", "cloud-mdms-archive", "POST", "/run", token=mdms, timeout=120)
        finally:
            self.stack.s3.resume()
        hot_after_failure = r.zcard(mdms_keys.mdms_intervals(meter))
        up = self.stack.call("cloud", "cloud-mdms-archive", "POST", "/run", token=mdms, timeout=120)
        r.close()
        frm = datetime.fromtimestamp(day0, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        to = datetime.fromtimestamp(day0 + 86400 - 1, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        rows = self.stack.call("fog", "fog-mdms-query", "GET", f"/meters/{meter}/intervals",
                               token=mdms, params={"from": frm, "to": to, "limit": "1000"}).json()["rows"]
        seqs = [row["seq"] for row in rows if row.get("seq") is not None]
        tiers = {row.get("tier") for row in rows}
        self.log(f"  archive with S3 paused: {down.status_code} {down.json().get('status')}, "
                 f"{hot_after_failure} rows still hot; with S3 back: {up.status_code} {up.json().get('status')}, "
                 f"rows now in tiers {sorted(str(t) for t in tiers)}")
        ok = down.status_code == 503 and hot_after_failure >= ARCHIVE_READINGS and up.status_code == 200
        result = FaultResult(
            fault="S3 unavailable during archive", sent=ARCHIVE_READINGS, stored=len(set(seqs)),
            duplicated=len(seqs) - len(set(seqs)), edge_caught_up=ok,
            seconds=round(time.monotonic() - t0, 1),
        )
        self.results.append(result)
        return result

    def run(self) -> list[FaultResult]:
        for zone in self.stack.zones:
            self.fault(f"kill -9 gateway {zone}", self.kill_gateway(zone))
        for zone in ("edge", "fog"):
            self.fault(f"kill -9 redis {zone}", self.kill_redis(zone))
        self.fault("restart mosquitto", self.restart_broker)
        if self.stack.s3 is not None and "cloud" in self.stack.zones:
            self.archive_with_s3_down()
        return self.results


def publish_readings(stack: EmbeddedStack, meter_id: str, stamps: list[int]) -> None:
    """Readings of ``meter_id`` at ``stamps`` (seq 0, 1, ...), QoS1 with the service account."""
    assert stack.broker is not None
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(stack.broker.service_user, stack.broker.service_password)
    client.connect(stack.broker.host, stack.broker.port)
    client.loop_start()
    try:
        for seq, ts in enumerate(stamps):
            body = {"seq": seq, "ts": ts, "import_kwh": 100.0 + seq * 0.2, "export_kwh": 0.0, "power_w": 800.0,
                    "voltage_v": 230.0}
            client.publish(topics.readings(meter_id), json.dumps(body), qos=1).wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def table(results: list[FaultResult]) -> str:
    lines = [f"{'fault':<32}{'sent':>8}{'stored':>8}{'lost':>6}{'dup':>5}{'edge/check ok':>15}{'s':>7}",
             "-" * 81]
    for r in results:
        lines.append(f"{r.fault:<32}{r.sent:>8}{r.stored:>8}{r.lost:>6}{r.duplicated:>5}"
                     f"{'yes' if r.edge_caught_up else 'NO':>15}{r.seconds:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.faults", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--meters", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=10.0, help="flow after each fault before counting")
    parser.add_argument("--interval", type=float, default=1.0, help="meters' reporting interval, seconds (>= 1)")
    parser.add_argument("--catch-up", type=float, default=60.0, help="how long stored may lag sent, seconds")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    print(f"starting the embedded stack; {args.meters} meters every {args.interval} s", flush=True)
    with EmbeddedStack(extra_env=STACK_ENV) as stack:
        run = FaultRun(stack, meters=args.meters, interval_s=args.interval, settle_s=args.seconds,
                       catch_up_s=args.catch_up)
        run.start()
        try:
            results = run.run()
        finally:
            run.stop()
        print(table(results))
        print(f"supervisor restarts: {stack.restarts()}")
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
