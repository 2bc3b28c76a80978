"""Typed settings of the MDMS functions (ingest, query, archive), loaded once per process.

Follows :mod:`metertwin.core.settings`: plain environment variables (``MDMS_`` prefix, so
that stack.yml stays readable), cached by :func:`get_mdms_settings`. Endpoints shared
with the rest of metertwin (S3, token key, the zone's Redis) come from
:func:`metertwin.core.settings.get_settings`; ``HOT_REDIS_URL`` lets the cloud archive
function reach the fog zone's Redis, which holds the hot tier.
"""

from __future__ import annotations

import functools

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from metertwin.core.settings import get_settings

DAY_S = 86_400


def _env(name: str) -> AliasChoices:
    return AliasChoices(f"MDMS_{name}")


class MdmsSettings(BaseSettings):
    """Tunables of VEE, the hot tier, the cold tier and tiering. Units are in the names."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, populate_by_name=True)

    # Where the hot tier lives; defaults to the zone's REDIS_URL (the fog functions).
    hot_redis_url: str | None = Field(
        default=None, validation_alias=AliasChoices("HOT_REDIS_URL", "MDMS_HOT_REDIS_URL")
    )
    #: The fog zone whose data this is: the ``zone=`` partition of the cold tier.
    data_zone: str | None = Field(default=None, validation_alias=AliasChoices("MDMS_DATA_ZONE", "DATA_ZONE"))
    cold_prefix: str = Field(default="mdms/v1", validation_alias=_env("COLD_PREFIX"))

    # VEE.
    interval_s: int = Field(default=900, ge=60, le=3600, validation_alias=_env("INTERVAL_S"))
    clock_skew_s: float = Field(default=300.0, ge=0, validation_alias=_env("CLOCK_SKEW_S"))
    horizon_s: float = Field(default=35 * DAY_S, gt=0, validation_alias=_env("HORIZON_S"))
    #: A gap longer than this many intervals is left open rather than estimated.
    estimation_max_gap_s: float = Field(default=2 * DAY_S, ge=0, validation_alias=_env("ESTIMATION_MAX_GAP_S"))
    #: Average demand between two reads above this is physically implausible: flagged ``suspect``.
    max_demand_kw: float = Field(default=100.0, gt=0, validation_alias=_env("MAX_DEMAND_KW"))
    nominal_voltage_v: float = Field(default=230.0, gt=0, validation_alias=_env("NOMINAL_VOLTAGE_V"))
    #: Relative band around nominal voltage outside which a reading is ``suspect``.
    voltage_tolerance: float = Field(default=0.15, gt=0, lt=1, validation_alias=_env("VOLTAGE_TOLERANCE"))
    #: Reject readings of meters neither in the registry (``keys.registry_entry`` in the hot Redis) nor
    #: already known to the MDMS. Off by default: the registry lives in the edge zone's Redis, and the
    #: broker already confines each meter's account to its own topics, so a meter is enrolled in the
    #: MDMS with its first accepted reading.
    require_registered_meter: bool = Field(default=False, validation_alias=_env("REQUIRE_REGISTERED_METER"))
    max_batch_readings: int = Field(default=10_000, ge=1, validation_alias=_env("MAX_BATCH_READINGS"))
    max_batch_bytes: int = Field(default=4 * 1_048_576, ge=1024, validation_alias=_env("MAX_BATCH_BYTES"))
    max_reading_bytes: int = Field(default=4096, ge=256, validation_alias=_env("MAX_READING_BYTES"))
    dead_letter_max: int = Field(default=100_000, ge=100, validation_alias=_env("DEAD_LETTER_MAX"))

    # Hot tier and tiering policy.
    #: Hot data older than this go cold whatever their reads.
    hot_retention_s: float = Field(default=14 * DAY_S, gt=0, validation_alias=_env("HOT_RETENTION_S"))
    #: Approximate bytes the hot interval data may take in Redis; above it the oldest days go cold.
    hot_memory_budget_bytes: int = Field(
        default=512 * 1_048_576, ge=1, validation_alias=_env("HOT_MEMORY_BUDGET_BYTES")
    )
    #: Days younger than this (counted from the end of the day) always stay hot.
    tier_min_age_s: float = Field(default=2 * DAY_S, ge=0, validation_alias=_env("TIER_MIN_AGE_S"))
    #: A meter-day read at least this often within ``tier_read_window_s`` stays hot.
    tier_hot_reads: int = Field(default=3, ge=1, validation_alias=_env("TIER_HOT_READS"))
    tier_read_window_s: float = Field(default=7 * DAY_S, gt=0, validation_alias=_env("TIER_READ_WINDOW_S"))
    #: A cold meter-day read this often within the window is copied back hot ...
    rehydrate_reads: int = Field(default=2, ge=1, validation_alias=_env("REHYDRATE_READS"))
    #: ... and stays hot at least this long.
    rehydrate_ttl_s: float = Field(default=2 * DAY_S, ge=0, validation_alias=_env("REHYDRATE_TTL_S"))
    #: Upper bound of meter-days one archive run moves (the next run continues).
    archive_max_meter_days: int = Field(default=50_000, ge=1, validation_alias=_env("ARCHIVE_MAX_METER_DAYS"))

    # Cold tier.
    meter_buckets: int = Field(default=16, ge=1, le=4096, validation_alias=_env("METER_BUCKETS"))
    s3_timeout_s: float = Field(default=5.0, gt=0, validation_alias=_env("S3_TIMEOUT_S"))
    s3_max_attempts: int = Field(default=2, ge=1, validation_alias=_env("S3_MAX_ATTEMPTS"))

    # Query.
    query_max_meters: int = Field(default=500, ge=1, validation_alias=_env("QUERY_MAX_METERS"))
    query_default_limit: int = Field(default=2000, ge=1, validation_alias=_env("QUERY_DEFAULT_LIMIT"))
    query_max_limit: int = Field(default=20_000, ge=1, validation_alias=_env("QUERY_MAX_LIMIT"))
    query_max_range_s: float = Field(default=400 * DAY_S, gt=0, validation_alias=_env("QUERY_MAX_RANGE_S"))

    @property
    def interval_ms(self) -> int:
        return self.interval_s * 1000

    def redis_url(self) -> str:
        return self.hot_redis_url or get_settings().redis_url

    def zone(self) -> str:
        return self.data_zone or get_settings().zone


@functools.cache
def get_mdms_settings() -> MdmsSettings:
    """Return the process-wide MDMS settings, read once on first use."""
    return MdmsSettings()


def reset_mdms_settings() -> None:
    """Forget cached MDMS settings (tests that change the environment call this)."""
    get_mdms_settings.cache_clear()
