"""Shared helpers of the grid aggregation and rule tests (fog zone: MDMS ingest + grid)."""

from __future__ import annotations

import time
from typing import Any

from metertwin.grid import aggregates
from metertwin.grid.archive import reset_s3
from metertwin.grid.settings import reset_grid_settings
from metertwin.mdms import hot_store
from tests.invoke import call, load_handler
from tests.mdms.mdms_fixtures import INTERVAL_S, publish, reading, register, token

__all__ = ["INTERVAL_S", "publish", "reading", "register", "token"]


def reset_grid() -> None:
    reset_grid_settings()
    reset_s3()


def place(meter_id: str, version: int, transformer: str | None = "T1", feeder: str | None = "F1",
          substation: str | None = "S1", region: str | None = "R1") -> bool:
    return aggregates.set_place(hot_store.get_hot_redis(), meter_id, {
        "transformer": transformer, "feeder": feeder, "substation": substation, "region": region}, version)


def drain() -> dict[str, int]:
    """Apply the pending entries (what fog-grid's cron tick does)."""
    return aggregates.drain(hot_store.get_hot_redis())


def grid_handler() -> Any:
    return load_handler("grid")


def get(path: str, tok: str | None = None, **query: str) -> tuple[int, Any]:
    return call(grid_handler(), "GET", path, token=tok or token("utility"), query=query or None)


def aligned(intervals_ago: int) -> float:
    """An interval boundary ``intervals_ago`` intervals before now (epoch s)."""
    return float((int(time.time()) // INTERVAL_S - intervals_ago) * INTERVAL_S)
