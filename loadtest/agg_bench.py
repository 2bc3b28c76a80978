"""Aggregation cost per reading (issue 13): the same run's MDMS ingest with and without the grid step.

``python -m loadtest.agg_bench --meters 2000 --readings 5`` (also run by ``loadtest.fleet_bench``)
starts its own redis-server, places ``--meters`` meters over ``--transformers`` transformers
(feeders, substations, regions above them), then ingests readings through the MQTT path's code
(:func:`metertwin.mdms.vee.ingest`, one reading per call, in-process, no HTTP) in interleaved
rounds with ``GRID_AGGREGATION`` off and on, on fresh meters each round, in waves of one reading
per meter; in an ``on`` round each wave ends with the drain that applies the entries to the tree
(what fog-grid's cron tick does: with meters reading every 15 min and a tick a minute, a drain
sees about one entry per meter, the least favourable case for batching). CPU per
reading is this process's CPU plus redis-server's (``INFO cpu``) over the round, divided by readings.
``agg_us_per_reading`` is the difference; ``agg_cpu_ratio`` is with / without - 1 (target <= 0.20).
The batch path (``ingest_many``, 1 000 readings per call) is measured the same way.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import redis

from metertwin.grid import aggregates
from metertwin.grid.settings import reset_grid_settings
from metertwin.mdms import hot_store, vee
from metertwin.mdms.settings import reset_mdms_settings
from metertwin.twin import keys as twin_keys
from storage.embedded import RedisServer


def _server_cpu(r: Any) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])


def _round(r: Any, prefix: str, meters: int, readings: int, transformers: int, *, aggregate: bool,
           batch: bool) -> float:
    os.environ["GRID_AGGREGATION"] = "true" if aggregate else "false"
    reset_grid_settings()
    ids = [f"{prefix}-{i:06d}" for i in range(meters)]
    pipe = r.pipeline(transaction=False)
    for m in ids:
        pipe.hset(twin_keys.registry_entry(m), mapping={"zone": "edge"})
    pipe.execute()
    for i, m in enumerate(ids):
        t = i % transformers
        f = t % max(1, transformers // 100)
        aggregates.set_place(r, m, {"transformer": f"t{t:05d}", "feeder": f"f{f:03d}", "substation": f"s{f % 10}",
                                    "region": f"r{f % 5}"}, 1)
    now = time.time()
    cands = [vee.Candidate(m, {"ts": now - (readings - k) * 60, "seq": k, "import_kwh": 100 + k * 0.2,
                               "export_kwh": 0.0, "power_w": 800.0 + i % 50, "voltage_v": 231.0}, "bench")
             for k in range(readings) for i, m in enumerate(ids)]
    cpu0, srv0 = time.process_time(), _server_cpu(r)
    for wave in range(readings):  # one reading per meter, then the cron tick's drain (counted too)
        todo = cands[wave * meters:(wave + 1) * meters]
        if batch:
            for start in range(0, len(todo), 1000):
                vee.ingest(todo[start:start + 1000], now_s=now)
        else:
            for c in todo:
                vee.ingest([c], now_s=now)
        if aggregate:
            aggregates.drain(r)
    return (time.process_time() - cpu0 + _server_cpu(r) - srv0) / len(cands) * 1e6


def _reset() -> None:
    reset_mdms_settings()
    reset_grid_settings()
    hot_store.reset_hot_redis()


def measure(url: str, *, meters: int = 2000, readings: int = 5, transformers: int = 500,
            rounds: int = 2) -> dict[str, Any]:
    """Interleaved rounds off/on, single-reading path and batch path; µs of CPU per reading.

    Runs in the caller's process (fleet_bench, its test): the environment and the MDMS and grid
    settings and clients it changes are put back afterwards, so later code does not talk to
    this run's Redis once it is gone.
    """
    saved = {name: os.environ.get(name) for name in ("HOT_REDIS_URL", "GRID_AGGREGATION")}
    os.environ["HOT_REDIS_URL"] = url
    _reset()
    r = redis.Redis.from_url(url, decode_responses=True)
    out: dict[str, list[float]] = {"off": [], "on": [], "batch_off": [], "batch_on": []}
    try:
        for k in range(rounds):
            for name, agg, batch in (("off", False, False), ("on", True, False), ("batch_off", False, True),
                                     ("batch_on", True, True)):
                out[name].append(_round(r, f"b{k}{name}", meters, readings, transformers, aggregate=agg,
                                        batch=batch))
    finally:
        r.close()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        _reset()
    best = {name: min(values) for name, values in out.items()}
    return {
        "agg_us_per_reading": round(best["on"] - best["off"], 1),
        "ingest_us_per_reading": round(best["off"], 1), "ingest_agg_us_per_reading": round(best["on"], 1),
        "agg_cpu_ratio": round(best["on"] / best["off"] - 1, 3),
        "batch_ingest_us_per_reading": round(best["batch_off"], 1),
        "batch_ingest_agg_us_per_reading": round(best["batch_on"], 1),
        "batch_agg_cpu_ratio": round(best["batch_on"] / best["batch_off"] - 1, 3),
        "agg_readings_per_round": meters * readings, "agg_rounds": rounds,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meters", type=int, default=2000)
    ap.add_argument("--readings", type=int, default=5)
    ap.add_argument("--transformers", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", dest="json_file")
    args = ap.parse_args(argv)
    with RedisServer() as server:
        out = measure(server.url, meters=args.meters, readings=args.readings, transformers=args.transformers,
                      rounds=args.rounds)
    print(json.dumps(out, indent=2))
    if args.json_file:
        with open(args.json_file, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


if __name__ == "__main__":
    main()
