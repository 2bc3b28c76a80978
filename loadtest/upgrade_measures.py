"""What the upgrade benchmark (:mod:`loadtest.upgrade_bench`) measures, and how it is summarised.

* reading delay of probe twins polled every 100 ms, per phase (:func:`probe`, :class:`Samples`);
* every meter's v2 reading history: gaps and repeats of seq, v2's delays, the switch gap
  (:func:`histories`);
* command round trips per phase (:func:`command_latencies`);
* the CPU share of each process once a second (:func:`cpu_sampler`).
"""

from __future__ import annotations

import json
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from metertwin.twin import keys as twin_keys
from metertwin.upgrade import keys as upgrade_keys


@dataclass
class Samples:
    """Delays (s) per phase."""

    by_phase: dict[str, list[float]] = field(default_factory=dict)
    #: (wall time, delay, meter) of every sample, for the timeline of the worst ones.
    timeline: list[tuple[float, float, str]] = field(default_factory=list)

    def add(self, phase: str, value: float, at: float = 0.0, meter_id: str = "") -> None:
        self.by_phase.setdefault(phase, []).append(value)
        self.timeline.append((at, value, meter_id))

    def worst(self, t0: float, n: int = 8) -> list[dict[str, Any]]:
        return [{"t_s": round(at - t0, 2), "delay_ms": round(d * 1000, 1), "meter": m}
                for at, d, m in sorted(self.timeline, key=lambda x: -x[1])[:n]]

    def summary(self) -> dict[str, Any]:
        return {phase: stats(values) for phase, values in self.by_phase.items()}


def stats(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def q(p: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000, 1)

    return {"n": len(values), "p50_ms": q(0.5), "p99_ms": q(0.99), "max_ms": round(ordered[-1] * 1000, 1),
            "mean_ms": round(statistics.fmean(values) * 1000, 1)}


class Phase:
    def __init__(self) -> None:
        self.name = "warmup"
        self.lock = threading.Lock()

    def set(self, name: str) -> None:
        with self.lock:
            self.name = name


def probe(client: redis.Redis, ids: list[str], phase: Phase, samples: Samples, stop: threading.Event) -> None:
    """Poll probe twins every 100 ms: when a twin's seq moves, the newest reading's delay is now - ts."""
    last: dict[str, int] = {}
    while not stop.is_set():
        pipe = client.pipeline(transaction=False)
        for meter_id in ids:
            pipe.hmget(twin_keys.twin(meter_id), ("s", "m"))
        seen = time.time()
        for meter_id, (s, m) in zip(ids, pipe.execute(), strict=True):
            if s is None or m is None:
                continue
            seq = int(s)
            if meter_id in last and seq > last[meter_id]:
                ts = float(json.loads(m)["ts"])
                samples.add(phase.name, max(0.0, seen - ts), ts, meter_id)
            last[meter_id] = seq
        stop.wait(0.1)


def cpu_sampler(pids: dict[str, int], out: list[dict[str, Any]], stop: threading.Event) -> None:
    """CPU share (of one core) of each process, once a second: who is busy when delays grow."""
    tick = os.sysconf("SC_CLK_TCK")

    def ticks(pid: int) -> int:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0
        return int(fields[11]) + int(fields[12])

    last = {name: ticks(pid) for name, pid in pids.items()}
    while not stop.wait(1.0):
        now = {name: ticks(pid) for name, pid in pids.items()}
        out.append({"t": time.time(), **{n: round((now[n] - last[n]) / tick, 2) for n in pids},
                    "load1": os.getloadavg()[0]})
        last = now


def command_latencies(client: redis.Redis, sent: dict[str, list[tuple[str, str]]],
                      t0: float) -> dict[str, Any]:
    out: dict[str, Any] = {}
    worst: list[tuple[float, float, str]] = []
    for phase, items in sent.items():
        if phase == "errors":
            out["errors"] = len(items)
            continue
        pipe = client.pipeline(transaction=False)
        for meter_id, command_id in items:
            pipe.hmget(twin_keys.command(meter_id, command_id), ("status", "created_at", "acked_at"))
        values, not_acked = [], 0
        for (meter_id, _), (status, created, acked) in zip(items, pipe.execute(), strict=True):
            if status != "acknowledged" or not acked:
                not_acked += 1
                continue
            values.append(max(0.0, float(acked) - float(created)))
            worst.append((float(created), values[-1], meter_id))
        out[phase] = {**stats(values), "not_acknowledged": not_acked}
    out["worst"] = [{"t_s": round(at - t0, 2), "delay_ms": round(d * 1000, 1), "meter": m}
                    for at, d, m in sorted(worst, key=lambda x: -x[1])[:8]]
    return out


def histories(client: redis.Redis, ids: list[str], interval_s: float, window: tuple[float, float]) -> dict[str, Any]:
    """Every meter's v2 history: gaps and repeats of seq, delays of v2-applied readings, the switch gap."""
    gaps = repeats = meters_checked = 0
    delays: list[float] = []
    switch_delays: list[float] = []
    handover: list[float] = []
    worst: tuple[float, str] = (0.0, "")
    for start in range(0, len(ids), 1000):
        chunk = ids[start:start + 1000]
        pipe = client.pipeline(transaction=False)
        for meter_id in chunk:
            pipe.zrange(upgrade_keys.twin_v2_history(meter_id), 0, -1, withscores=True)
        for meter_id, members in zip(chunk, pipe.execute(), strict=True):
            entries = []
            for member, score in members:
                _seq, at, body = member.split("|", 2)
                entries.append((int(score), float(at) if at else None, float(json.loads(body)["ts"])))
            if not entries:
                continue
            meters_checked += 1
            seqs = [e[0] for e in entries]
            repeats += len(seqs) - len(set(seqs))
            gaps += (seqs[-1] - seqs[0] + 1) - len(set(seqs))
            applied = [(seq, at, ts) for seq, at, ts in entries if at is not None]
            for _, at, ts in applied:
                if window[0] <= at <= window[1]:
                    delays.append(max(0.0, at - ts))
            if applied:
                # The seeded entry is the last reading v1 applied; the next ones are v2's first.
                first_v2 = applied[0]
                d = max(0.0, first_v2[1] - first_v2[2])
                switch_delays.append(d)
                if d > worst[0]:
                    worst = (d, meter_id)
                seeded = entries[0]
                if seeded[1] is None and first_v2[0] == seeded[0] + 1:
                    handover.append(max(0.0, (first_v2[1] - seeded[2]) - interval_s))
    return {"meters_with_history": meters_checked, "seq_gaps": gaps, "seq_repeats": repeats,
            "v2_reading_delay": stats(delays), "first_v2_reading_delay": stats(switch_delays),
            "worst_meter": {"meter_id": worst[1], "delay_ms": round(worst[0] * 1000, 1)},
            "handover_gap_beyond_interval": stats(handover)}

