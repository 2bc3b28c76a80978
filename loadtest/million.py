"""One node, many meters behind concentrators: ``python -m loadtest.million`` (issue 14's benchmark).

It starts its own stack (Mosquitto with dynamic security; edge and fog Redis; an edge gateway
serving ``edge-registry``, ``edge-read`` and ``edge-ingest`` and a fog gateway serving
``fog-mdms-ingest``, both subscribed to the concentrators' ``dcu/+/up/readings``, with connector
batches ``--connector-batch``), then:

1. provisions ``--meters`` twins behind concentrators of ``--per-concentrator`` meters (default: 100
   concentrators, at least 1,000 meters each) through the
   registry (``POST /concentrators``, ``POST /concentrators/{id}/twins``: one broker role per
   concentrator, no account per meter) and times it;
2. measures the floors on the same machine: the raw MQTT pipe (batch messages of the same size
   through the broker to a counting subscriber, :func:`loadtest.mdms_bench.raw_pipe`) and the raw
   ASGI + async-Redis HMGET app (:mod:`loadtest.redis_hello`, wrk at peak);
3. runs the simulator's concentrator mode (``python -m meter_sim run --concentrators ... --spread``,
   its own process) at ``--interval`` for ``--minutes``, while cached reads (``edge-read``) run at
   ``--read-rate`` (wrk, fixed rate) and a prober watches ``--probes`` twins for the end-to-end
   latency (reading's ``ts`` -> visible in the twin; resolution ~20 ms);
4. waits for the backlog to drain and counts, per meter: applied at the edge (twin version - 1),
   accepted at the fog (MDMS counters), duplicates (applied more often than sent), lost
   (sent - applied once), dead letters (fog) and concentrator rejections (edge).

Sustained readings/s = readings applied between the first and the last sweep of the sending window
(sweeps every few seconds) / that time. CPU us per reading = CPU time of each process over the run
(``/proc/<pid>/stat``) / readings sent. Bytes per twin = Redis ``used_memory`` after the run minus
before provisioning, / meters (edge: twin + fleet record; fog: the MDMS hot state of the run).

Prints a table; ``--json FILE`` writes every figure (keys ``meters``, ``readings_per_s``, ``lost``,
``duplicated``, ``bytes_per_twin``, ``read_p99_ms``, ``cpu_us_per_reading`` among them).
Not a timed test: ``--meters 100000 --minutes 2`` takes ~5 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import redis
import yaml

from embedded.stack import EmbeddedStack
from loadtest.bench import served, wrk
from loadtest.mdms_bench import raw_pipe
from loadtest.upgrade_measures import stats
from meter_sim.scale import _proc_stat
from metertwin.core import topics
from metertwin.mdms import keys as mdms_keys
from metertwin.twin import keys

ROOT = Path(__file__).resolve().parent.parent
FUNCTIONS = ("edge-registry", "edge-read", "edge-ingest", "fog-mdms-ingest")
TARGETS = {"readings_per_s": 16_700, "bytes_per_twin": 1024, "read_p99_ms": 10.0}
CHUNK = 10_000


def bench_stack(path: Path, connector_batch: str) -> None:
    """stack.yml with only the functions of this benchmark, handlers absolute, connector batches on."""
    doc = yaml.safe_load((ROOT / "stack.yml").read_text())
    doc["functions"] = {k: v for k, v in doc["functions"].items() if k in FUNCTIONS}
    for name, fn in doc["functions"].items():
        fn["handler"] = str((ROOT / fn["handler"]).resolve())
        if connector_batch and name in ("edge-ingest", "fog-mdms-ingest"):
            fn.setdefault("annotations", {})["mqtt-batch"] = connector_batch
    path.write_text(yaml.safe_dump(doc))


def provision(stack: EmbeddedStack, meters: int, per: int, tag: str, workers: int = 2) -> list[dict[str, Any]]:
    """Concentrators of ``per`` meters each, their twins; returns the simulator's credentials list."""
    admin = stack.token("admin")
    url = f"{stack.url('edge')}/function/edge-registry"
    specs = []
    for c in range((meters + per - 1) // per):
        ids = [f"mm{tag}-{c:04d}-{i:05d}" for i in range(min(per, meters - c * per))]
        specs.append({"concentrator_id": f"dcu{tag}-{c:04d}", "meters": ids})

    def one(spec: dict[str, Any]) -> None:
        with httpx.Client(timeout=300, headers={"Authorization": f"Bearer {admin}"}) as http:
            resp = http.post(f"{url}/concentrators", json={"concentrator_id": spec["concentrator_id"]})
            if resp.status_code != 201:
                raise RuntimeError(f"concentrator not created: {resp.status_code} {resp.text[:300]}")
            spec.update(username=resp.json()["username"], password=resp.json()["password"])
            for start in range(0, len(spec["meters"]), CHUNK):
                body = {"meters": [{"meter_id": m} for m in spec["meters"][start:start + CHUNK]]}
                resp = http.post(f"{url}/concentrators/{spec['concentrator_id']}/twins", json=body)
                if resp.status_code != 201 or resp.json()["conflicts"]:
                    raise RuntimeError(f"twins not provisioned: {resp.status_code} {resp.text[:300]}")

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(one, specs))
    return specs


