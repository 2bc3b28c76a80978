"""Ingest, release v2: readings into the v2 state schema (registers in Wh, history), for meters bound to v2.

Not subscribed to the meters' topics while release v1's ``edge-ingest`` is the front: the
front parks the readings of v2-bound meters in their inbox and nudges this function
(``/async-function``), which drains the inbox in seq order. Deployed as the front
(``topic`` annotation moved here once every twin is on v2), it parks and nudges the other
way for meters still bound to v1. See docs/upgrade.md.

Routes (after ``/function/<zone>-ingest-v2``):

* ``POST /meters/{meter_id}/inbox`` (service) — drain the readings parked for v2.
* ``POST /`` from the MQTT connector (``X-Topic: meters/<id>/up/reading`` or ``.../status``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# On OpenFaaS, configuration.copy puts metertwin/ beside this file.
if (Path(__file__).parent / "metertwin").is_dir():
    sys.path.insert(0, str(Path(__file__).parent))

from metertwin.core.http import Context, Event, Response, Router
from metertwin.twin.uplink import register_reading_routes
from metertwin.upgrade.inbox import register_inbox_route
from metertwin.upgrade.twin_v2 import v2_ingest

router = Router()
RELEASE = "v2"
register_inbox_route(router, v2_ingest)
register_reading_routes(router, v2_ingest)


def handle(event: Event, context: Context) -> Response:
    return router.dispatch(event, context)
