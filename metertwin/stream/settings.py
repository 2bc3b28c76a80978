"""Tunables of the event streams (``STREAM_`` environment variables), read once per process."""

from __future__ import annotations

import functools

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def _env(name: str) -> AliasChoices:
    return AliasChoices(f"STREAM_{name}")


class StreamSettings(BaseSettings):
    """Tunables of event emission and of the SSE service. Units are in the names."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, populate_by_name=True)

    #: Off: twin changes emit no events (the ingest cost without streams, for comparison).
    enabled: bool = Field(default=True, validation_alias=_env("ENABLED"))
    #: Events kept per zone at most (approximate: ``XADD MAXLEN ~``).
    maxlen: int = Field(default=200_000, ge=100, validation_alias=_env("MAXLEN"))
    #: Events older than this are trimmed; ``Last-Event-ID`` resumes without a gap within it.
    retention_s: float = Field(default=3600.0, gt=0, validation_alias=_env("RETENTION_S"))
    #: Events queued for one SSE client before it counts as too slow and is cut off.
    client_queue_max: int = Field(default=2000, ge=1, validation_alias=_env("CLIENT_QUEUE_MAX"))
    #: A comment line is sent after this long without an event (keeps proxies from closing).
    heartbeat_s: float = Field(default=15.0, gt=0, validation_alias=_env("HEARTBEAT_S"))
    #: One write to a client may take this long; a client that does not read is cut off.
    send_timeout_s: float = Field(default=10.0, gt=0, validation_alias=_env("SEND_TIMEOUT_S"))
    #: Entries one ``XREAD`` returns at most (the fan-out's batch).
    read_count: int = Field(default=1000, ge=1, validation_alias=_env("READ_COUNT"))
    #: Most concurrent SSE clients of one process; more are answered 503.
    max_clients: int = Field(default=5000, ge=1, validation_alias=_env("MAX_CLIENTS"))
    #: The dashboard's REST reads go to these gateways: ``edge=http://host:port,fog=...`` (empty: none).
    gateway_urls: str = Field(default="", validation_alias=_env("GATEWAY_URLS"))
    #: Other zones' Redis whose event streams ``GET /events?zone=`` follows: ``fog=redis://host:port/db``.
    zone_redis_urls: str = Field(default="", validation_alias=_env("ZONE_REDIS_URLS"))

    @model_validator(mode="after")
    def _queue_holds_a_read(self) -> StreamSettings:
        # One XREAD's entries are offered before any writer runs: a smaller queue cuts every client in a burst.
        if self.client_queue_max < self.read_count:
            raise ValueError(f"STREAM_CLIENT_QUEUE_MAX {self.client_queue_max} is below STREAM_READ_COUNT "
                             f"{self.read_count}")
        return self


@functools.cache
def get_stream_settings() -> StreamSettings:
    """The process-wide settings, read from the environment once."""
    return StreamSettings()
