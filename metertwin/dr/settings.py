"""Tunables of demand response (``DR_`` environment variables), read once per process."""

from __future__ import annotations

import functools

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def _env(name: str) -> AliasChoices:
    return AliasChoices(f"DR_{name}", name)


class DrSettings(BaseSettings):
    """Tunables of demand response (``DR_`` environment variables). Units are in the names."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False, populate_by_name=True)

    #: A command not acknowledged this long after it was sent counts as "meter unreachable".
    ack_timeout_s: float = Field(default=10.0, gt=0, validation_alias=_env("ACK_TIMEOUT_S"))
    #: An event starting within this many seconds is ``near`` (else ``far``).
    near_window_s: float = Field(default=300.0, ge=0, validation_alias=_env("NEAR_WINDOW_S"))
    #: A twin whose last measurement is older than this reports itself offline.
    online_max_age_s: float = Field(default=900.0, gt=0, validation_alias=_env("ONLINE_MAX_AGE_S"))
    #: After an event ends, keep retrying the restore for this long.
    restore_retry_s: float = Field(default=3600.0, ge=0, validation_alias=_env("RESTORE_RETRY_S"))
    #: Share of the flexible load shed for SIMPLE levels 1, 2 and 3.
    simple_shed_fractions: tuple[float, float, float] = Field(
        default=(0.5, 0.75, 1.0), validation_alias=_env("SIMPLE_SHED_FRACTIONS"))
    #: Without a consumer figure, this share of the measured load counts as flexible.
    default_flexible_share: float = Field(default=0.5, ge=0, le=1, validation_alias=_env("DEFAULT_FLEXIBLE_SHARE"))
    #: A measurement older than this is no baseline.
    baseline_max_age_s: float = Field(default=3600.0, gt=0, validation_alias=_env("BASELINE_MAX_AGE_S"))
    #: Events kept per meter (the oldest finished ones are dropped beyond it).
    events_per_meter_max: int = Field(default=50, ge=1, validation_alias=_env("EVENTS_PER_METER_MAX"))
    #: An open-ended event (duration ``PT0S``) sheds until cancelled or modified; its record and due
    #: actions need an end: this far after its start (the VTN's cancel or modification comes first).
    open_ended_horizon_s: float = Field(default=30 * 86_400.0, gt=0, validation_alias=_env("OPEN_ENDED_HORIZON_S"))
    #: Execute events marked ``testEvent``; off: they are answered (optIn) but never curtail a customer.
    execute_test_events: bool = Field(default=False, validation_alias=_env("EXECUTE_TEST_EVENTS"))
    #: ISO 4217 currency of the consumers' price thresholds (``price_threshold`` of the DR
    #: preferences). Set: a price signal whose itemUnits names another currency is refused (454),
    #: never compared as if it were this one. Unset: a threshold counts in the VTN's currency.
    price_currency: str | None = Field(default=None, pattern=r"^[A-Z]{3}$", validation_alias=_env("PRICE_CURRENCY"))
    #: Most actions one ``POST /due`` runs (the next call continues).
    due_batch: int = Field(default=50, ge=1, validation_alias=_env("DUE_BATCH"))


@functools.cache
def get_dr_settings() -> DrSettings:
    """The process-wide settings, read from the environment once."""
    return DrSettings()
