"""``make bench``: the foundation's benchmarks, measured side by side in one run.

1. Cached reads through the edge gateway vs a raw ASGI hello-world served the same
   way (one uvicorn process each, uvloop + httptools), interleaved rounds, medians:
   peak throughput, then p50/p99 at half of the gateway's peak rate.
2. Live reads through a simulated meter with a fixed link latency: the overhead
   above that latency (median and p99 of many sequential reads).
3. Redis memory per twin over 100,000 realistic twins.
4. With ``cached``: the access log's cost, two more edge gateways (HTTP only), one writing
   its JSON access line per call to a file and one with ``--access-log-level off``, in
   interleaved rounds.
5. ``cluster``: cached reads, edge ingest and MDMS batch ingest on one Redis and on a
   3-master Redis Cluster, interleaved (``loadtest/cluster_bench.py``).

Load comes from ``wrk`` (apt package ``wrk``; ``make bench`` installs it) in its own
process. The machine is shared and noisy: every figure is a median over rounds, and
the ratio is taken between rounds run back to back.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import redis

from embedded.stack import EmbeddedStack
from metertwin.core import topics
from metertwin.twin import keys
from metertwin.twin.state import CREATE_LUA, MEASURE_LUA, MERGE_LUA, TwinStore
from storage.embedded import RedisServer, free_port, wait_for_port

LUA_HEADERS = """
wrk.method = "GET"
wrk.headers["Authorization"] = "Bearer {token}"
"""
LUA_DELAY = """
function delay()
  return {delay_ms}
