"""One Redis vs a 3-master Redis Cluster, side by side in one run (issue 16 item 6).

Two edge gateways of one embedded stack (HTTP only, ``--no-background``), one on the stack's
``redis-server`` and one on a Redis Cluster of three ``redis-server --cluster-enabled yes``
(``EDGE_REDIS_URL=redis+cluster://...``), with the same twins in each; rounds interleaved,
medians reported:

1. cached reads (``GET /function/edge-read/meters/<id>/reading``, served from the twin);
2. edge ingest (``POST /function/edge-ingest/`` with ``X-Topic``, the reading path the MQTT
   connector drives), readings of ``meters`` twins, each with a fresh ``seq`` (all applied);
3. MDMS batch ingest (``hot_store.ingest_many``: the VEE script pipelined, one round trip per
   node per chunk) in this process, readings/s.

On one machine the three cluster nodes share the cores with everything else: the figures
show the cost of the cluster client and of the per-slot writes, not the capacity a cluster
on three hosts adds.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from embedded.stack import EmbeddedStack
from gateway.server import GatewayProcess
from loadtest.bench import WrkResult, _parse_wrk, wrk
from metertwin.core import clients, topics
from metertwin.twin.state import TwinStore
from storage.redis_cluster import RedisCluster

INGEST_LUA = """
wrk.method = "POST"
local n = 0
function request()
  n = n + 1
  local m = n % {meters}
  local body = string.format('{{"seq":%d,"ts":{ts:.3f},"import_kwh":%.3f,"export_kwh":0.0,"power_w":640.0,'
    .. '"voltage_v":231.0}}', n, 1000 + n / 1000)
  return wrk.format("POST", "{path}", {{["Authorization"] = "Bearer {token}",
    ["Content-Type"] = "application/json", ["X-Topic"] = "{topic_prefix}" .. m .. "{topic_suffix}"}}, body)
end
"""


def _wrk_script(url: str, script: str, *, seconds: float, connections: int) -> WrkResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--latency", "--timeout", "5s", "-s", f.name, url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    Path(f.name).unlink()
    return _parse_wrk(out)


def _summary(runs: list[WrkResult]) -> dict[str, Any]:
    return {"rps": [round(r.rps) for r in runs], "rps_median": round(statistics.median(r.rps for r in runs)),
            "p50_ms": statistics.median(r.p50_ms for r in runs), "p99_ms": statistics.median(r.p99_ms for r in runs),
            "errors": sum(r.errors for r in runs)}


def bench_gateways(stack: EmbeddedStack, cluster: RedisCluster, *, rounds: int, seconds: float,
                   meters: int = 1000) -> dict[str, Any]:
    """Cached reads and edge ingest through a gateway on each backend, rounds interleaved."""
    urls = {"single": stack.redis["edge"].url, "cluster": cluster.url}
    ids = [f"bench-cl-{i}" for i in range(meters)]
    for url in urls.values():
        client = clients.redis_cluster(url, timeout_s=5.0, max_connections=8) or redis.Redis.from_url(
            url, decode_responses=True)
        store = TwinStore(client)
        for meter_id in ids:
            store.create(meter_id, "edge", {"kind": "household"})
        client.close()
    gateways = {
        name: GatewayProcess(stack.stack_path, "edge", secrets_dir=stack.secrets_dir,
                             env={**stack.environment(), "EDGE_REDIS_URL": url},
                             args=["--no-background", "--instance", f"bench-{name}"],
                             log_path=stack.dir / f"gateway-edge-{name}.log")
        for name, url in urls.items()
    }
    service, utility = stack.token("service"), stack.token("utility")
    prefix, suffix = topics.readings("METER").split("METER")
    ingest_lua = INGEST_LUA.format(meters=meters, ts=time.time(), path="/function/edge-ingest/", token=service,
                                   topic_prefix=prefix + "bench-cl-", topic_suffix=suffix)
    read_path = f"/function/edge-read/meters/{ids[0]}/reading?max_age=3600"
    runs: dict[str, dict[str, list[WrkResult]]] = {k: {"reads": [], "ingest": []} for k in gateways}
    try:
        for gw in gateways.values():  # warm-up; also caches a reading of every twin
            _wrk_script(gw.url + "/", ingest_lua, seconds=2, connections=32)
            wrk(gw.url + read_path, seconds=2, connections=32, token=utility)
        for _ in range(rounds):
            for name, gw in gateways.items():
                runs[name]["reads"].append(wrk(gw.url + read_path, seconds=seconds, connections=32, token=utility))
                runs[name]["ingest"].append(_wrk_script(gw.url + "/", ingest_lua, seconds=seconds, connections=32))
    finally:
        for gw in gateways.values():
            gw.stop()
    out: dict[str, Any] = {}
    for kind in ("reads", "ingest"):
        for name in gateways:
            out[f"{kind}_{name}"] = _summary(runs[name][kind])
        out[f"{kind}_cluster_to_single"] = round(out[f"{kind}_cluster"]["rps_median"]
                                                 / out[f"{kind}_single"]["rps_median"], 3)
    return out


def bench_mdms_ingest(urls: dict[str, str], *, rounds: int, meters: int = 1000, per_meter: int = 20) -> dict[str, Any]:
    """``hot_store.ingest_many`` of ``meters * per_meter`` readings per round on each backend, interleaved."""
    from metertwin.core.settings import reset_settings
    from metertwin.mdms import hot_store
    from metertwin.mdms.intervals import Row
    from metertwin.mdms.settings import reset_mdms_settings

    rates: dict[str, list[float]] = {name: [] for name in urls}
    base_ms = (int(time.time()) - 2 * 86_400) // 900 * 900 * 1000
    for r in range(rounds):
        items = [(f"bench-mdms-{m}", Row(base_ms + (r * per_meter + k) * 900_000, r * per_meter + k,
                                         1000.0 + r * per_meter + k, 0.0, 500.0, 231.0, "valid"))
                 for k in range(per_meter) for m in range(meters)]
        for name, url in urls.items():
            os.environ["HOT_REDIS_URL"] = url
            reset_settings()
            reset_mdms_settings()
            hot_store.reset_hot_redis()
            t0 = time.perf_counter()
            outcomes = hot_store.ingest_many(items)
            rates[name].append(len(items) / (time.perf_counter() - t0))
            if any(o.status != "accepted" for o in outcomes):
                bad = next(o for o in outcomes if o.status != "accepted")
                raise RuntimeError(f"MDMS bench reading not accepted on {name}: {bad}")
    os.environ.pop("HOT_REDIS_URL", None)
    hot_store.reset_hot_redis()
    out: dict[str, Any] = {f"mdms_ingest_{name}_per_s": [round(x) for x in v] for name, v in rates.items()}
    for name, v in rates.items():
        out[f"mdms_ingest_{name}_median_per_s"] = round(statistics.median(v))
    out["mdms_ingest_cluster_to_single"] = round(statistics.median(rates["cluster"])
                                                 / statistics.median(rates["single"]), 3)
    return out


def bench_cluster(stack: EmbeddedStack, *, rounds: int, seconds: float) -> dict[str, Any]:
    """Everything above, on the stack's edge Redis and a fresh 3-master cluster."""
    with RedisCluster() as cluster:
        results = bench_gateways(stack, cluster, rounds=rounds, seconds=seconds)
        results.update(bench_mdms_ingest({"single": stack.redis["edge"].url, "cluster": cluster.url}, rounds=rounds))
    return results
