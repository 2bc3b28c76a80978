"""Concentrator batches vs one message per reading, through the full fog ingest path, side by side.

``python -m loadtest.concentrator_bench`` starts its own Redis, Mosquitto and one gateway process
serving ``fog-mdms-ingest`` (topics ``meters/+/up/reading`` and ``dcu/+/up/readings``) and runs,
alternately, ``--rounds`` rounds of each mode on fresh meters:

* **single**: one QoS1 message per reading on ``meters/<id>/up/reading`` (the connector invokes
  the function once per message);
* **batch**: concentrators of ``--batch`` meters each publish one QoS1 message per tick carrying
  one reading of each of their meters on ``dcu/<id>/up/readings`` (the function applies the
  whole batch with one pipelined round trip of per-meter scripts);
* then, with a second gateway whose function is annotated ``mqtt-batch: "<batch>/20"``, **single,
  connector-batched**: one message per reading, handed to the function in batch calls.

Readings per second = readings accepted (the MDMS counters) / time from the first publish until
the last one was counted; lost = published - accepted. Prints medians per mode (``--json FILE``
writes every round). One minute at the defaults on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from gateway.server import GatewayProcess
from loadtest.mdms_bench import _client, _payloads, _wait_subscribed
from metertwin.core import topics
from metertwin.core.settings import reset_settings
from metertwin.mdms import keys as mdms_keys
from storage.embedded import Mosquitto, RedisServer

ROOT = Path(__file__).resolve().parent.parent


def _stack(path: Path, env: dict[str, str], mqtt_batch: str | None = None) -> None:
    annotations = {"topic": "meters/+/up/reading,dcu/+/up/readings"}
    if mqtt_batch:
        annotations["mqtt-batch"] = mqtt_batch
    doc = {"version": "1.0", "provider": {"name": "openfaas", "gateway": "http://127.0.0.1:8080"},
           "functions": {"fog-mdms-ingest": {
               "lang": "python3-http", "handler": str(ROOT / "functions/mdms-ingest"), "environment": env,
               "secrets": ["token-signing-key"], "annotations": annotations}}}
    path.write_text(json.dumps(doc, indent=2))


def _publish(broker: Mosquitto, messages: list[tuple[str, bytes]]) -> float:
    pub = _client(broker, "dcu-bench-pub")
    try:
        started = time.perf_counter()
        infos = [pub.publish(topic, body, qos=1) for topic, body in messages]
        deadline = time.monotonic() + 120
        for info in infos:
            info.wait_for_publish(timeout=max(0.1, deadline - time.monotonic()))
        return started
    finally:
        pub.loop_stop()
        pub.disconnect()


def _counted(r: redis.Redis, meters: list[str], n: int, started: float) -> dict[str, Any]:
    deadline = time.monotonic() + 300
    accepted = 0
    finished = time.perf_counter()
    while time.monotonic() < deadline:
        pipe = r.pipeline(transaction=False)
        for m in meters:
            pipe.hget(mdms_keys.mdms_counters(m), "accepted")
        accepted = sum(int(a or 0) for a in pipe.execute())
        finished = time.perf_counter()
        if accepted >= n:
            break
        time.sleep(0.02)  # polling pace of the counters, not a wait for a condition
    elapsed = finished - started
    return {"published": n, "accepted": accepted, "lost": n - accepted, "seconds": round(elapsed, 3),
            "per_s": round(accepted / elapsed, 1)}


def single_round(broker: Mosquitto, r: redis.Redis, tag: str, meters: int, per_meter: int) -> dict[str, Any]:
    ids = [f"s{tag}-{i:05d}" for i in range(meters)]
    messages = [(topics.readings(m), body) for m, body in _payloads(ids, per_meter, time.time() - per_meter * 60 - 60)]
    started = _publish(broker, messages)
    return {"mode": "single", "messages": len(messages), **_counted(r, ids, len(messages), started)}


def batch_round(broker: Mosquitto, r: redis.Redis, tag: str, concentrators: int, batch: int,
                per_meter: int) -> dict[str, Any]:
    ids = [f"b{tag}-{c:03d}-{i:04d}" for c in range(concentrators) for i in range(batch)]
    readings = _payloads(ids, per_meter, time.time() - per_meter * 60 - 60)  # tick by tick, meter by meter
    messages = []
    for start in range(0, len(readings), batch):
        chunk = readings[start:start + batch]
        dcu = f"dcu{tag}-{start // batch % concentrators:03d}"
        body = {"readings": [{"meter_id": m, **json.loads(b)} for m, b in chunk]}
        messages.append((topics.concentrator_readings(dcu), json.dumps(body, separators=(",", ":")).encode()))
    started = _publish(broker, messages)
    return {"mode": f"batch of {batch}", "messages": len(messages), **_counted(r, ids, len(readings), started)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m loadtest.concentrator_bench", description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--single-meters", type=int, default=200)
    ap.add_argument("--single-readings", type=int, default=10, help="readings per meter, single mode")
    ap.add_argument("--concentrators", type=int, default=10)
    ap.add_argument("--batch", type=int, default=100, help="meters per concentrator = readings per message")
    ap.add_argument("--batch-readings", type=int, default=20, help="readings per meter, batch mode")
    ap.add_argument("--json", help="also write every round to this file")
    args = ap.parse_args(argv)
    rounds: list[dict[str, Any]] = []
    with RedisServer() as rs, Mosquitto(max_queued_messages=1_000_000) as broker, \
            tempfile.TemporaryDirectory(prefix="dcu-bench-") as tmp:
        secrets = Path(tmp) / "secrets"
        secrets.mkdir()
        (secrets / "token-signing-key").write_text(os.urandom(16).hex())
        (secrets / "mqtt-password").write_text(broker.service_password)
        env = {"ZONE": "fog", "REDIS_URL": rs.url, "MQTT_HOST": broker.host, "MQTT_PORT": str(broker.port),
               "MQTT_USERNAME": broker.service_user, "MDMS_INTERVAL_S": "900"}
        os.environ.update(env, SECRETS_DIR=str(secrets))
        reset_settings()
        stack = Path(tmp) / "stack.yml"
        r = redis.Redis.from_url(rs.url, decode_responses=True)

        def show(k: int, got: dict[str, Any]) -> None:
            print(f"round {k + 1} {got['mode']:>26}: {got['accepted']:>6} readings in {got['messages']:>5} "
                  f"messages, {got['per_s']:>8.0f}/s, lost {got['lost']}", flush=True)
            rounds.append({"round": k + 1, **got})

        # Phase 1, interleaved: one message per reading vs concentrator batches, one invocation per message.
        _stack(stack, env)
        with GatewayProcess(stack, "fog", secrets_dir=secrets):
            _wait_subscribed(broker, rs.url)
            for k in range(args.rounds):
                show(k, single_round(broker, r, f"{k}", args.single_meters, args.single_readings))
                show(k, batch_round(broker, r, f"{k}", args.concentrators, args.batch, args.batch_readings))
        # Phase 2: one message per reading, the connector handing the function batches (annotation mqtt-batch).
        _stack(stack, env, f"{args.batch}/20")
        with GatewayProcess(stack, "fog", secrets_dir=secrets):
            _wait_subscribed(broker, rs.url)
            for k in range(args.rounds):
                got = single_round(broker, r, f"c{k}", args.single_meters, args.single_readings)
                show(k, {**got, "mode": f"single, connector {args.batch}/20"})
    medians = {mode: statistics.median(x["per_s"] for x in rounds if x["mode"] == mode)
               for mode in dict.fromkeys(x["mode"] for x in rounds)}
    single = medians.get("single") or 1.0
    print(f"\n{'mode':<28} median readings/s   x single")
    for mode, value in medians.items():
        print(f"{mode:<28} {value:>17.0f}   {value / single:>8.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"rounds": rounds, "median_per_s": medians,
                                               "lost": sum(x["lost"] for x in rounds)}, indent=1))
    return 0 if all(x["lost"] == 0 for x in rounds) else 1


if __name__ == "__main__":
    sys.exit(main())