end
"""


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: int


def wrk(url: str, *, seconds: float, connections: int, token: str | None = None,
        delay_ms: float | None = None) -> WrkResult:
    """Run wrk once (one thread) and parse its --latency report."""
    script = LUA_HEADERS.format(token=token) if token else ""
    if delay_ms is not None:
        script += LUA_DELAY.format(delay_ms=f"{delay_ms:.3f}")
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:.0f}s", "--latency", "--timeout", "5s", "-s", f.name,
            url]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, check=True).stdout
    Path(f.name).unlink()
    return _parse_wrk(out)


def _ms(text: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"cannot parse wrk latency {text!r}")
    value, unit = float(m.group(1)), m.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def _parse_wrk(out: str) -> WrkResult:
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p50 = _ms(re.search(r"\s50%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p99 = _ms(re.search(r"\s99%\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = 0
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        errors += int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        errors += sum(int(x) for x in m.groups())
    return WrkResult(rps, p50, p99, requests, errors)


@contextmanager
def served(module: str, *args: str) -> Iterator[str]:
    """``python -m <module> --port N ...`` (served like a gateway); yields its URL."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", module, "--port", str(port), *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_port(port, proc=proc)
        yield f"http://127.0.0.1:{port}/"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def bench_cached_reads(stack: EmbeddedStack, *, rounds: int, seconds: float) -> dict[str, Any]:
    meter = "bench-cached-1"
    stack.provision([meter])
    reading = {"seq": 1, "ts": time.time(), "import_kwh": 1234.5, "export_kwh": 0.0, "power_w": 640.0,
               "voltage_v": 231.0}
    resp = stack.call("edge", "edge-ingest", "POST", "/", token=stack.token("service"), json=reading,
                      headers={"X-Topic": topics.readings(meter)})
    resp.raise_for_status()
    token = stack.token("utility")
    url = f"{stack.url('edge')}/function/edge-read/meters/{meter}/reading?max_age=3600"
    check = httpx.get(url, headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
    if check.get("source") != "cache":
        raise RuntimeError(f"the benchmark reading is not served from cache: {check}")
    gw_peak: list[WrkResult] = []
    hello_peak: list[WrkResult] = []
    redis_peak: list[WrkResult] = []
    redis_args = ("--redis-url", stack.redis["edge"].url, "--key", keys.twin(meter))
    with served("gateway.hello") as hello_url, served("loadtest.redis_hello", *redis_args) as redis_url:
        for warm in (hello_url, redis_url):
            wrk(warm, seconds=2, connections=32)
        wrk(url, seconds=2, connections=32, token=token)
        for _ in range(rounds):
            hello_peak.append(wrk(hello_url, seconds=seconds, connections=32))
            redis_peak.append(wrk(redis_url, seconds=seconds, connections=32))
            gw_peak.append(wrk(url, seconds=seconds, connections=32, token=token))
    gw_rps = statistics.median(r.rps for r in gw_peak)
    hello_rps = statistics.median(r.rps for r in hello_peak)
    redis_rps = statistics.median(r.rps for r in redis_peak)
    # Half of peak: 16 connections, each pausing so that together they offer gw_rps / 2.
    conns = 16
    target = gw_rps / 2
    half: list[WrkResult] = []
    for _ in range(rounds):
        half.append(wrk(url, seconds=seconds, connections=conns, token=token, delay_ms=1000 * conns / target))
    return {
        **_access_log_cost(stack, url.replace(stack.url("edge"), ""), token, rounds=rounds, seconds=seconds),
        "gateway_rps": [round(r.rps) for r in gw_peak],
        "hello_rps": [round(r.rps) for r in hello_peak],
        "gateway_rps_median": round(gw_rps),
        "hello_rps_median": round(hello_rps),
        "ratio": round(gw_rps / hello_rps, 3),
        "ratios_per_round": [round(g.rps / h.rps, 3) for g, h in zip(gw_peak, hello_peak, strict=True)],
        "asgi_redis_rps_median": round(redis_rps),
        "ratio_to_asgi_redis": round(gw_rps / redis_rps, 3),
        "peak_p50_ms": statistics.median(r.p50_ms for r in gw_peak),
        "peak_p99_ms": statistics.median(r.p99_ms for r in gw_peak),
        "half_target_rps": round(target),
        "half_achieved_rps": round(statistics.median(r.rps for r in half)),
        "half_p50_ms": statistics.median(r.p50_ms for r in half),
        "half_p99_ms": statistics.median(r.p99_ms for r in half),
        "errors": sum(r.errors for r in [*gw_peak, *half]),
    }


def _access_log_cost(stack: EmbeddedStack, path: str, token: str, *, rounds: int, seconds: float
                     ) -> dict[str, Any]:
    """Cached-read peak with the access log on (JSON lines to a file) and off, rounds interleaved."""
    from gateway.server import GatewayProcess

    peaks: dict[str, list[WrkResult]] = {"on": [], "off": []}
    gateways = {
        mode: GatewayProcess(stack.stack_path, "edge", secrets_dir=stack.secrets_dir, env=stack.environment(),
                             args=["--no-background", "--instance", f"bench-log-{mode}",
                                   "--access-log-level", "info" if mode == "on" else "off"],
                             log_path=stack.dir / f"gateway-edge-log-{mode}.log")
        for mode in peaks
    }
    try:
        for gw in gateways.values():
            wrk(gw.url + path, seconds=2, connections=32, token=token)
        for _ in range(rounds):
            for mode, gw in gateways.items():
                peaks[mode].append(wrk(gw.url + path, seconds=seconds, connections=32, token=token))
        lines = sum(1 for line in gateways["on"].log_text().splitlines() if line.startswith('{"time"'))
    finally:
        for gw in gateways.values():
            gw.stop()
    on = statistics.median(r.rps for r in peaks["on"])
    off = statistics.median(r.rps for r in peaks["off"])
    return {
        "access_log_on_rps": [round(r.rps) for r in peaks["on"]],
        "access_log_off_rps": [round(r.rps) for r in peaks["off"]],
        "access_log_ratio": round(on / off, 3),
        "access_log_lines": lines,
    }


def bench_live_reads(stack: EmbeddedStack, *, reads: int, link_ms: float) -> dict[str, Any]:
    """Sequential live reads of one simulated meter whose link adds ``link_ms`` each way."""
    from meter_sim import FleetThread

    meter = "bench-live-1"
    credentials = stack.provision([meter])
    assert stack.broker is not None
    fleet = FleetThread(
        broker_host=stack.broker.host, broker_port=stack.broker.port, credentials=credentials,
        reporting_interval_s=3600, link=(link_ms / 1000, link_ms / 1000), seed=1,
    )
    fleet.start()
    try:
        token = stack.token("utility")
        client = httpx.Client(timeout=10)
        url = f"{stack.url('edge')}/function/edge-read/meters/{meter}/reading"
        params = {"live": "true", "timeout": "5"}
        deadline = time.monotonic() + 30
        while client.get(url, params=params, headers={"Authorization": f"Bearer {token}"}).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("simulated meter never answered a live read")
        samples = []
        for _ in range(reads):
            t0 = time.perf_counter()
            resp = client.get(url, params=params, headers={"Authorization": f"Bearer {token}"})
            samples.append((time.perf_counter() - t0) * 1000)
            if resp.status_code != 200 or resp.json()["source"] != "meter":
                raise RuntimeError(f"live read was not served by the meter: {resp.status_code} {resp.text[:200]}")
        client.close()
    finally:
        fleet.stop()
    link_rtt = 2 * link_ms
    overhead = sorted(s - link_rtt for s in samples)
    return {
        "reads": reads,
        "link_ms_each_way": link_ms,
        "latency_p50_ms": round(statistics.median(samples), 2),
        "overhead_p50_ms": round(statistics.median(overhead), 2),
        "overhead_p99_ms": round(overhead[min(len(overhead) - 1, int(0.99 * len(overhead)))], 2),
    }


def bench_memory(twins: int) -> dict[str, Any]:
    """Realistic twins written with the twin module's own Lua scripts, pipelined for speed."""
    with RedisServer() as server:
        client = redis.Redis.from_url(server.url, decode_responses=True)
        create, measure, merge = (client.register_script(src) for src in (CREATE_LUA, MEASURE_LUA, MERGE_LUA))
        before = int(client.info("memory")["used_memory"])
        now = time.time()
        batch = 2000
        for start in range(0, twins, batch):
            pipe = client.pipeline(transaction=False)
            for i in range(start, min(twins, start + batch)):
                key = keys.twin(f"mtr-{i:07d}")
                profile = {"kind": "prosumer" if i % 3 == 0 else "household", "link": "nbiot"}
                create(keys=[key], args=[f"mtr-{i:07d}", "edge", json.dumps(profile), now], client=pipe)
                m = {"ts": now, "import_kwh": 10_000 + i / 7, "export_kwh": i / 13, "power_w": 640.5,
                     "voltage_v": 231.2}
                measure(keys=[key], args=[json.dumps(m), now, i], client=pipe)
                reported = {"relay": "closed", "reporting_interval_s": 900, "online": True, "tariff_id": "tou-2"}
                merge(keys=[key], args=["r", json.dumps(reported), now, -1], client=pipe)
                merge(keys=[key], args=["d", json.dumps({"reporting_interval_s": 300}), now, -1], client=pipe)
            pipe.execute()
        after = int(client.info("memory")["used_memory"])
        sample_id = f"mtr-{twins // 2:07d}"
        sample = client.memory_usage(keys.twin(sample_id))
        twin = TwinStore(client).get(sample_id)
        if twin.measurement is None or twin.delta != {"reporting_interval_s": 300}:
            raise RuntimeError(f"benchmark twin {sample_id} is not what was written: {twin.to_dict()}")
        client.close()
    return {"twins": twins, "bytes_per_twin": round((after - before) / twins, 1), "memory_usage_one_twin": sample}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--live-reads", type=int, default=300)
    parser.add_argument("--link-ms", type=float, default=20.0)
    parser.add_argument("--twins", type=int, default=100_000)
    parser.add_argument("--only", choices=["cached", "live", "memory", "cluster"], action="append")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed: `sudo apt-get install wrk` (make bench does it)", file=sys.stderr)
        return 2
    only = set(args.only or ["cached", "live", "memory", "cluster"])
    results: dict[str, Any] = {}
    if only & {"cached", "live", "cluster"}:
        with EmbeddedStack(zones=("edge",), with_s3=False) as stack:
            if "cached" in only:
                results["cached_reads"] = bench_cached_reads(stack, rounds=args.rounds, seconds=args.seconds)
                _print("cached reads", results["cached_reads"])
            if "live" in only:
                results["live_reads"] = bench_live_reads(stack, reads=args.live_reads, link_ms=args.link_ms)
                _print("live reads", results["live_reads"])
            if "cluster" in only:
                from loadtest.cluster_bench import bench_cluster

                results["redis_cluster"] = bench_cluster(stack, rounds=args.rounds, seconds=args.seconds)
                _print("single Redis vs Redis Cluster", results["redis_cluster"])
    if "memory" in only:
        results["memory"] = bench_memory(args.twins)
        _print("memory", results["memory"])
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def _print(title: str, values: dict[str, Any]) -> None:
    print(f"\n== {title}")
    for key, value in values.items():
        print(f"  {key:<24} {value}")


if __name__ == "__main__":
    sys.exit(main())
