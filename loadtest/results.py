"""The comparison's results model: run settings, measured rows, per-scenario and per-architecture results.

Both the driver (:mod:`loadtest.compare`, :mod:`loadtest.scenarios`) and the report
(:mod:`loadtest.report`) use these; neither imports the other for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from loadtest.topology import Topology


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class RunConfig:
    """How big and long the run is; ``quick()`` for tests and smoke runs."""

    quick: bool = False
    scenarios: tuple[str, ...] = ("probe", "twin", "p2p", "ondemand", "ami", "node")
    users: int = 10
    requests_per_case: int = 400
    case_time_s: float = 20.0
    meters: int = 20
    probe_ops: int = 2
    households: int = 200
    devices_per_household: int = 5
    #: Seed 001 Fig. 10: 8K..20K requests; each step is sent within ``step_s`` seconds.
    ami_steps: tuple[int, ...] = (8000, 10000, 12000, 14000, 16000, 18000, 20000)
    ami_scale: float = 1.0
    step_s: float = 30.0
    p2p_iterations: int = 100
    p2p_negotiations: int = 10
    meter_timeout_s: float = 5.0
    node_users: int = 16
    node_requests: int = 6000
    node_time_s: float = 15.0
    max_run_s: float = 3600.0

    @classmethod
    def quick_run(cls, scenarios: tuple[str, ...] | None = None) -> RunConfig:
        """The ~2-minute settings of ``--quick`` (small counts, short steps)."""
        return cls(
            quick=True, scenarios=scenarios or cls.scenarios, users=4, requests_per_case=30, case_time_s=6.0,
            meters=4, households=40, ami_steps=(8000, 14000, 20000), ami_scale=0.02, step_s=4.0,
            p2p_iterations=10, p2p_negotiations=2, meter_timeout_s=4.0, node_users=8, node_requests=600,
            node_time_s=5.0, max_run_s=600.0,
        )


# --------------------------------------------------------------------------- measured rows
def percentile(hist: dict[str, int], q: float) -> float | None:
    """Percentile (0..1) of a Locust response-time histogram ``{ms: count}``."""
    total = sum(hist.values())
    if not total:
        return None
    need = q * total
    seen = 0
    for ms in sorted(hist, key=float):
        seen += hist[ms]
        if seen >= need:
            return float(ms)
    return float(max(hist, key=float))


@dataclass
class Row:
    """One measured case of one architecture."""

    arch: str
    scenario: str
    case: str
    requests: int
    failures: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    mean_ms: float | None
    rps: float
    bytes_by_link: dict[str, dict[str, int]] = field(default_factory=dict)
    note: str = ""
    step: str = ""
    #: Requests of the whole Locust run the byte counters belong to (several rows can share one run).
    run_requests: int = 0

    @property
    def total_bytes(self) -> int:
        """Bytes on all links during the run this row belongs to."""
        return sum(sum(d.values()) for d in self.bytes_by_link.values())

    @property
    def bytes_per_request(self) -> float | None:
        n = self.run_requests or self.requests
        return self.total_bytes / n if n else None


def rows_from_locust(entries: list[dict[str, Any]], arch: str, scenario: str, *, divide: float = 1.0,
                     bytes_by_link: dict[str, dict[str, int]] | None = None) -> list[Row]:
    """Rows from Locust's ``--json-file`` entries (``"<case> @<step>"`` names); ``divide`` turns RTT into RTT/n."""
    rows = []
    run_requests = sum(int(e["num_requests"]) for e in entries)
    for e in entries:
        n = int(e["num_requests"])
        hist = {str(k): int(v) for k, v in e.get("response_times", {}).items()}
        span = max(1e-9, float(e.get("last_request_timestamp") or 0) - float(e.get("start_time") or 0))

        def d(x: float | None) -> float | None:
            return None if x is None else round(x / divide, 2)

        name = str(e["name"])
        case, _, step = name.partition(" @")
        rows.append(Row(
            arch=arch, scenario=scenario, case=case, step=step, requests=n, failures=int(e["num_failures"]),
            p50_ms=d(percentile(hist, 0.50)), p95_ms=d(percentile(hist, 0.95)), p99_ms=d(percentile(hist, 0.99)),
            mean_ms=d(float(e["total_response_time"]) / n) if n else None,
            rps=round(n / span, 2) if n > 1 else float(n),
            bytes_by_link=bytes_by_link or {}, run_requests=run_requests,
        ))
    return rows


@dataclass
class ScenarioResult:
    """What one scenario measured on one architecture (or why it could not run)."""

    name: str
    rows: list[Row] = field(default_factory=list)
    unavailable: str | None = None


@dataclass
class ArchResult:
    """Every scenario's result on one architecture, its notes and how long it ran."""

    topo: Topology
    scenarios: dict[str, ScenarioResult]
    notes: list[str]
    seconds: float
