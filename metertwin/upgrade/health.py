"""Health of a release from the gateway's Prometheus metrics: error rate and latency per function.

The gateway exposes ``gateway_function_invocation_total{function_name,code}`` and the
histogram ``gateway_functions_seconds{function_name}``. Counters are cumulative, so a
canary is judged on the difference between a snapshot taken when it started and now, on
the functions its release changes (:func:`canary_functions`) against the ones they replace.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import httpx

from metertwin.core.clients import get_http
from metertwin.core.errors import BackendUnavailable
from metertwin.upgrade.migrations import RELEASES, release

_LINE = re.compile(r'^(?P<name>[a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(?P<labels>[^}]*)\})?\s+(?P<value>\S+)')
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass
class FunctionStats:
    """Counts of one function: calls by status class, and its latency histogram (cumulative buckets)."""

    calls: float = 0.0
    errors: float = 0.0
    seconds_sum: float = 0.0
    buckets: dict[float, float] = field(default_factory=dict)

    def minus(self, before: FunctionStats) -> FunctionStats:
        return FunctionStats(
            max(0.0, self.calls - before.calls), max(0.0, self.errors - before.errors),
            max(0.0, self.seconds_sum - before.seconds_sum),
            {le: max(0.0, n - before.buckets.get(le, 0.0)) for le, n in self.buckets.items()},
        )

    def plus(self, other: FunctionStats) -> FunctionStats:
        les = set(self.buckets) | set(other.buckets)
        return FunctionStats(self.calls + other.calls, self.errors + other.errors,
                             self.seconds_sum + other.seconds_sum,
                             {le: self.buckets.get(le, 0.0) + other.buckets.get(le, 0.0) for le in les})

    @property
    def error_rate(self) -> float:
        return self.errors / self.calls if self.calls else 0.0

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the ``q`` quantile (seconds), None without data."""
        total = self.buckets.get(math.inf, 0.0)
        if total <= 0:
            return None
        for le in sorted(self.buckets):
            if self.buckets[le] >= q * total:
                return le if le != math.inf else max((b for b in self.buckets if b != math.inf), default=None)
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, "errors": self.errors, "seconds_sum": self.seconds_sum,
                "buckets": {("+Inf" if le == math.inf else repr(le)): n for le, n in self.buckets.items()}}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FunctionStats:
        buckets = {(math.inf if k == "+Inf" else float(k)): float(v) for k, v in data.get("buckets", {}).items()}
        return cls(float(data.get("calls", 0)), float(data.get("errors", 0)), float(data.get("seconds_sum", 0)),
                   buckets)


def parse_metrics(text: str) -> dict[str, FunctionStats]:
    """Per function: calls, 5xx answers, latency histogram, from the gateway's ``/metrics`` text."""
    out: dict[str, FunctionStats] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _LINE.match(line)
        if m is None:
            continue
        name = m.group("name")
        if not name.startswith(("gateway_function_invocation_total", "gateway_functions_seconds")):
            continue
        labels = dict(_LABEL.findall(m.group("labels") or ""))
        fn = labels.get("function_name")
        if fn is None:
            continue
        try:
            value = float(m.group("value"))
        except ValueError:
            continue
        stats = out.setdefault(fn, FunctionStats())
        if name == "gateway_function_invocation_total":
            stats.calls += value
            if labels.get("code", "").startswith("5"):
                stats.errors += value
        elif name == "gateway_functions_seconds_bucket":
            le = labels.get("le", "+Inf")
            stats.buckets[math.inf if le == "+Inf" else float(le)] = value
        elif name == "gateway_functions_seconds_sum":
            stats.seconds_sum = value
    return out


@dataclass(frozen=True)
class Thresholds:
    max_error_rate: float = 0.01
    max_p95_ratio: float = 1.5
    latency_slack_ms: float = 50.0
    min_calls: int = 20


@dataclass
class Verdict:
    """``ok``, ``bad`` (with reasons) or ``insufficient`` (not enough calls to judge)."""

    status: str
    reasons: list[str]
    candidate: dict[str, Any]
    baseline: dict[str, Any]
    #: The candidate's functions only the platform calls (see :data:`INTERNAL_CAPABILITIES`).
    internal: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {"status": self.status, "reasons": self.reasons, "candidate": self.candidate,
               "baseline": self.baseline}
        if self.internal is not None:
            out["internal"] = self.internal
        return out


def _summary(functions: list[str], stats: FunctionStats) -> dict[str, Any]:
    p95 = stats.quantile(0.95)
    return {"functions": functions, "calls": stats.calls, "errors": stats.errors,
            "error_rate": round(stats.error_rate, 5),
            "p95_ms": None if p95 is None else round(p95 * 1000, 2),
            "mean_ms": round(stats.seconds_sum / stats.calls * 1000, 3) if stats.calls else None}


