"""The read capability's query (``max_age``, ``timeout``, ``live``) and its freshness rule.

One definition for every release of the read function and for its async lane, so that
they accept the same parameters, reject the same bad values and agree on what is fresh.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from metertwin.core.http import Request, query_bool, query_float
from metertwin.core.settings import get_settings

MAX_AGE_LIMIT_S = 365 * 86400


@dataclass(frozen=True, slots=True)
class ReadQuery:
    max_age_s: float
    timeout_s: float
    live: bool

    @classmethod
    def of(cls, req: Request) -> ReadQuery:
        """Parse the query; a bad value is a 400 naming the parameter."""
        settings = get_settings()
        return cls(
            max_age_s=query_float(req.query, "max_age", settings.default_read_max_age_s, lo=0, hi=MAX_AGE_LIMIT_S),
            timeout_s=query_float(req.query, "timeout", settings.meter_read_timeout_s, lo=0.05, hi=30),
            live=query_bool(req.query, "live"),
        )

    def served_from_cache(self, cached: dict[str, Any]) -> bool:
        """Whether ``cached`` (a measurement with ``ts``) may answer instead of the meter."""
        return not self.live and time.time() - float(cached["ts"]) <= self.max_age_s
