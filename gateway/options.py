"""Tunables of one gateway process (the CLI flags of ``python -m gateway`` map onto these)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class GatewayOptions:
    """Tunables of one gateway process (CLI flags map onto these)."""

    #: Threads running sync handlers (waitress runs the template with a few threads per replica).
    max_threads: int = 16
    #: A call not answered in this time gets 504 (OpenFaaS's watchdog exec_timeout); its thread runs on.
    exec_timeout_s: float = 30.0
    #: Stable name of this worker: async-queue consumer and MQTT client id. Reusing it after a
    #: crash lets the new process pick up the old one's pending calls and MQTT session at once.
    instance: str | None = None
    #: Pending async calls of *other* consumers idle this long are taken over.
    claim_idle_s: float = 60.0
    async_concurrency: int = 8
    callback_timeout_s: float = 10.0
    callback_attempts: int = 3
    #: MQTT messages in flight per worker (the session's Receive Maximum).
    mqtt_concurrency: int = 16
    mqtt_session_expiry_s: int = 300
    #: Subscribe in the zone's shared group (several workers) or plainly (one worker per zone).
    mqtt_shared: bool = True
    token_ttl_s: int = 3600
    #: Run the async worker, MQTT and cron connectors (off for a pure HTTP benchmark).
    background: bool = True
    flush_interval_s: float = 1.0
    drain_timeout_s: float = 10.0
    #: Access log (gateway.access_log): ``json`` or ``text``; threshold ``info`` (every call),
    #: ``warning`` (4xx and 5xx only), ``error`` (5xx only) or ``off``.
    access_log_format: str = "json"
    access_log_level: str = "info"
    #: Each dependency probe of ``/readyz`` (Redis, broker, S3) gives up after this long.
    ready_timeout_s: float = 1.0
