"""Benchmark: twin events fanned out over SSE to N concurrent clients while readings are ingested.

    python -m loadtest.stream_bench --clients 1000 --rate 50 --duration 10 --json stream-bench.json

Starts a private ``redis-server`` (``storage.embedded``), one ``python -m metertwin.stream``
process, and the SSE clients in a child process of their own (asyncio, raw sockets). The main
process ingests readings through the twin's real apply path (``metertwin.upgrade.inbox``'s Lua
script, then the event append) at ``--rate`` readings/s spread over ``--meters`` twins.

Each client follows the fleet's readings (``--watch fleet``: ``type=reading``, every client sees
every reading) or one meter (``--watch meter``). Measured over ``--duration`` after a warm-up:
events delivered per second (all clients together), latency reading applied -> client
(``p50_ms``, ``p99_ms``, max), clients cut off as slow, and the stream process's CPU.
The clock is the host's: the reading's ``ts`` is stamped right before it is ingested.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TS_MARK = b'"measurement":{"ts":'


# --- the clients (child process) -------------------------------------------------------------------
async def _client(port: int, query: str, token: str, state: dict[str, Any], ready: asyncio.Event) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    writer.write(f"GET /events?{query} HTTP/1.1\r\nHost: b\r\nAuthorization: Bearer {token}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    if b" 200 " not in head.split(b"\r\n", 1)[0]:
        state["errors"] += 1
        ready.set()
        return
    state["connected"] += 1
    if state["connected"] + state["errors"] >= state["clients"]:
        ready.set()
    lat: list[float] = state["latencies"]
    while not state["stop"]:
        chunk = await reader.read(1 << 16)  # chunked framing is ignored: only the ts marks matter
        if not chunk:
            break
        now = time.time()
        at = chunk.find(TS_MARK)
        while at >= 0:
            end = chunk.find(b",", at + len(TS_MARK))
            try:
                ts = float(chunk[at + len(TS_MARK):end])
            except ValueError:
                ts = 0.0  # split across reads: not counted
            if ts >= state["measure_from"]:
                lat.append(now - ts)
            at = chunk.find(TS_MARK, end)
        if b"event: close" in chunk:
            state["cut"] += 1
            break
    writer.close()


async def _clients_main(port: int, queries: list[str], token: str, conn: Connection) -> None:
    state: dict[str, Any] = {"clients": len(queries), "connected": 0, "errors": 0, "cut": 0, "stop": False,
                             "latencies": [], "measure_from": float("inf")}
    ready = asyncio.Event()
    tasks = []
    for i, query in enumerate(queries):
        tasks.append(asyncio.create_task(_client(port, query, token, state, ready)))
        if i % 100 == 99:
            await asyncio.sleep(0)  # let the accepted connections finish their handshake
    await asyncio.wait_for(ready.wait(), 120)
    conn.send({"connected": state["connected"], "errors": state["errors"]})
    loop = asyncio.get_running_loop()
    measure_from = await loop.run_in_executor(None, conn.recv)
    state["measure_from"] = measure_from
    state["latencies"].clear()
    await loop.run_in_executor(None, conn.recv)  # stop
    state["stop"] = True
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    conn.send({"latencies": state["latencies"], "cut": state["cut"], "errors": state["errors"]})


def _clients_process(port: int, queries: list[str], token: str, conn: Connection) -> None:
    asyncio.run(_clients_main(port, queries, token, conn))


# --- the bench -------------------------------------------------------------------------------------
def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(args: argparse.Namespace) -> dict[str, Any]:
    from storage.embedded import RedisServer, free_port, wait_for_port

    key = "bench-" + secrets.token_hex(16)
    secrets_dir = Path(tempfile.mkdtemp(prefix="stream-bench-"))
    (secrets_dir / "token-signing-key").write_text(key)
    with RedisServer() as redis_server:
        env = {**os.environ, "REDIS_URL": redis_server.url, "SECRETS_DIR": str(secrets_dir), "ZONE": "edge",
               "STREAM_HEARTBEAT_S": "15"}
        os.environ.update({k: env[k] for k in ("REDIS_URL", "SECRETS_DIR", "ZONE")})
        from metertwin.core.auth import issue_token
        from metertwin.core.clients import get_redis
        from metertwin.twin.state import twin_store
        from metertwin.upgrade.inbox import v1_ingest

        port = free_port()
        server = subprocess.Popen([sys.executable, "-m", "metertwin.stream", "--port", str(port),
                                   "--log-level", "warning"], cwd=ROOT, env=env)
        try:
            wait_for_port(port, proc=server)
            meters = [f"bench-{i:05d}" for i in range(args.meters)]
            redis = get_redis()
            store = twin_store(redis)
            for meter in meters:
                store.create(meter, "edge", {})
            token = issue_token("stream-bench", {"utility"}, key=key, ttl_s=3600)
            queries = ["type=reading" if args.watch == "fleet" else f"meter={meters[i % len(meters)]}&type=reading"
                       for i in range(args.clients)]
            parent, child = mp.get_context("fork").Pipe()
            clients = mp.get_context("fork").Process(target=_clients_process, args=(port, queries, token, child))
            clients.start()
            hello = parent.recv()
            script = v1_ingest(redis)
            seq = dict.fromkeys(meters, 0)

            def publish(seconds: float) -> int:
                sent, start = 0, time.monotonic()
                while (elapsed := time.monotonic() - start) < seconds:
                    due = int(elapsed * args.rate) + 1
                    while sent < due:
                        meter = meters[sent % len(meters)]
                        seq[meter] += 1
                        ts = time.time()
                        m = json.dumps({"ts": ts, "import_kwh": 1.0, "export_kwh": 0.0, "power_w": 500.0,
                                        "voltage_v": 230.0}, separators=(",", ":"))
                        script.run(meter, m, ts, seq[meter])
                        sent += 1
                    time.sleep(max(0.0, (sent / args.rate) - (time.monotonic() - start)))  # pacing
                return sent

            publish(args.warmup)
            measure_from = time.time()
            parent.send(measure_from)
            cpu0, wall0 = _cpu_s(server.pid), time.monotonic()
            published = publish(args.duration)
            cpu1, wall1 = _cpu_s(server.pid), time.monotonic()
            time.sleep(1.0)  # let the last events arrive before the clients stop counting
            parent.send("stop")
            result = parent.recv()
            clients.join(30)
            health = json.loads(subprocess.run(
                ["curl", "-s", f"http://127.0.0.1:{port}/healthz"], capture_output=True, text=True).stdout or "{}")
        finally:
            server.terminate()
            server.wait(10)
    lat_ms = [x * 1000 for x in result["latencies"]]
    per_reading = args.clients if args.watch == "fleet" else args.clients / args.meters
    return {
        "clients": args.clients, "connected": hello["connected"], "watch": args.watch, "meters": args.meters,
        "readings_per_s": round(published / args.duration, 1),
        "events_per_s": round(len(lat_ms) / args.duration, 1),
        "expected_events_per_s": round(published / args.duration * per_reading, 1),
        "p50_ms": round(_percentile(lat_ms, 0.50), 2), "p99_ms": round(_percentile(lat_ms, 0.99), 2),
        "max_ms": round(max(lat_ms), 2) if lat_ms else None,
        "mean_ms": round(statistics.fmean(lat_ms), 2) if lat_ms else None,
        "clients_cut": result["cut"], "client_errors": result["errors"] + hello["errors"],
        "stream_cpu_pct": round(100 * (cpu1 - cpu0) / (wall1 - wall0), 1),
        "server": health, "duration_s": args.duration,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.stream_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--rate", type=float, default=50.0, help="readings ingested per second")
    parser.add_argument("--meters", type=int, default=100)
    parser.add_argument("--watch", choices=("fleet", "meter"), default="fleet")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args(argv)
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
