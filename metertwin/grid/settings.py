"""Typed settings of the grid capability (``GRID_`` variables), loaded once per process."""

from __future__ import annotations

import functools

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _env(name: str) -> AliasChoices:
    return AliasChoices(f"GRID_{name}")


class GridSettings(BaseSettings):
    """Tunables of aggregation, its history and the rules. Units are in the names."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, populate_by_name=True)

    #: Aggregate as readings arrive (off: the MDMS ingest skips the grid step).
    enabled: bool = Field(default=True, validation_alias=_env("AGGREGATION"))
    #: Length of an aggregate history interval (energy, readings, voltage band, peak).
    interval_s: int = Field(default=900, ge=60, le=3600, validation_alias=_env("INTERVAL_S"))
    #: A meter whose latest reading is this recent is online.
    online_s: int = Field(default=300, ge=10, validation_alias=_env("ONLINE_S"))
    #: A meter whose latest reading is older than this is stale.
    stale_s: int = Field(default=3600, ge=60, validation_alias=_env("STALE_S"))
    #: Aggregate history older than this is archived to S3 and trimmed from Redis.
    hot_retention_s: int = Field(default=7 * 86_400, ge=3600, validation_alias=_env("HOT_RETENTION_S"))
    cold_prefix: str = Field(default="grid/v1", validation_alias=_env("COLD_PREFIX"))
    #: The edge zone's Redis, whose topology audit stream the fog's places follow (unset: places come
    #: only through ``PUT /places/{meter_id}``).
    edge_redis_url: str | None = Field(default=None, validation_alias=_env("EDGE_REDIS_URL"))
    #: Topology changes copied per sync call (cron tick).
    places_batch: int = Field(default=10_000, ge=1, validation_alias=_env("PLACES_BATCH"))
    #: Where a rule's ``job`` action posts its job (the edge gateway's ``/function/edge-jobs/jobs``);
    #: unset: the action is recorded as pending on the alert.
    jobs_url: str | None = Field(default=None, validation_alias=_env("JOBS_URL"))
    #: Bounds of one ``POST /rules/evaluate`` (cron tick): subjects judged per call.
    eval_max_subjects: int = Field(default=5000, ge=1, validation_alias=_env("EVAL_MAX_SUBJECTS"))
    max_rules: int = Field(default=1000, ge=1, validation_alias=_env("MAX_RULES"))
    #: Alerts kept per rule (oldest closed ones dropped first).
    alerts_max: int = Field(default=1000, ge=10, validation_alias=_env("ALERTS_MAX"))
    #: Timeout of one MQTT or job notification (webhooks follow the destination policy's timeout).
    notify_timeout_s: float = Field(default=5.0, gt=0, le=30, validation_alias=_env("NOTIFY_TIMEOUT_S"))
    #: Longest load history one query may span.
    query_max_range_s: int = Field(default=93 * 86_400, ge=3600, validation_alias=_env("QUERY_MAX_RANGE_S"))


@functools.cache
def get_grid_settings() -> GridSettings:
    """The process-wide grid settings, read once on first use."""
    return GridSettings()


def reset_grid_settings() -> None:
    """Forget cached settings (tests that change the environment call this)."""
    get_grid_settings.cache_clear()
