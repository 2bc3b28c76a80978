"""Benchmark: twin VENs per bridge process, and latency from the VTN's event to the meter's command.

    python -m dr_bridge.bench --twins 100 1000 --poll 10

For each fleet size: start Redis and Mosquitto (embedded, free ports), create the twins,
run a stock openleadr VTN in a *child process* (so its CPU is not counted), start the
bridge in this process with the dr-event handler called in-process (its CPU *is* counted),
wait for every VEN to register, measure idle CPU share and RSS over ``--idle`` seconds of
polling, then queue one immediately-active SIMPLE event for every VEN and time, per meter,
the VTN's queueing of the event to the meter's command arriving on its MQTT topic.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import multiprocessing as mp
import os
import resource
import threading
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

log = logging.getLogger("dr_bridge.bench")


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 1e6


def cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


# --- the VTN, in its own process -------------------------------------------------------
def _vtn_main(conn: Connection, port: int, poll_s: float, sampling_s: float) -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("openleadr").setLevel(logging.ERROR)
    from dr_bridge.demo import UtilityVtn

    async def serve() -> None:
        vtn = UtilityVtn(port=port, poll_s=poll_s, sampling_s=sampling_s)
        await vtn.start()
        loop = asyncio.get_running_loop()
        conn.send("ready")
        while True:
            cmd, arg = await loop.run_in_executor(None, conn.recv)
            if cmd == "registered":
                conn.send(len(vtn.registered))
            elif cmd == "issue":
                ids, lead = arg
                issued = time.time()
                event_id = vtn.issue(ids, intervals=[(lead, 120.0, 2.0)])
                conn.send((event_id, issued))
            elif cmd == "cpu":
                conn.send(cpu_s())
            elif cmd == "answers":
                conn.send({k: v.opt_type for k, v in vtn.answers_for(arg).items()})
            elif cmd == "stop":
                await vtn.stop()
                conn.send("stopped")
                return

    asyncio.run(serve())


class VtnProcess:
    def __init__(self, poll_s: float, sampling_s: float) -> None:
        from dr_bridge.demo import free_port

        self.port = free_port()
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_vtn_main, args=(child, self.port, poll_s, sampling_s), daemon=True)
        self.proc.start()
        if not self.conn.poll(60) or self.conn.recv() != "ready":
            raise RuntimeError("VTN process did not start")
        self.url = f"http://127.0.0.1:{self.port}/OpenADR2/Simple/2.0b"

    def ask(self, cmd: str, arg: Any = None, timeout_s: float = 30.0) -> Any:
        self.conn.send((cmd, arg))
        if not self.conn.poll(timeout_s):
            raise TimeoutError(f"VTN did not answer {cmd!r}")
        return self.conn.recv()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.ask("stop")
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


# --- the zone: Redis, Mosquitto, environment -------------------------------------------
@contextlib.contextmanager
def zone() -> Iterator[dict[str, str]]:
    from metertwin.core import clients
    from metertwin.core.settings import reset_settings
    from storage.embedded import Mosquitto, RedisServer

    with RedisServer() as redis_server, Mosquitto(max_queued_messages=100_000) as broker, \
            TemporaryDirectory() as secrets:
        key = os.urandom(16).hex()
        Path(secrets, "token-signing-key").write_text(key)
        Path(secrets, "mqtt-password").write_text(broker.service_password)
        values = {"ZONE": "edge", "REDIS_URL": redis_server.url, "MQTT_HOST": broker.host,
                  "MQTT_PORT": str(broker.port), "MQTT_USERNAME": broker.service_user, "SECRETS_DIR": secrets,
                  "DR_ACK_TIMEOUT_S": "30"}
        os.environ.update(values)
        clients.close_all()
        reset_settings()
        yield {**values, "key": key, "mqtt_password": broker.service_password}
        clients.close_all()


class CommandClock:
    """Arrival time (wall clock) of the first load_limit command per meter, seen on the broker."""

    def __init__(self, z: dict[str, str]) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self.first: dict[str, float] = {}
        self._lock = threading.Lock()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.username_pw_set(z["MQTT_USERNAME"], z["mqtt_password"])
        done = threading.Event()
        self.client.on_subscribe = lambda *_a: done.set()
        self.client.on_message = self._on
        self.client.connect(z["MQTT_HOST"], int(z["MQTT_PORT"]))
        self.client.loop_start()
        self.client.subscribe("meters/+/down/cmd", qos=1)
        done.wait(10)

    def _on(self, _c: Any, _u: Any, msg: Any) -> None:
        now = time.time()
        meter_id = msg.topic.split("/")[1]
        with self._lock:
            self.first.setdefault(meter_id, now)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


_STACK = """\
version: 1.0
provider: {{name: openfaas, gateway: "http://127.0.0.1:8080"}}
functions:
  edge-dr-event:
    lang: python3-http
    handler: {handler}
    environment: {{ZONE: edge, REDIS_URL: "{redis}", MQTT_HOST: "{host}", MQTT_PORT: "{port}",
                  MQTT_USERNAME: "{user}", DR_ACK_TIMEOUT_S: "30"}}
    secrets: [token-signing-key, mqtt-password]
