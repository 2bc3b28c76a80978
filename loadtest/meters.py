"""Simulated meters for a comparison run, in their own process: ``python -m loadtest.meters creds.json``.

``creds.json`` is ``{"host": "127.0.0.1", "port": N, "meters": {meter_id: password}}``; the port is
the meters' end of the emulated link to the broker, so the simulator's own link delay is off
(``lan``). Prints ``{"ready": true, "connected": N}`` once every meter is connected, then runs
until SIGTERM or ``--max-duration`` seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from pathlib import Path


async def _run(cred_file: Path, max_duration_s: float, reporting_interval_s: float) -> int:
    from meter_sim import MeterFleet

    data = json.loads(cred_file.read_text())
    if data["host"] not in ("127.0.0.1", "localhost"):
        print(json.dumps({"ready": False, "error": f"host {data['host']!r} is not loopback"}), flush=True)
        return 2
    fleet = MeterFleet(data["host"], int(data["port"]), dict(data["meters"]), link="lan",
                       reporting_interval_s=reporting_interval_s)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with fleet:
        ok = await fleet.wait_connected(timeout_s=60)
        print(json.dumps({"ready": ok, "connected": fleet.connected_count()}), flush=True)
        if not ok:
            return 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=max_duration_s)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.meters")
    parser.add_argument("credentials", type=Path)
    parser.add_argument("--max-duration", type=float, default=3600.0)
    parser.add_argument("--reporting-interval", type=float, default=60.0,
                        help="seconds between periodic readings (seed 003: one 800-byte event per minute)")
    args = parser.parse_args(argv)
    return asyncio.run(_run(args.credentials, args.max_duration, args.reporting_interval))


if __name__ == "__main__":
    sys.exit(main())
