"""MDMS benchmark: ingest through Mosquitto and the gateway, archive to Parquet on S3, query hot vs cold.

``python -m loadtest.mdms_bench`` starts its own Redis, Mosquitto, moto S3 and one gateway
process (serving ``fog-mdms-ingest`` with the ``topic`` annotation and ``fog-mdms-query``
from a temporary stack file) and measures, in one run:

* **raw MQTT pipe**: one QoS1 publisher (simulated meters, one topic each) -> Mosquitto ->
  a QoS1 subscriber that does nothing; readings per second from the first publish to the
  last arrival;
* **ingest**: the same publisher, but the gateway's MQTT connector invokes the ingest
  function (VEE + Lua into Redis) per message; readings per second until Redis counted
  every one, and the loss (published - accepted; dead letters must be zero);
* **archive**: readings of ``--archive-meters`` meters over ``--archive-days`` days put hot,
  then one archive run (write, verify, index, cleanup, trim) timed; readings per second,
  and the bytes on S3 against the same readings as JSON lines;
* **query**: one meter-month (30 days of 15-minute rows) through the gateway, hot and
  then cold (median and p95 of ``--query-repeats`` calls).

Targets (issue 3): ingest >= 0.5 x the raw pipe with zero loss; Parquet >= 10 x smaller than JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.server import GatewayProcess
from metertwin.core.auth import issue_token
from metertwin.core.settings import reset_settings
from storage.embedded import Mosquitto, MotoS3, RedisServer

ROOT = Path(__file__).resolve().parent.parent
DAY_S = 86_400
INTERVAL_S = 900
#: The benchmark reads the month meter many times; those reads must neither keep it hot nor rehydrate it.
POLICY_ENV = {"MDMS_TIER_HOT_READS": "1000000", "MDMS_REHYDRATE_READS": "1000000", "MDMS_INTERVAL_S": "900"}


def _client(broker: Mosquitto, name: str) -> mqtt.Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}", protocol=mqtt.MQTTv5)
    c.username_pw_set(broker.service_user, broker.service_password)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect(broker.host, broker.port, keepalive=30)
    c.loop_start()
    return c


def _payloads(meters: list[str], per_meter: int, t0: float) -> list[tuple[str, bytes]]:
    out = []
    rng = random.Random(7)
    for k in range(per_meter):
        for i, m in enumerate(meters):
            reading = {"ts": round(t0 + k * 60 + i * 0.001, 3), "seq": k, "import_kwh": round(100 + k * 0.01, 3),
                       "export_kwh": 0.0, "power_w": float(rng.randint(150, 3500)),
                       "voltage_v": round(rng.uniform(224.0, 236.0), 1)}
            out.append((m, json.dumps(reading, separators=(",", ":")).encode()))
    return out


def publish_all(broker: Mosquitto, messages: list[tuple[str, bytes]], root: str) -> float:
    """Publish every message QoS1 as fast as the client allows; returns the first publish time."""
    pub = _client(broker, "bench-pub")
    try:
        started = time.perf_counter()
        infos = [pub.publish(f"{root}/{m}/up/reading", body, qos=1) for m, body in messages]
        deadline = time.monotonic() + 120
        for info in infos:
            info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
        return started
    finally:
        pub.loop_stop()
        pub.disconnect()


def raw_pipe(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> dict[str, Any]:
    """Publisher -> Mosquitto -> a subscriber that only counts."""
    n = len(messages)
    got = 0
    done = threading.Event()
    last = [0.0]

    def on_message(_c: Any, _u: Any, _msg: Any) -> None:
        nonlocal got
        got += 1
        if got >= n:
            last[0] = time.perf_counter()
            done.set()

    sub = _client(broker, "bench-raw-sub")
    sub.on_message = on_message
    ready = threading.Event()
    sub.on_subscribe = lambda *_a: ready.set()
    sub.subscribe("rawbench/+/up/reading", qos=1)
    ready.wait(10)
    started = publish_all(broker, messages, "rawbench")
    done.wait(120)
    sub.loop_stop()
    sub.disconnect()
    elapsed = (last[0] or time.perf_counter()) - started
    return {"published": n, "received": got, "seconds": elapsed, "per_s": got / elapsed}


def ingest_pipe(broker: Mosquitto, redis_url: str, messages: list[tuple[str, bytes]],
                meters: list[str]) -> dict[str, Any]:
    import redis

    from metertwin.mdms import keys as mdms_keys

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    n = len(messages)
    started = publish_all(broker, messages, "meters")
    deadline = time.monotonic() + 300
    accepted = duplicates = 0
    finished = time.perf_counter()
    while time.monotonic() < deadline:
        pipe = r.pipeline(transaction=False)
        for m in meters:
            pipe.hmget(mdms_keys.mdms_counters(m), "accepted", "duplicates")
        rows = pipe.execute()
        accepted = sum(int(a or 0) for a, _ in rows)
        duplicates = sum(int(d or 0) for _, d in rows)
        finished = time.perf_counter()
        if accepted >= n:
            break
        time.sleep(0.02)
    dead = int(r.xlen(mdms_keys.MDMS_DEAD_LETTERS))
    elapsed = finished - started
    return {"published": n, "accepted": accepted, "duplicates": duplicates, "dead_letters": dead,
            "lost": n - accepted, "seconds": elapsed, "per_s": accepted / elapsed}


def _stack(path: Path, env: dict[str, str]) -> None:
    doc = {
        "version": "1.0",
        "provider": {"name": "openfaas", "gateway": "http://127.0.0.1:8080"},
        "functions": {
            "fog-mdms-ingest": {"lang": "python3-http", "handler": str(ROOT / "functions/mdms-ingest"),
                                "environment": env, "secrets": ["token-signing-key"],
                                "annotations": {"topic": "meters/+/up/reading"}},
            "fog-mdms-query": {"lang": "python3-http", "handler": str(ROOT / "functions/mdms-query"),
                               "environment": env, "secrets": ["token-signing-key"]},
        },
    }
    path.write_text(json.dumps(doc, indent=2))


def load_hot(meters: list[str], days: list[int], now: float) -> tuple[int, int]:
    """Put readings every 15 minutes on ``days`` (days ago) hot, in process; returns (rows, JSON bytes)."""
    from metertwin.mdms import hot_store
    from metertwin.mdms.intervals import Row
    from metertwin.twin import keys as twin_keys

    r = hot_store.get_hot_redis()
    for m in meters:
        r.hset(twin_keys.registry_entry(m), mapping={"zone": "edge-1"})
    today = int(now) // DAY_S * DAY_S
    rows = json_bytes = 0
    rng = random.Random(3)
    for m in meters:
        items = []
        seq = 0
        imp = exp = 1000.0
        for d in sorted(days, reverse=True):
            start = today - d * DAY_S
            for k in range(DAY_S // INTERVAL_S):
                # A household: noisy load in whole watts, some PV export at midday, voltage to 0.1 V.
                load = float(rng.randint(150, 3500))
                pv = float(rng.randint(0, 2500)) if 40 <= k < 64 else 0.0
                imp = round(imp + max(load - pv, 0) / 4000, 3)
                exp = round(exp + max(pv - load, 0) / 4000, 3)
                volt = round(rng.uniform(224.0, 236.0), 1)
                ts = start + k * INTERVAL_S
                reading = {"ts": float(ts), "seq": seq, "import_kwh": imp, "export_kwh": exp,
                           "power_w": load - pv, "voltage_v": volt}
                json_bytes += len(json.dumps(reading, separators=(",", ":"))) + 1
                items.append((m, Row(ts * 1000, seq, imp, exp, load - pv, volt, "valid")))
                seq += 1
        outcomes = hot_store.ingest_many(items, now_s=now)
        assert all(o.status == "accepted" for o in outcomes), outcomes[:3]
        rows += len(items)
    return rows, json_bytes


def time_query(gw_url: str, token: str, meter: str, lo: float, hi: float, repeats: int) -> dict[str, Any]:
    times = []
    count = 0
    tiers: set[str] = set()
    with httpx.Client(timeout=60) as client:
        for _ in range(repeats):
            t0 = time.perf_counter()
            resp = client.get(f"{gw_url}/function/fog-mdms-query/meters/{meter}/intervals",
                              params={"from": str(lo), "to": str(hi), "limit": "5000"},
                              headers={"Authorization": f"Bearer {token}"})
            times.append(time.perf_counter() - t0)
            resp.raise_for_status()
            body = resp.json()
            count = body["count"]
            tiers = {row["tier"] for row in body["rows"]}
    times.sort()
    return {"rows": count, "tiers": sorted(tiers), "p50_ms": statistics.median(times) * 1000,
            "p95_ms": times[min(len(times) - 1, math.ceil(len(times) * 0.95) - 1)] * 1000}


@dataclass
class _Event:
    """The python3-http event, as the gateway builds it."""

    body: bytes
    headers: Any
    method: str
    query: Any
    path: str


def function_only(messages: list[tuple[str, bytes]], key: str, concurrency: int = 16) -> dict[str, Any]:
    """The ingest function's own capacity: its async lane awaited in this process, ``concurrency`` at a
    time, without MQTT (what the connector adds on top is the difference to the ``ingest`` figure)."""
    import asyncio

    from starlette.datastructures import Headers, QueryParams

    from metertwin.mdms import hot_store

    spec = importlib.util.spec_from_file_location("_bench_mdms_ingest", ROOT / "functions/mdms-ingest/handler.py")
    assert spec is not None
    assert spec.loader is not None
    handler = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(handler)
    auth = f"Bearer {issue_token('bench-connector', {'service'}, key=key)}"
    events = [_Event(body, Headers({"Authorization": auth, "X-Topic": f"meters/{m}/up/reading"}), "POST",
                     QueryParams({}), "/") for m, body in messages]

    async def run() -> tuple[float, int]:
        sem = asyncio.Semaphore(concurrency)
        ok = 0

        async def one(event: _Event) -> None:
            nonlocal ok
            async with sem:
                answer = await handler.handle_async(event, None)
                ok += answer["statusCode"] == 200 and answer["body"]["status"] == "accepted"

        t0 = time.perf_counter()
        await asyncio.gather(*(one(e) for e in events))
        elapsed = time.perf_counter() - t0
        await hot_store.get_hot_redis_async().aclose()
        return elapsed, ok

    elapsed, ok = asyncio.run(run())
    return {"readings": len(events), "accepted": ok, "seconds": elapsed, "per_s": ok / elapsed}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.mdms_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--meters", type=int, default=200, help="simulated meters publishing readings")
    ap.add_argument("--readings", type=int, default=50, help="readings per meter")
    ap.add_argument("--archive-meters", type=int, default=1000)
    ap.add_argument("--archive-days", type=int, default=2)
    ap.add_argument("--query-repeats", type=int, default=20)
    ap.add_argument("--gateway-workers", type=int, default=1, help="gateway worker processes (shared subscription)")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    figures: dict[str, Any] = {}
    with RedisServer() as rs, Mosquitto(max_queued_messages=1_000_000) as broker, MotoS3() as s3, \
            tempfile.TemporaryDirectory(prefix="mdms-bench-") as tmp:
        secrets = Path(tmp) / "secrets"
        secrets.mkdir()
        key = os.urandom(16).hex()
        (secrets / "token-signing-key").write_text(key)
        (secrets / "mqtt-password").write_text(broker.service_password)
        env = {"ZONE": "fog", "REDIS_URL": rs.url, "MQTT_HOST": broker.host, "MQTT_PORT": str(broker.port),
               "MQTT_USERNAME": broker.service_user, "S3_ENDPOINT_URL": s3.url, "S3_BUCKET": "mdms-bench",
               **POLICY_ENV}
        os.environ.update(env, SECRETS_DIR=str(secrets))
        reset_settings()
        from metertwin.mdms import cold_store, hot_store, tiering
        from metertwin.mdms import keys as mdms_keys
        from metertwin.mdms.settings import get_mdms_settings, reset_mdms_settings
        from metertwin.twin import keys as twin_keys

        reset_mdms_settings()
        hot_store.reset_hot_redis()
        cold_store.reset_s3()
        meters = [f"bench-{i:05d}" for i in range(args.meters)]
        r = hot_store.get_hot_redis()
        pipe = r.pipeline(transaction=False)
        for m in meters:
            pipe.hset(twin_keys.registry_entry(m), mapping={"zone": "edge-1"})
        pipe.execute()
        now = time.time()
        messages = _payloads(meters, args.readings, now - args.readings * 60 - 60)

        print(f"raw MQTT pipe: {len(messages)} readings ...", flush=True)
        figures["raw_pipe"] = raw_pipe(broker, messages)
        stack = Path(tmp) / "stack.yml"
        _stack(stack, env)
        print("starting the fog gateway (MQTT connector -> fog-mdms-ingest) ...", flush=True)
        gw_args = ["--workers", str(args.gateway_workers)] if args.gateway_workers > 1 else []
        with GatewayProcess(stack, "fog", secrets_dir=secrets, args=gw_args) as gw:
            _wait_subscribed(broker, rs.url)
            print(f"ingest: {len(messages)} readings through Mosquitto and the ingest function ...", flush=True)
            figures["ingest"] = ingest_pipe(broker, rs.url, messages, meters)
            figures["ingest"]["ratio_to_raw"] = figures["ingest"]["per_s"] / figures["raw_pipe"]["per_s"]
            print("ingest function alone (async lane, 16 at a time, no MQTT) ...", flush=True)
            solo = [f"solo-{i:05d}" for i in range(args.meters)]
            pipe = r.pipeline(transaction=False)
            for m in solo:
                pipe.hset(twin_keys.registry_entry(m), mapping={"zone": "edge-1"})
            pipe.execute()
            figures["function_only"] = function_only(_payloads(solo, args.readings, now - args.readings * 60 - 60),
                                                     key)

            print(f"archive: {args.archive_meters} meters x {args.archive_days} days; then one meter-month ...",
                  flush=True)
            arch_meters = [f"arch-{i:05d}" for i in range(args.archive_meters)]
            # The archive days lie after the meter-month, so the archive run moves only the fleet's days.
            rows, json_bytes = load_hot(arch_meters, list(range(3, 3 + args.archive_days)), now)
            report = tiering.archive(now)
            assert report["status"] == "ok", report
            data = cold_store.list_keys(f"{get_mdms_settings().cold_prefix}/data/")
            parquet_bytes = sum(size for _k, size in data)
            figures["archive"] = {
                "rows": report["rows_archived"], "expected_rows": rows, "seconds": report["seconds"],
                "per_s": report["rows_archived"] / report["seconds"], "objects": len(data),
                "meter_buckets": get_mdms_settings().meter_buckets,
                "parquet_bytes": parquet_bytes, "json_bytes": json_bytes,
                "ratio_json_to_parquet": json_bytes / max(parquet_bytes, 1),
                "hot_rows_left": sum(int(r.zcard(mdms_keys.mdms_intervals(m))) for m in arch_meters),
            }
            month_meter = "month-00001"
            load_hot([month_meter], list(range(3 + args.archive_days, 33 + args.archive_days)), now)
            token = issue_token("bench", {"mdms"}, key=key)
            today = int(now) // DAY_S * DAY_S
            lo = float(today - (32 + args.archive_days) * DAY_S)
            hi = float(today - (2 + args.archive_days) * DAY_S - 1)
            time_query(gw.url, token, month_meter, lo, hi, 2)  # warm-up
            figures["query_hot"] = time_query(gw.url, token, month_meter, lo, hi, args.query_repeats)
            assert tiering.archive(now)["status"] == "ok"
            figures["query_cold"] = time_query(gw.url, token, month_meter, lo, hi, args.query_repeats)
    _print(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return verdict(figures)


#: Speed and size targets: reported when missed (the machine is shared and noisy), not a failure.
INGEST_TO_RAW_TARGET = 0.5
PARQUET_TARGET = 10.0


def verdict(f: dict[str, Any]) -> int:
    """1, naming each failure, when a reading was lost or rejected; missed targets are printed, not failed."""
    ing, arc = f["ingest"], f["archive"]
    failures = [text for bad, text in (
        (ing["lost"] != 0, f"{ing['lost']} of {ing['published']} readings lost"),
        (ing["dead_letters"] != 0, f"{ing['dead_letters']} readings rejected to dead letters"),
        (arc["rows"] != arc["expected_rows"], f"archive moved {arc['rows']} rows, expected {arc['expected_rows']}"),
    ) if bad]
    missed = [text for bad, text in (
        (ing["ratio_to_raw"] < INGEST_TO_RAW_TARGET,
         f"ingest {ing['ratio_to_raw']:.2f} x raw is below the {INGEST_TO_RAW_TARGET} x target"),
        (arc["ratio_json_to_parquet"] < PARQUET_TARGET,
         f"Parquet {arc['ratio_json_to_parquet']:.1f} x smaller than JSON is below the {PARQUET_TARGET:g} x target"),
    ) if bad]
    for text in missed:
        print(f"  target not met: {text}", file=sys.stderr)
    for text in failures:
        print(f"mdms_bench FAILED: {text}", file=sys.stderr)
    return 1 if failures else 0


def _wait_subscribed(broker: Mosquitto, redis_url: str) -> None:
    """Publish probe readings until the gateway's connector has delivered one to the ingest function."""
    import redis

    from metertwin.mdms import keys as mdms_keys
    from metertwin.twin import keys as twin_keys

    r = redis.Redis.from_url(redis_url, decode_responses=True)
    probe = "probe-00001"
    r.hset(twin_keys.registry_entry(probe), mapping={"zone": "edge-1"})
    deadline = time.monotonic() + 60
    seq = 0
    while time.monotonic() < deadline:
        body = json.dumps({"ts": time.time() - 1, "seq": seq, "import_kwh": 1.0 + seq, "power_w": 1.0}).encode()
        publish_all(broker, [(probe, body)], "meters")
        seq += 1
        until = time.monotonic() + 2
        while time.monotonic() < until:
            if r.hget(mdms_keys.mdms_counters(probe), "accepted"):
                return
            time.sleep(0.05)
    raise RuntimeError("the gateway's MQTT connector never delivered a reading to fog-mdms-ingest")


