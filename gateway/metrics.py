"""Prometheus metrics with the OpenFaaS gateway's names, in a registry per gateway app.

Besides OpenFaaS's ``gateway_function_invocation_total``, ``gateway_functions_seconds`` and
``gateway_service_count``, metertwin's own: ``gateway_mqtt_lag_seconds`` (receipt to
acknowledgement of a connector message), ``gateway_mqtt_messages_total``,
``gateway_mqtt_retries_total``, ``gateway_mqtt_inflight`` and ``gateway_async_queue_depth``,
``gateway_async_processed_total`` (read from the connector and the queue at scrape time, see
:meth:`GatewayMetrics.scrape_state`). ``deploy/grafana/metertwin-gateways.json`` charts them.

Invocation counts for ``/system/functions`` are kept in memory on the hot path and
flushed to the zone's Redis hash (shared by the zone's gateway workers) once a second.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter as Tally
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from redis.asyncio import Redis

from gateway import keys
from metertwin.core.aio import stop_requested

log = logging.getLogger("gateway.metrics")
# OpenFaaS (Go client) exposes no *_created series; neither do we.
disable_created_metrics()  # type: ignore[no-untyped-call]

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class GatewayMetrics:
    def __init__(self, zone: str, functions: Iterable[str]) -> None:
        self.zone = zone
        self.registry = CollectorRegistry(auto_describe=True)
        self.invocations = Counter(
            "gateway_function_invocation", "Function invocations by status code.",
            ["function_name", "code"], registry=self.registry,
        )
        self.seconds = Histogram(
            "gateway_functions_seconds", "Function invocation time taken.",
            ["function_name"], buckets=BUCKETS, registry=self.registry,
        )
        self.service_count = Gauge(
            "gateway_service_count", "Replicas per function (always 1 locally).",
            ["function_name"], registry=self.registry,
        )
        self.mqtt_lag = Histogram(
            "gateway_mqtt_lag_seconds", "MQTT connector: receipt of a message to its acknowledgement (with retries).",
            buckets=BUCKETS, registry=self.registry,
        )
        self.state = _StateCollector()
        self.registry.register(self.state)
        self._names = list(functions)
        for name in self._names:
            self.service_count.labels(function_name=name).set(1)
        self._children: dict[tuple[str, int], Any] = {}
        self._histograms = {name: self.seconds.labels(function_name=name) for name in self._names}
        #: Not yet flushed to Redis.
        self.pending: Tally[str] = Tally()

    def observe(self, function: str, code: int, seconds: float) -> None:
        """Record one invocation (hot path: dict lookups only, no I/O)."""
        child = self._children.get((function, code))
        if child is None:
            child = self._children[(function, code)] = self.invocations.labels(function_name=function, code=str(code))
        child.inc()
        self._histograms[function].observe(seconds)
        self.pending[function] += 1

    def scrape_state(self, *, mqtt: Any | None, processed: int, queue_depth: int) -> None:
        """Take the connector's and the async queue's figures (called right before :meth:`render`)."""
        st = self.state
        if mqtt is not None:
            st.mqtt_messages, st.mqtt_retries, st.mqtt_inflight = mqtt.delivered, mqtt.retries, mqtt.inflight
        st.async_processed, st.async_depth = processed, queue_depth

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def flush(self, redis: Redis) -> None:
        """Add the pending counts to the zone's Redis hash (they are put back if Redis fails)."""
        if not self.pending:
            return
        counts, self.pending = self.pending, Tally()
        try:
            pipe = redis.pipeline(transaction=False)
            for name, n in counts.items():
                pipe.hincrby(keys.invocation_counts(self.zone), name, n)
            await pipe.execute()
        except Exception:
            self.pending.update(counts)
            raise

    async def flush_forever(self, redis: Redis, interval_s: float = 1.0) -> None:
        failing_since: float | None = None
        last_warning = 0.0
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.flush(redis)
            except Exception as exc:  # Redis down: keep counting, retry next interval, warn once a minute
                if stop_requested():
                    raise asyncio.CancelledError from exc
                now = time.monotonic()
                failing_since = failing_since or now
                if now - last_warning >= 60:
                    log.warning("flushing invocation counts to Redis fails (for %.0f s): %s", now - failing_since, exc)
                    last_warning = now
            else:
                if failing_since is not None:
                    log.info("invocation counts flushed again after %.0f s", time.monotonic() - failing_since)
                failing_since = None

    async def counts(self, redis: Redis) -> dict[str, int]:
        """Zone-wide counts: Redis plus what this worker has not flushed yet."""
        stored = await redis.hgetall(keys.invocation_counts(self.zone))
        out = {(k.decode() if isinstance(k, bytes) else k): int(v) for k, v in stored.items()}
        for name, n in self.pending.items():
            out[name] = out.get(name, 0) + n
        return out


class _StateCollector:
    """Figures the connector and the async queue keep themselves, exposed at scrape time."""

    def __init__(self) -> None:
        self.mqtt_messages = self.mqtt_retries = self.mqtt_inflight = 0
        self.async_processed = self.async_depth = 0

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("gateway_mqtt_messages", "MQTT connector: messages delivered and acknowledged.",
                                  value=self.mqtt_messages)
        yield CounterMetricFamily("gateway_mqtt_retries",
                                  "MQTT connector: re-invocations after a backend answered 429/502/503/504.",
                                  value=self.mqtt_retries)
        yield GaugeMetricFamily("gateway_mqtt_inflight", "MQTT connector: messages received, not yet acknowledged.",
                                value=self.mqtt_inflight)
        yield CounterMetricFamily("gateway_async_processed", "Async calls this worker completed.",
                                  value=self.async_processed)
        yield GaugeMetricFamily("gateway_async_queue_depth",
                                "Async calls queued or in process in the zone's queue (-1: Redis unreachable).",
                                value=self.async_depth)