def judge(
    before: dict[str, FunctionStats], now: dict[str, FunctionStats],
    candidate: list[str], baseline: list[str], limits: Thresholds, internal: list[str] | None = None,
    applied: int = 0,
) -> Verdict:
    """Compare the candidate release's functions with the baseline's over the window since ``before``.

    ``internal`` functions (called by the platform, not by the twins' traffic) count for the
    error rate only: their calls neither make up ``min_calls`` nor enter the latency.
    ``applied`` is the readings the new release applied to the canary's twins since it began:
    the twins' own traffic when no application reads them (a fleet that only reports), so it
    makes up ``min_calls`` with the candidate's calls. The latency is compared only once the
    candidate's own calls reach ``min_calls``.
    """
    def window(names: list[str]) -> FunctionStats:
        total = FunctionStats()
        for name in names:
            total = total.plus(now.get(name, FunctionStats()).minus(before.get(name, FunctionStats())))
        return total

    cand, base = window(candidate), window(baseline)
    inner_names = list(internal or [])
    inner = window(inner_names)
    inner_summary = _summary(inner_names, inner) if internal is not None else None
    reasons: list[str] = []
    if cand.calls + applied < limits.min_calls:
        return Verdict("insufficient", [f"{', '.join(candidate)}: {cand.calls:.0f} calls and {applied} readings "
                                        f"applied since the canary started, {limits.min_calls} needed to judge"],
                       {**_summary(candidate, cand), "readings_applied": applied}, _summary(baseline, base),
                       inner_summary)
    judged = cand.plus(inner)
    if judged.error_rate > limits.max_error_rate:
        reasons.append(f"error rate {judged.error_rate:.2%} of {', '.join(candidate + inner_names)} "
                       f"({judged.errors:.0f} of {judged.calls:.0f} calls answered 5xx) exceeds "
                       f"{limits.max_error_rate:.2%}")
    c95, b95 = cand.quantile(0.95), base.quantile(0.95)
    if c95 is not None and b95 is not None and cand.calls >= limits.min_calls:
        allowed = b95 * limits.max_p95_ratio + limits.latency_slack_ms / 1000
        if c95 > allowed:
            reasons.append(f"p95 latency {c95 * 1000:.1f} ms of {', '.join(candidate)} exceeds {allowed * 1000:.1f} ms "
                           f"({limits.max_p95_ratio}x the baseline's {b95 * 1000:.1f} ms + "
                           f"{limits.latency_slack_ms:.0f} ms)")
    return Verdict("bad" if reasons else "ok", reasons, {**_summary(candidate, cand), "readings_applied": applied},
                   _summary(baseline, base), inner_summary)


#: Capabilities whose function in a new release only the platform calls during an upgrade: the
#: front (the old release's ``edge-ingest``) stays subscribed to the readings, so the new
#: release's ingest is called by its inbox drainer alone - one call that lingers while readings
#: keep being parked (up to ``inbox.DRAIN_BUDGET_S``, 10 s) and drains many twins' readings.
#: Its latency and call count say nothing about the twins' calls; its errors still count.
INTERNAL_CAPABILITIES = frozenset({"ingest"})


@dataclass(frozen=True)
class CanaryFunctions:
    """Which functions a canary is judged on (names with the zone prefix)."""

    #: Functions the new release changes that serve the twins' calls (reads through the gateway).
    candidate: list[str]
    #: The old release's functions for the same capabilities.
    baseline: list[str]
    #: Changed functions only the platform calls: judged on their errors alone.
    internal: list[str]


def canary_functions(source: str, to: str, zone: str) -> CanaryFunctions:
    """The functions release ``to`` changes against ``source``'s, split as :class:`CanaryFunctions`."""
    prefix = f"{zone}-"
    changed = release(to).changed(RELEASES)
    old = release(source).functions
    served = {cap: fn for cap, fn in changed.items() if cap not in INTERNAL_CAPABILITIES}
    return CanaryFunctions(
        candidate=[prefix + fn for fn in served.values()],
        baseline=[prefix + old[cap] for cap in served if cap in old],
        internal=[prefix + fn for cap, fn in changed.items() if cap in INTERNAL_CAPABILITIES],
    )


def fetch_metrics(url: str) -> str:
    """The gateway's ``/metrics`` text; :class:`BackendUnavailable` if it cannot be read."""
    try:
        resp = get_http().get(url, timeout=5.0)
    except httpx.HTTPError as exc:
        raise BackendUnavailable(f"cannot read metrics from {url}: {exc}") from exc
    if resp.status_code != 200:
        raise BackendUnavailable(f"metrics at {url} answered {resp.status_code}")
    return resp.text