def floors(stack: EmbeddedStack, batch: int, seconds: float) -> dict[str, Any]:
    """The raw MQTT pipe (readings/s in messages of ``batch``) and the raw ASGI + Redis HMGET app (req/s)."""
    body = json.dumps({"readings": [{"meter_id": f"x{i}", "seq": 1, "ts": time.time(), "import_kwh": 1.0,
                                     "power_w": 1.0} for i in range(batch)]}).encode()
    assert stack.broker is not None
    pipe = raw_pipe(stack.broker, [(f"raw{i}", body) for i in range(max(200, 20_000 // batch))])
    out: dict[str, Any] = {"mqtt_pipe_readings_per_s": round(pipe["per_s"] * batch),
                           "mqtt_pipe_msgs_per_s": round(pipe["per_s"]), "asgi_redis_rps": None,
                           "asgi_redis_p99_ms": None}
    if seconds <= 0:  # a smoke run: no wrk floor
        return out
    probe = "floor-probe"
    r = redis.Redis.from_url(stack.redis["edge"].url)
    r.hset(keys.twin(probe), mapping={"v": 1, "m": "{}"})
    with served("loadtest.redis_hello", "--redis-url", stack.redis["edge"].url, "--key", keys.twin(probe)) as url:
        wrk(url, seconds=2, connections=32)
        asgi = wrk(url, seconds=seconds, connections=32)
    r.delete(keys.twin(probe))
    return {**out, "asgi_redis_rps": round(asgi.rps), "asgi_redis_p99_ms": asgi.p99_ms}


class Watch:
    """Sweeps of applied totals (edge, fog) and a latency prober on a sample of twins, in threads."""

    def __init__(self, edge: redis.Redis, fog: redis.Redis, meters: list[str], probes: int, period_s: float) -> None:
        self.edge, self.fog, self.meters = edge, fog, meters
        self.sample = random.Random(7).sample(meters, min(probes, len(meters)))
        self.period_s = period_s
        self.sweeps: list[tuple[float, int, int]] = []
        self.latencies_s: list[float] = []
        self.stop = threading.Event()
        self._threads = [threading.Thread(target=self._sweep, daemon=True),
                         threading.Thread(target=self._probe, daemon=True)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(30)

    def totals(self) -> tuple[int, int]:
        edge = sum(v - 1 for v, _s in self.per_meter_edge().values())
        fog = sum(a for a, _d in self.per_meter_fog().values())
        return edge, fog

    def per_meter_edge(self) -> dict[str, tuple[int, int]]:
        """meter -> (twin version, last seq)."""
        out: dict[str, tuple[int, int]] = {}
        for start in range(0, len(self.meters), CHUNK):
            pipe = self.edge.pipeline(transaction=False)
            for m in self.meters[start:start + CHUNK]:
                pipe.hmget(keys.twin(m), "v", "s")
            for m, (v, s) in zip(self.meters[start:start + CHUNK], pipe.execute(), strict=True):
                out[m] = (int(v or 1), int(s if s is not None else -1))
        return out

    def per_meter_fog(self) -> dict[str, tuple[int, int]]:
        """meter -> (accepted, duplicates) of its MDMS counters."""
        out: dict[str, tuple[int, int]] = {}
        for start in range(0, len(self.meters), CHUNK):
            pipe = self.fog.pipeline(transaction=False)
            for m in self.meters[start:start + CHUNK]:
                pipe.hmget(mdms_keys.mdms_counters(m), "accepted", "duplicates")
            for m, (a, d) in zip(self.meters[start:start + CHUNK], pipe.execute(), strict=True):
                out[m] = (int(a or 0), int(d or 0))
        return out

    def scripts_run(self) -> tuple[int, int]:
        """Ingest scripts run so far at the edge and the fog (one per reading tried; O(1) to read, unlike
        :meth:`totals`): the time series of the rate. Counted from the ``CONFIG RESETSTAT`` at the start."""
        return tuple(int(c.info("commandstats").get("cmdstat_evalsha", {}).get("calls", 0))  # type: ignore[return-value]
                     for c in (self.edge, self.fog))

    def _sweep(self) -> None:
        while not self.stop.wait(self.period_s):
            edge, fog = self.scripts_run()
            self.sweeps.append((time.monotonic(), edge, fog))

    def _probe(self) -> None:
        seen: dict[str, str] = {}
        while not self.stop.wait(0.02):
            pipe = self.edge.pipeline(transaction=False)
            for m in self.sample:
                pipe.hget(keys.twin(m), "m")
            now = time.time()
            for m, raw in zip(self.sample, pipe.execute(), strict=True):
                if raw and raw != seen.get(m):
                    if m in seen:  # the first sight may be a reading older than the prober
                        self.latencies_s.append(now - float(json.loads(raw)["ts"]))
                    seen[m] = raw


def cached_reader(stack: EmbeddedStack, meter: str) -> str:
    """A direct twin with one reading, apart from the concentrators' meters; its cached-read URL."""
    stack.provision([meter])
    reading = {"seq": 1, "ts": time.time(), "import_kwh": 1.0, "power_w": 500.0, "voltage_v": 230.0}
    stack.call("edge", "edge-ingest", "POST", "/", token=stack.token("service"), json=reading,
               headers={"X-Topic": topics.readings(meter)}).raise_for_status()
    return f"{stack.url('edge')}/function/edge-read/meters/{meter}/reading?max_age=86400"


def top_commands(client: redis.Redis, readings: int, n: int = 6) -> dict[str, float]:
    """Redis time per reading of its busiest commands (INFO commandstats since the stack started):
    where the Redis CPU goes."""
    stats_ = client.info("commandstats")
    busiest = sorted(stats_.items(), key=lambda kv: -int(kv[1]["usec"]))[:n]
    return {name.removeprefix("cmdstat_"): round(int(v["usec"]) / max(1, readings), 1) for name, v in busiest}


def connector_counts(gateway_url: str) -> dict[str, float]:
    """The gateway's MQTT connector counters (``/metrics``): messages acknowledged and re-invocations
    after a 429/502/503/504 (a batch retried whole: its readings are run again, as duplicates)."""
    text = httpx.get(f"{gateway_url}/metrics", timeout=10).text
    out = {}
    for line in text.splitlines():
        for name in ("gateway_mqtt_messages_total", "gateway_mqtt_retries_total"):
            if line.startswith(name + " "):
                out[name.removeprefix("gateway_mqtt_").removesuffix("_total")] = float(line.split()[1])
    return out


def cpu_times(pids: dict[str, int]) -> dict[str, float]:
    out = {}
    for name, pid in pids.items():
        try:
            out[name] = _proc_stat(pid)[0]
        except OSError:
            out[name] = float("nan")
    return out


def sustained(sweeps: list[tuple[float, int, int]], t0: float, t1: float, col: int) -> float:
    """Readings/s applied between the first and the last sweep inside [t0, t1]."""
    inside = [s for s in sweeps if t0 <= s[0] <= t1]
    if len(inside) < 2:
        return 0.0
    return (inside[-1][col] - inside[0][col]) / (inside[-1][0] - inside[0][0])


def run(args: argparse.Namespace) -> dict[str, Any]:
    tag = f"{random.randrange(16**4):04x}"
    with EmbeddedStack(zones=("edge", "fog"), stack_path=Path(args.workdir) / "stack.yml", with_s3=False,
                       supervise=False) as stack:
        edge = redis.Redis.from_url(stack.redis["edge"].url, decode_responses=True)
        fog = redis.Redis.from_url(stack.redis["fog"].url, decode_responses=True)
        mem0 = {"edge": int(edge.info("memory")["used_memory"]), "fog": int(fog.info("memory")["used_memory"])}
        t = time.perf_counter()
        specs = provision(stack, args.meters, args.per_concentrator, tag)
        provision_s = time.perf_counter() - t
        print(f"provisioned {args.meters} twins behind {len(specs)} concentrators in {provision_s:.1f} s", flush=True)
        mem_prov = int(edge.info("memory")["used_memory"])
        assert stack.broker is not None
        broker_state = {"dynsec_file_mb": round(stack.broker.dynsec_path.stat().st_size / 1e6, 1),
                        "broker_rss_mb": round(_proc_stat(stack.broker.proc.pid)[1]) if stack.broker.proc else None}
        if args.provision_only:
            return {"meters": args.meters, "concentrators": len(specs), "per_concentrator": args.per_concentrator,
                    "provision_s": round(provision_s, 1), "provision_per_s": round(args.meters / provision_s),
                    "bytes_per_twin_provisioned": round((mem_prov - mem0["edge"]) / args.meters), **broker_state,
                    "load_avg": [round(x, 1) for x in os.getloadavg()]}
        floor = floors(stack, args.batch_max, args.floor_seconds)
        print(f"floors: {floor}", flush=True)
        creds = Path(args.workdir) / "concentrators.json"
        creds.write_text(json.dumps({"concentrators": specs}))
        meters = [m for s in specs for m in s["meters"]]
        read_url = cached_reader(stack, f"mmr{tag}")
        read_token = stack.token("utility")
        procs = {"broker": stack.broker.proc, "edge_gateway": stack.gateways["edge"].proc,
                 "fog_gateway": stack.gateways["fog"].proc, "edge_redis": stack.redis["edge"].proc,
                 "fog_redis": stack.redis["fog"].proc}
        pids = {name: int(proc.pid) for name, proc in procs.items() if proc is not None}
        summary = Path(args.workdir) / "sim.json"
        duration = args.minutes * 60
        sim = subprocess.Popen([sys.executable, "-m", "meter_sim", "run", "--broker",
                                f"{stack.broker.host}:{stack.broker.port}", "--concentrators", str(creds),
                                "--interval", str(args.interval), "--duration", str(duration), "--spread",
                                "--batch-max", str(args.batch_max), "--summary-json", str(summary)],
                               stdout=subprocess.DEVNULL, start_new_session=True)
        pids["simulator"] = sim.pid
        for client in (edge, fog):  # the ingest scripts counted from here on (Watch.scripts_run)
            client.config_resetstat()
        watch = Watch(edge, fog, meters, args.probes, 1.0)
        cpu0 = cpu_times(pids)
        t_start = time.monotonic()
        watch.start()
        reads: dict[str, Any] = {}
        conns = 8
        reading_thread = threading.Thread(target=lambda: reads.update(vars(wrk(
            read_url, seconds=max(1.0, duration - 2), connections=conns, token=read_token,
            delay_ms=1000 * conns / args.read_rate))), daemon=True)
        reading_thread.start()
        cpu_sim = cpu_times({"simulator": sim.pid})
        while sim.poll() is None:
            cpu_sim = cpu_times({"simulator": sim.pid})  # last sample before it exits
            time.sleep(0.5)  # sampling pace of the simulator's CPU, not a wait for a condition
        t_sent = time.monotonic()
        reading_thread.join(60)
        sent = int(json.loads(summary.read_text())["readings"])
        last, quiet_since = (-1, -1), time.monotonic()
        while time.monotonic() - quiet_since < args.drain_quiet_s:
            now_tot = watch.scripts_run()
            if now_tot != last:
                last, quiet_since = now_tot, time.monotonic()
            if min(now_tot) >= sent and min(watch.totals()) >= sent:
                break
            time.sleep(0.5)  # polling pace of the counters
        t_drained = time.monotonic()
        cpu1 = {**cpu_times(pids), **cpu_sim}
        watch.join()
        per_edge, per_fog = watch.per_meter_edge(), watch.per_meter_fog()
        applied_edge = sum(v - 1 for v, _s in per_edge.values())
        # Seqs start at 0 and are contiguous per meter: a meter applied more often than seq + 1 had a
        # reading applied twice; fewer, one lost.
        dup_edge = sum(max(0, (v - 1) - (s + 1)) for v, s in per_edge.values())
        accepted_fog = sum(a for a, _d in per_fog.values())
        redelivered_fog = sum(d for _a, d in per_fog.values())
        rejected_edge = sum(int(edge.xlen(keys.concentrator_rejections(s["concentrator_id"]))) for s in specs)
        dead_fog = int(fog.xlen(mdms_keys.MDMS_DEAD_LETTERS))
        mem1 = {"edge": int(edge.info("memory")["used_memory"]), "fog": int(fog.info("memory")["used_memory"])}
        redis_cpu = {"edge": top_commands(edge, sent), "fog": top_commands(fog, sent)}
        connector = {zone: connector_counts(stack.url(zone)) for zone in ("edge", "fog")}
        window = (t_start + args.interval, t_sent)
        cpu_us = {n: round((cpu1[n] - cpu0[n]) * 1e6 / max(1, sent), 1) for n in pids}
    lat = stats(watch.latencies_s)
    edge_rate = sustained(watch.sweeps, *window, col=1)
    fog_rate = sustained(watch.sweeps, *window, col=2)
    return {
        "meters": args.meters, "concentrators": len(specs), "per_concentrator": args.per_concentrator,
        "interval_s": args.interval, "minutes": args.minutes, "batch_max": args.batch_max,
        "connector_batch": args.connector_batch, "provision_s": round(provision_s, 1),
        "provision_per_s": round(args.meters / provision_s), **broker_state,
        "offered_per_s": round(args.meters / args.interval),
        "sent": sent, "sent_per_s": round(sent / (t_sent - t_start)),
        "readings_per_s": round(min(edge_rate, fog_rate)), "edge_readings_per_s": round(edge_rate),
        "fog_readings_per_s": round(fog_rate), "drain_s": round(t_drained - t_sent, 1),
        "applied_edge": applied_edge, "accepted_fog": accepted_fog,
        "lost": max(0, sent - (applied_edge - dup_edge)) + max(0, sent - accepted_fog),
        "lost_edge": max(0, sent - (applied_edge - dup_edge)), "lost_fog": max(0, sent - accepted_fog),
        "duplicated": dup_edge, "fog_redeliveries_deduplicated": redelivered_fog,
        "dead_lettered": dead_fog, "edge_rejected": rejected_edge, "connector": connector,
        "latency_p50_ms": lat.get("p50_ms"), "latency_p99_ms": lat.get("p99_ms"), "latency_samples": lat["n"],
        "bytes_per_twin": round((mem1["edge"] - mem0["edge"]) / args.meters),
        "bytes_per_twin_provisioned": round((mem_prov - mem0["edge"]) / args.meters),
        "fog_bytes_per_twin": round((mem1["fog"] - mem0["fog"]) / args.meters),
        "redis_used_memory": mem1, "read_rate": args.read_rate, "read_rps": round(reads.get("rps", 0)),
        "read_p50_ms": reads.get("p50_ms"), "read_p99_ms": reads.get("p99_ms"), "read_errors": reads.get("errors"),
        "cpu_us_per_reading": cpu_us, "redis_commands_us_per_reading": redis_cpu, "floors": floor,
        "load_avg": [round(x, 1) for x in os.getloadavg()],
        "sweeps": [(round(t - t_start, 1), e, f) for t, e, f in watch.sweeps],
    }


def show(f: dict[str, Any]) -> None:
    if "sent" not in f:  # --provision-only
        print(json.dumps(f, indent=1))
        return
    rows = [
        ("meters / concentrators", f"{f['meters']:,} / {f['concentrators']:,} x {f['per_concentrator']}"),
        ("provisioning", f"{f['provision_s']} s ({f['provision_per_s']:,} twins/s)"),
        ("offered (interval)", f"{f['offered_per_s']:,}/s ({f['interval_s']} s), sent {f['sent_per_s']:,}/s"),
        ("readings/s applied edge / fog", f"{f['edge_readings_per_s']:,} / {f['fog_readings_per_s']:,}"),
        ("lost / duplicated", f"{f['lost']} / {f['duplicated']}"),
        ("dead-lettered / rejected", f"{f['dead_lettered']} / {f['edge_rejected']}"),
        ("latency p50 / p99", f"{f['latency_p50_ms']} / {f['latency_p99_ms']} ms ({f['latency_samples']} samples)"),
        ("bytes per twin edge / fog", f"{f['bytes_per_twin']} / {f['fog_bytes_per_twin']}"),
        ("cached reads p50 / p99", f"{f['read_p50_ms']} / {f['read_p99_ms']} ms at {f['read_rps']}/s"),
        ("CPU us/reading", ", ".join(f"{k} {v}" for k, v in f["cpu_us_per_reading"].items())),
        ("Redis us/reading edge", ", ".join(f"{k} {v}" for k, v in f["redis_commands_us_per_reading"]["edge"].items())),
        ("Redis us/reading fog", ", ".join(f"{k} {v}" for k, v in f["redis_commands_us_per_reading"]["fog"].items())),
        ("raw MQTT pipe", f"{f['floors']['mqtt_pipe_readings_per_s']:,} readings/s"),
        ("raw ASGI + Redis", f"{f['floors']['asgi_redis_rps'] or 0:,} req/s, "
                              f"p99 {f['floors']['asgi_redis_p99_ms']} ms"),
        ("load average", ", ".join(f"{x:.1f}" for x in f["load_avg"])),
    ]
    for name, value in rows:
        print(f"{name:<32} {value}")
    missed = [f"{k} {f[k]} (target {'>=' if k == 'readings_per_s' else '<='} {v})" for k, v in TARGETS.items()
              if f[k] is not None and (f[k] < v if k == "readings_per_s" else f[k] > v)]
    if missed:
        print("targets not met: " + "; ".join(missed))


def main(argv: list[str] | None = None) -> int:
    import tempfile

    ap = argparse.ArgumentParser(prog="python -m loadtest.million", description=__doc__.split("\n")[0])
    ap.add_argument("--meters", type=int, default=1_000_000)
    ap.add_argument("--per-concentrator", type=int, default=0,
                    help="meters per concentrator (default: meters / 100, at least 1,000: one broker role rewrite "
                         "per concentrator, ~3 s each at 1,000,000 relays)")
    ap.add_argument("--interval", type=float, default=60.0, help="reporting interval of every meter, s (60)")
    ap.add_argument("--minutes", type=float, default=5.0, help="sending time (5)")
    ap.add_argument("--batch-max", type=int, default=100, help="readings per concentrator message (100)")
    ap.add_argument("--connector-batch", default="20/20", help="mqtt-batch annotation of both ingests ('' off)")
    ap.add_argument("--read-rate", type=float, default=200.0, help="cached reads per second during ingest (200)")
    ap.add_argument("--probes", type=int, default=100, help="twins watched for the end-to-end latency (100)")
    ap.add_argument("--floor-seconds", type=float, default=5.0, help="wrk time of the ASGI + Redis floor (0: skip)")
    ap.add_argument("--drain-quiet-s", type=float, default=30.0, help="give up draining after this long idle")
    ap.add_argument("--provision-only", action="store_true", help="stop after provisioning (its time and memory)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args(argv)
    args.per_concentrator = args.per_concentrator or max(1000, args.meters // 100)
    with tempfile.TemporaryDirectory(prefix="million-") as tmp:
        args.workdir = tmp
        bench_stack(Path(tmp) / "stack.yml", args.connector_batch)
        figures = run(args)
    show(figures)
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=1))
    return 0 if figures.get("lost", 0) == 0 and figures.get("duplicated", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