"""


@contextlib.contextmanager
def gateway_process(z: dict[str, str], threads: int) -> Iterator[str]:
    """The zone gateway (``python -m gateway``) serving only edge-dr-event, in its own process."""
    import subprocess
    import sys

    import httpx

    from dr_bridge.demo import free_port

    root = Path(__file__).resolve().parent.parent
    with TemporaryDirectory() as tmp:
        stack = Path(tmp, "stack.yml")
        stack.write_text(_STACK.format(handler=root / "functions" / "dr-event", redis=z["REDIS_URL"],
                                       host=z["MQTT_HOST"], port=z["MQTT_PORT"], user=z["MQTT_USERNAME"]))
        Path(z["SECRETS_DIR"], "gateway-basic-auth-password").write_text(os.urandom(8).hex())
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "gateway", "--stack", str(stack), "--zone", "edge",
                                 "--port", str(port), "--secrets-dir", z["SECRETS_DIR"], "--no-background",
                                 "--threads", str(threads), "--log-level", "warning"], cwd=root)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("gateway did not start")
            time.sleep(0.1)
        try:
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


async def measure(twins: int, poll_s: float, idle_s: float, sampling_s: float, lead_s: float,
                  via_gateway: bool = False) -> dict[str, Any]:
    from dr_bridge.bridge import Bridge, BridgeConfig
    from dr_bridge.invoke import handler_invoker, load_function
    from metertwin.core.auth import issue_token
    from metertwin.core.clients import get_redis
    from metertwin.twin.state import TwinStore

    out: dict[str, Any] = {"twins": twins, "poll_s": poll_s, "lead_s": lead_s}
    with zone() as z:
        store = TwinStore(get_redis())
        ids = [f"bench-{i:05d}" for i in range(twins)]
        now = time.time()
        for meter_id in ids:
            store.create(meter_id, "edge", {})
            store.report_measurement(meter_id, {"ts": now, "import_kwh": 1.0, "export_kwh": 0.0, "power_w": 2000.0,
                                                "voltage_v": 230.0}, seq=None)
        token = issue_token("dr-bridge", {"service"}, key=z["key"])
        stack = contextlib.ExitStack()
        if via_gateway:
            from dr_bridge.invoke import HttpInvoker

            invoke: Any = HttpInvoker(stack.enter_context(gateway_process(z, threads=16)), token)
        else:
            invoke = handler_invoker(load_function("dr-event"), token)
        out["function"] = "gateway subprocess" if via_gateway else "in the bridge process"
        vtn = VtnProcess(poll_s, sampling_s)
        clock = CommandClock(z)
        bridge = Bridge(ids, BridgeConfig(vtn_url=vtn.url, telemetry_refresh_s=min(10.0, sampling_s)), invoke)
        try:
            rss0, t0 = rss_mb(), time.monotonic()
            await bridge.start()
            out["register_s"] = round(time.monotonic() - t0, 1)
            out["registered_at_vtn"] = vtn.ask("registered")
            await asyncio.sleep(min(5.0, poll_s))  # let start-up settle (report requests, first polls)
            rss1 = rss_mb()
            c0, w0, v0 = cpu_s(), time.monotonic(), vtn.ask("cpu")
            await asyncio.sleep(idle_s)
            c1, w1, v1 = cpu_s(), time.monotonic(), vtn.ask("cpu")
            out["vtn_idle_cpu_pct_of_one_core"] = round(100 * (v1 - v0) / (w1 - w0), 1)
            out["rss_before_vens_mb"] = round(rss0, 1)
            out["rss_with_vens_mb"] = round(rss1, 1)
            out["rss_per_ven_kb"] = round((rss1 - rss0) * 1000 / twins, 1)
            out["idle_cpu_pct_of_one_core"] = round(100 * (c1 - c0) / (w1 - w0), 1)
            # latency: an event for every VEN, active at once (lead 0) or starting lead_s later
            event_id, issued = vtn.ask("issue", (ids, lead_s))
            c2, w2, v2 = cpu_s(), time.monotonic(), vtn.ask("cpu")
            deadline = time.monotonic() + lead_s + poll_s * 3 + 30
            while len(clock.first) < twins and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            c3, w3, v3 = cpu_s(), time.monotonic(), vtn.ask("cpu")
            out["vtn_burst_cpu_pct_of_one_core"] = round(100 * (v3 - v2) / (w3 - w2), 1)
            # (a command may reach its meter before the VEN's answer reaches the VTN)
            answers = vtn.ask("answers", event_id)
            while len(answers) < twins and time.monotonic() < deadline:
                await asyncio.sleep(0.5)
                answers = vtn.ask("answers", event_id)
            lat = [clock.first[m] - issued for m in ids if m in clock.first]
            out["commands_received"] = len(lat)
            out["opt_in"] = sum(v == "optIn" for v in answers.values())
            if lat:
                key = "event_to_command_s" if lead_s == 0 else "event_start_to_command_s"
                lat = [x - lead_s for x in lat]
                out[key] = {"p50": round(pct(lat, 0.5), 2), "p95": round(pct(lat, 0.95), 2),
                            "max": round(max(lat), 2)}
            out["event_burst_cpu_pct_of_one_core"] = round(100 * (c3 - c2) / (w3 - w2), 1)
            out["invoke_errors"] = bridge.stats.invoke_errors
        finally:
            await bridge.stop()
            clock.close()
            vtn.stop()
            stack.close()
    return out


def _without_option(args: list[str], name: str) -> list[str]:
    """``args`` without ``name`` and its values (up to the next ``--option``)."""
    out: list[str] = []
    skipping = False
    for a in args:
        if a == name or a.startswith(name + "="):
            skipping = a == name
            continue
        if skipping and not a.startswith("--"):
            continue
        skipping = False
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dr_bridge.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--twins", type=int, nargs="+", default=[100, 1000])
    p.add_argument("--poll", type=float, default=10.0, help="VTN-requested poll interval (s)")
    p.add_argument("--idle", type=float, default=30.0, help="seconds of idle polling measured")
    p.add_argument("--sampling", type=float, default=60.0, help="telemetry sampling interval the VTN requests (s)")
    p.add_argument("--lead", type=float, default=0.0,
                   help="event starts this many s after it is queued (0: active at once, measures delivery; "
                        "> poll: every meter's command is due at one instant, measures the due path)")
    p.add_argument("--via-gateway", action="store_true",
                   help="run dr-event behind a gateway subprocess (its CPU is then not the bridge's)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    results = []
    if len(args.twins) > 1:
        # One fresh process per size: Python keeps freed memory, so RSS per VEN needs a clean start.
        import subprocess
        import sys

        base = list(argv if argv is not None else sys.argv[1:])
        for n in args.twins:
            rest = _without_option(base, "--twins")
            rest = _without_option(rest, "--json")
            done = subprocess.run([sys.executable, "-m", "dr_bridge.bench", "--twins", str(n), *rest],
                                  capture_output=True, text=True, check=False)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("{")]
            if not lines:
                print(done.stderr[-2000:], file=sys.stderr)
                continue
            print(lines[-1], flush=True)
            results.append(json.loads(lines[-1]))
    else:
        result = asyncio.run(measure(args.twins[0], args.poll, args.idle, args.sampling, args.lead,
                                     args.via_gateway))
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())