def _print(f: dict[str, Any]) -> None:
    raw, ing, arc, qh, qc = f["raw_pipe"], f["ingest"], f["archive"], f["query_hot"], f["query_cold"]
    print()
    print("MDMS benchmark (python -m loadtest.mdms_bench)")
    print(f"  raw MQTT pipe      {raw['per_s']:>10,.0f} readings/s   ({raw['received']}/{raw['published']} received)")
    print(f"  ingest (VEE+Redis) {ing['per_s']:>10,.0f} readings/s   = {ing['ratio_to_raw']:.2f} x raw; "
          f"published {ing['published']}, accepted {ing['accepted']}, lost {ing['lost']}, "
          f"dead letters {ing['dead_letters']}, redeliveries {ing['duplicates']}")
    solo = f["function_only"]
    print(f"  function alone     {solo['per_s']:>10,.0f} readings/s   (ingest handler's async lane in process, "
          f"no MQTT; {solo['accepted']}/{solo['readings']} accepted)")
    print(f"  archive            {arc['per_s']:>10,.0f} readings/s   ({arc['rows']} rows in {arc['seconds']:.2f} s, "
          f"{arc['objects']} objects ({arc['meter_buckets']} buckets/day), hot rows left {arc['hot_rows_left']})")
    print(f"  size on S3         {arc['parquet_bytes']:>10,} bytes Parquet vs {arc['json_bytes']:,} bytes JSON "
          f"= {arc['ratio_json_to_parquet']:.1f} x smaller")
    print(f"  query meter-month  hot  p50 {qh['p50_ms']:.1f} ms  p95 {qh['p95_ms']:.1f} ms  ({qh['rows']} rows, "
          f"{qh['tiers']})")
    print(f"                     cold p50 {qc['p50_ms']:.1f} ms  p95 {qc['p95_ms']:.1f} ms  ({qc['rows']} rows, "
          f"{qc['tiers']})")



if __name__ == "__main__":
    raise SystemExit(main())
