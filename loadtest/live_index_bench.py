"""Ingest cost of the fleet's last-reading index (issue 13): edge ingest with and without it, one run.

Run by ``loadtest.fleet_bench`` on its provisioned fleet (twins ``m-<8 digits>`` with fleet records):
readings go through the edge's ingest code (:class:`metertwin.upgrade.inbox.IngestScript`, in-process,
no HTTP), one reading per call (``run``: the connector's single message) and in batches of
``BATCH`` (``run_many``: a connector batch), in interleaved rounds with the index write off and
on, on fresh meters each round. CPU per reading is this process's CPU plus redis-server's
(``INFO cpu``) over the round, divided by readings; the best round of each kind is reported.
"""

from __future__ import annotations

import json
import time
from typing import Any

from metertwin.upgrade.inbox import v1_ingest

BATCH = 100


def _server_cpu(r: Any) -> float:
    cpu = r.info("cpu")
    return float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"])


def _round(r: Any, ids: list[str], seq: int, *, index: bool, batch: bool) -> float:
    script = v1_ingest(r)
    script.index_live = index
    now = time.time()
    items = [(m, json.dumps({"ts": now, "import_kwh": 1.0, "export_kwh": 0.0, "power_w": 5.0, "voltage_v": 230.0},
                            separators=(",", ":")), now, seq, "") for m in ids]
    cpu0, srv0 = time.process_time(), _server_cpu(r)
    try:
        if batch:
            for start in range(0, len(items), BATCH):
                script.run_many(items[start:start + BATCH])
        else:
            for m, mjson, ts, s, _c in items:
                script.run(m, mjson, ts, s)
    finally:
        script.index_live = True
    return (time.process_time() - cpu0 + _server_cpu(r) - srv0) / len(items) * 1e6


def measure(r: Any, meters: int, *, per_round: int = 2000, rounds: int = 3) -> dict[str, Any]:
    """µs of CPU per reading, off/on, single and batch path, over ``per_round`` fresh meters a round."""
    out: dict[str, list[float]] = {"off": [], "on": [], "batch_off": [], "batch_on": []}
    kinds = (("off", False, False), ("on", True, False), ("batch_off", False, True), ("batch_on", True, True))
    n = 0
    for k in range(rounds):
        for name, index, batch in kinds:
            ids = [f"m-{(n * per_round + i) % meters:08d}" for i in range(per_round)]
            n += 1
            out[name].append(_round(r, ids, 10_000 + k, index=index, batch=batch))
    best = {name: min(values) for name, values in out.items()}
    return {
        "ingest_us_per_reading": round(best["off"], 1), "ingest_index_us_per_reading": round(best["on"], 1),
        "index_us_per_reading": round(best["on"] - best["off"], 1),
        "batch_ingest_us_per_reading": round(best["batch_off"], 1),
        "batch_ingest_index_us_per_reading": round(best["batch_on"], 1),
        "batch_index_us_per_reading": round(best["batch_on"] - best["batch_off"], 1),
        "readings_per_round": per_round, "rounds": rounds, "batch": BATCH,
    }
