"""Fleet benchmark (issue 13): Redis memory per twin with the fleet indexes, and search latency.

``python -m loadtest.fleet_bench --meters 100000 --json fleet.json`` starts its own redis-server
(storage.embedded, as production is configured), provisions ``--meters`` twins spread over 5
regions / 10 substations / ``--feeders`` feeders / ``--transformers`` transformers (the issue's
1,000,000 over 50 / 5,000 by default), each with a measurement and an online status (a third
offline, a quarter stale), and measures, in-process through :mod:`metertwin.fleet` (the same
code the ``edge-fleet`` function runs, without HTTP):

* ``bytes_per_twin``: Redis ``used_memory`` growth per twin, twin hash + fleet record + indexes
  + audit (``fleet_bytes_per_twin``: the fleet part alone; ``fleet_keys``: ``MEMORY USAGE`` per
  twin of each kind of fleet key — documents, the all-meters set, the index sets, the audit stream —
  with the index sets' encodings; ``audit_bytes_per_twin`` and ``topology_docs_bytes_per_twin``);
* search p50/p99 for a one-feeder page of 100 (``search_p99_ms``), and for feeder ∧ offline ∧
  stale (``search_live_p99_ms``: ``online``/``stale_s`` by the live indexes of
  :mod:`metertwin.fleet.status`; ``search_live_per_twin_p99_ms``: the same query reading every
  candidate's twin, as before those indexes, same run);
* ``live_index_ingest`` (:mod:`loadtest.live_index_bench`): edge ingest CPU per reading with and
  without the last-reading index write, same run.

* ``job_per_s`` (:mod:`loadtest.job_bench`): one bulk job sending a command to the first
  ``--job-twins`` twins (100,000 at full size) at ``--job-rate`` (1000/s), acked by the bench as
  the meters; with ``job_counts``, the exact final counts. ``--job-twins 0`` skips it.

* ``--compare``: first the same provisioning and searches on the fleet storage as it was before
  the compaction (:mod:`loadtest.fleet_legacy`: JSON documents in one hash, index sets of meter
  ids), in a Redis of its own, reported under ``before`` — both in one run, on one machine.

* ``agg_us_per_reading`` (:mod:`loadtest.agg_bench`): CPU per reading the grid aggregation adds,
  the same run's MDMS ingest with and without it, ``--agg-meters`` x ``--agg-readings`` readings
  per round (``aggregation``: the detail, ``agg_cpu_ratio`` the target's ratio, <= 0.20).
  ``--agg-meters 0`` skips it.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from typing import Any

import redis

from loadtest import agg_bench, live_index_bench
from loadtest.fleet_legacy import search as legacy_search
from loadtest.fleet_legacy import topology as legacy_topology
from loadtest.job_bench import run_job
from metertwin.fleet import keys
from metertwin.fleet.search import Query, fleet_search
from metertwin.fleet.topology import topology_store
from metertwin.twin import keys as twin_keys
from metertwin.twin.state import twin_store
from storage.embedded import RedisServer


def _topology(i: int, feeders: int, transformers: int) -> dict[str, Any]:
    t = i % transformers
    f = t % feeders  # each transformer hangs below one feeder
    return {"region": f"r{f % 5}", "substation": f"s{f % 10}", "feeder": f"f{f:03d}", "transformer": f"t{t:05d}",
            "phase": "ABC"[i % 3], "tariff": "tou" if i % 2 else "flat", "customer_class": "residential",
            "location": {"lat": 51.0 + (i % 1000) / 1000, "lon": -1.0 + (i % 997) / 997},
            "groups": ["pilot"] if i % 10 == 0 else [], "tags": {"vendor": "acme" if i % 3 else "zeta"}}


BATCH = 1000


def provision(r: Any, meters: int, feeders: int, transformers: int, topo: Any = None) -> tuple[float, float]:
    """Create the twins, then their fleet records (pipelined batches, as bulk provisioning does);
    returns (bytes per twin all in, fleet bytes per twin)."""
    twins, topo = twin_store(r), topo or topology_store(r)
    now = time.time()
    base = r.info("memory")["used_memory"]

    for start in range(0, meters, BATCH):
        span = range(start, min(meters, start + BATCH))
        twins.create_many({f"m-{i:08d}": {"kind": "household"} for i in span}, "edge")
        # the twin store's own measurement and reported-merge scripts (report_measurement, report),
        # pipelined: the same stored twin, a thousand at a time
        pipe = r.pipeline(transaction=False)
        for i in span:
            key, ts = [twin_keys.twin(f"m-{i:08d}")], now - (3600 if i % 4 == 0 else 30)
            measurement = {"ts": ts, "import_kwh": 1234.5, "export_kwh": 0.0, "power_w": 800.0, "voltage_v": 231.2}
            twins._measure(keys=key, args=[json.dumps(measurement, separators=(",", ":")), repr(ts), i], client=pipe)
            twins._merge(keys=key, args=["r", json.dumps({"online": i % 3 != 0}, separators=(",", ":")),
                                         repr(now), -1], client=pipe)
        pipe.execute()
    mid = r.info("memory")["used_memory"]
    for start in range(0, meters, BATCH):
        span = range(start, min(meters, start + BATCH))
        errors = topo.create_many({f"m-{i:08d}": _topology(i, feeders, transformers) for i in span},
                                  actor="bench", zone="edge")
        assert not errors, list(errors.items())[:3]
    end = r.info("memory")["used_memory"]
    return (end - base) / meters, (end - mid) / meters


def fleet_keys(r: Any, meters: int) -> dict[str, Any]:
    """``MEMORY USAGE`` per twin of each kind of fleet key, and the encodings of the index sets."""
    sizes: dict[str, float] = {}
    encodings: dict[str, int] = {}
    for key in r.scan_iter(match=f"{keys.AUDIT.rsplit(':', 1)[0]}:*", count=1000):
        part = key.split("}:", 1)[1]
        kind = part.split(":", 1)[0] if not part.startswith("ix:") else "ix:" + part.split(":")[1]
        sizes[kind] = sizes.get(kind, 0) + (r.memory_usage(key, samples=0) or 0)
        if kind.startswith("ix:"):
            enc = r.object("encoding", key)
            encodings[enc] = encodings.get(enc, 0) + 1
    out: dict[str, Any] = {k: round(v / meters, 1) for k, v in sorted(sizes.items())}
    out["ix_total"] = round(sum(v for k, v in sizes.items() if k.startswith("ix:")) / meters, 1)
    out["index_set_encodings"] = encodings
    return out


def measure(r: Any, args: Any, topo: Any, search: Any) -> dict[str, Any]:
    """Provision, then the memory and the two searches, with one store and search implementation."""
    rnd = random.Random(13)
    started = time.perf_counter()
    before = r.info("memory")["used_memory"]
    per_twin, fleet_per_twin = provision(r, args.meters, args.feeders, args.transformers, topo)
    provision_s = time.perf_counter() - started
    by_kind = fleet_keys(r, args.meters)
    feeders = [f"f{rnd.randrange(min(args.feeders, args.transformers)):03d}" for _ in range(args.runs)]
    page = _latency(search, [{"feeder": f, "limit": "100"} for f in feeders])
    live_params = [{"feeder": f, "online": "false", "stale_s": "900", "limit": "100"} for f in feeders]
    live = _latency(search, live_params)
    extra: dict[str, Any] = {}
    if hasattr(search, "by_index"):  # the same query with online/stale_s read from each twin (before the index)
        search.by_index = False
        try:
            by_twin = _latency(search, live_params)
        finally:
            search.by_index = True
        extra = {"search_live_per_twin_p50_ms": by_twin["p50_ms"], "search_live_per_twin_p99_ms": by_twin["p99_ms"],
                 "feeder_offline_stale_per_twin": by_twin,
                 "live_index_ingest": live_index_bench.measure(r, args.meters, per_round=min(2000, args.meters))}
    return {
        "bytes_per_twin": round(per_twin, 1), "fleet_bytes_per_twin": round(fleet_per_twin, 1),
        "used_memory_before": before, "used_memory_after": r.info("memory")["used_memory"],
        "audit_bytes_per_twin": by_kind.get("audit", 0.0),
        "topology_docs_bytes_per_twin": by_kind.get("doc", by_kind.get("topo", 0.0)),
        "fleet_keys": by_kind, "provision_s": round(provision_s, 1),
        "search_p50_ms": page["p50_ms"], "search_p99_ms": page["p99_ms"],
        "search_live_p50_ms": live["p50_ms"], "search_live_p99_ms": live["p99_ms"],
        "feeder_page": page, "feeder_offline_stale": live, **extra,
    }


def _latency(search: Any, params: list[dict[str, str]]) -> dict[str, float]:
    times, counts = [], []
    for p in params:
        start = time.perf_counter()
        page = search.run(search_query(search, p))
        times.append((time.perf_counter() - start) * 1000)
        counts.append(page.count)
    times.sort()
    return {"p50_ms": round(statistics.median(times), 3), "p99_ms": round(times[int(len(times) * 0.99) - 1], 3),
            "runs": len(times), "mean_count": round(statistics.mean(counts), 1)}


def search_query(search: Any, params: dict[str, str]) -> Any:
    return (legacy_search.Query if isinstance(search, legacy_search.FleetSearch) else Query).from_params(params)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--meters", type=int, default=1_000_000)
    ap.add_argument("--feeders", type=int, default=50)
    ap.add_argument("--transformers", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--json", dest="json_file")
    ap.add_argument("--compare", action="store_true",
                    help="also measure the fleet storage as it was before the compaction (reported as 'before')")
    ap.add_argument("--job-twins", type=int, default=100_000, help="twins of the bulk job (0: no job)")
    ap.add_argument("--job-rate", type=float, default=1000.0, help="the job's rate_per_s")
    ap.add_argument("--agg-meters", type=int, default=2000, help="meters per aggregation round (0: skip)")
    ap.add_argument("--agg-readings", type=int, default=5, help="readings per meter per aggregation round")
    args = ap.parse_args(argv)
    before: dict[str, Any] = {}
    if args.compare:
        with RedisServer() as server:
            r = redis.Redis.from_url(server.url, decode_responses=True)
            before = measure(r, args, legacy_topology.topology_store(r), legacy_search.fleet_search(r))
            r.close()
    with RedisServer() as server:
        r = redis.Redis.from_url(server.url, decode_responses=True)
        after = measure(r, args, topology_store(r), fleet_search(r))
        r.close()
        job_twins = min(args.job_twins, args.meters)
        job = run_job(server.url, [f"m-{i:08d}" for i in range(job_twins)], args.job_rate) if job_twins else {}
        agg = agg_bench.measure(server.url, meters=args.agg_meters, readings=args.agg_readings,
                                transformers=max(1, min(args.transformers, args.agg_meters // 4))) \
            if args.agg_meters else {}
    out = {
        "meters": args.meters, "feeders": args.feeders, "transformers": args.transformers, **after,
        **({"before": before} if before else {}),
        "agg_us_per_reading": agg.get("agg_us_per_reading"), "aggregation": agg, "job_per_s": job.get("job_per_s"),
        **{k: v for k, v in job.items() if k != "job_per_s"},
    }
    print(json.dumps(out, indent=2))
    if args.json_file:
        with open(args.json_file, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


if __name__ == "__main__":
    main()
