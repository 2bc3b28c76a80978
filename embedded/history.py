"""Demo history: back-load ~35 days of 15-minute readings per simulated meter through the head-end batch route.

Each simulated meter's load model is a pure function of time (:mod:`meter_sim.profile`), so its
past is computed from the same model its live readings come from: registers start at the
meter's own drawn values 35 days ago, are integrated forward interval by interval, and the
simulated meter is then set to continue from the last back-loaded registers and sequence
number (:func:`continue_meters`), before it connects. Bills, load profiles, the cold tier and
the archive then show real numbers, and no register jumps between history and live data.
"""

from __future__ import annotations

import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from metertwin.client import Client

DAY_S = 86_400
STEP_S = 900
#: Sub-steps per interval when integrating power (midpoint rule, 3 min each).
SUBSTEPS = 5
#: Readings per batch upload (the route takes up to MDMS_MAX_BATCH_READINGS, 10,000 by default).
BATCH = 5000
#: Batches in flight at once: the gateway validates one while Redis stores another.
PARALLEL = 3


@dataclass
class History:
    """What was back-loaded: per meter the final registers and seq, and the time of the last reading."""

    start_s: float
    end_s: float
    readings: int
    accepted: int
    final: dict[str, tuple[float, float, int]]
    seconds: float


def _readings(meter_id: str, meter: Any, start_s: float, end_s: float) -> tuple[list[dict[str, Any]],
                                                                                   tuple[float, float, int]]:
    """Readings every 15 min in ``[start_s, end_s]`` from the meter's model; (import Wh, export Wh, seq) at the end."""
    imp, exp = float(meter.import_wh), float(meter.export_wh)
    h = STEP_S / SUBSTEPS
    out: list[dict[str, Any]] = []
    t, seq = start_s, 0
    while True:
        sim = meter.config.sim_time(t)
        power = meter.power_at(sim)
        out.append({"meter_id": meter_id, "seq": seq, "ts": t, "import": round(imp / 1000, 4),
                    "export": round(exp / 1000, 4), "power": round(power, 1),
                    "voltage": round(min(max(meter.model.voltage_v(sim, power), 0.0), 1000.0), 1)})
        if t + STEP_S > end_s:
            return out, (imp, exp, seq)
        for i in range(SUBSTEPS):
            p = meter.power_at(meter.config.sim_time(t + (i + 0.5) * h))
            if p >= 0:
                imp += p * h / 3600
            else:
                exp -= p * h / 3600
        t += STEP_S
        seq += 1


def back_load(client: Client, meters: dict[str, Any], *, days: float = 35.0, now: float | None = None) -> History:
    """Upload ``days`` of history for every meter (``{meter_id: SimMeter}``, not started yet) to the fog MDMS.

    Starts one interval inside the MDMS's 35-day horizon so that no reading is too old.
    """
    t0 = time.perf_counter()
    now = time.time() if now is None else now
    end = math.floor(now / STEP_S) * STEP_S
    start = math.ceil((now - days * DAY_S + STEP_S) / STEP_S) * STEP_S
    final: dict[str, tuple[float, float, int]] = {}
    pending: list[dict[str, Any]] = []
    uploads: list[Future[dict[str, Any]]] = []
    sent = 0
    # Batches go out in parallel, so one meter's readings never span two of them: VEE judges a
    # reading against its neighbours, which must not be in flight in another batch.
    with ThreadPoolExecutor(max_workers=PARALLEL, thread_name_prefix="demo-history") as pool:
        for meter_id, meter in meters.items():
            rows, final[meter_id] = _readings(meter_id, meter, start, end)
            if pending and len(pending) + len(rows) > BATCH:
                uploads.append(pool.submit(client.mdms_ingest.upload_batch, pending, source="demo-history"))
                sent += len(pending)
                pending = []
            pending.extend(rows)
        if pending:
            uploads.append(pool.submit(client.mdms_ingest.upload_batch, pending, source="demo-history"))
            sent += len(pending)
        accepted = sum(int(f.result()["accepted"]) for f in uploads)
    return History(start, end, sent, accepted, final, time.perf_counter() - t0)


def continue_meters(meters: dict[str, Any], history: History) -> None:
    """Make each simulated meter continue from its back-loaded registers and sequence number."""
    for meter_id, meter in meters.items():
        imp, exp, seq = history.final[meter_id]
        meter.import_wh, meter.export_wh, meter.seq = imp, exp, seq
        meter.measure(history.end_s)  # fixes the register origin at the last back-loaded instant


def bill_text(meter_id: str, bill: dict[str, Any], profile: dict[str, Any], tiers: dict[str, Any]) -> str:
    """The demo's time-of-use bill, line by line, with where its data came from."""
    det, b = bill["determinants"], bill["bill"]
    days = tiers.get("days") or []
    cold = sum(1 for d in days if d.get("cold"))
    lines = [f"\ntime-of-use bill of {meter_id}, {bill['from']} .. {bill['to']} (tariff {det['tariff']}, "
             f"{det['timezone']}); {det['intervals']} intervals of {det['interval_s'] // 60} min, quality "
             f"{det['quality']}; {len(days)} days of data, {cold} of them archived in the cold tier (S3)"]
    for period, e in det["periods"].items():
        lines.append(f"  {period:<10} {e['import_kwh']:>10.3f} kWh in {e['intervals']:>5} intervals, "
                     f"peak {e['max_demand_kw']:.2f} kW")
    for line in b["lines"]:
        lines.append(f"  {line['item']:<16} {line['quantity']:>10} {line['unit']:<5} x {line['rate']:<6} = "
                     f"{line['amount']:>9.2f} {b['currency']}")
    lines.append(f"  {'total':<47} {b['total']:>9.2f} {b['currency']}")
    t = profile["totals"]
    lines.append(f"load profile ({profile['interval']}): {profile['count']} intervals, {t['import_kwh']:.3f} kWh "
                 f"imported, max {t['max_kw']} kW, quality {t['quality']}")
    return "\n".join(lines)
