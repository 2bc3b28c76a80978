"""Ingest: the meter's periodic readings and online status into the twin's reported state.

Triggered by the MQTT connector (stack.yml annotation ``topic``) with the message as
body and ``X-Topic`` naming the topic:

* ``meters/<id>/up/reading`` — a :class:`~metertwin.twin.messages.Reading` (QoS1). A
  redelivered sequence number is acknowledged but counted once (``duplicate``).
* ``meters/<id>/up/status`` — ``online`` / ``offline`` (the meter's will message).

The fog zone's MDMS ingest (validation, hot/cold storage) subscribes to the same
readings independently. A reading this function refuses (bad seq, ``ts`` outside the
shared timestamp rule, JSON too deep: a 4xx naming the value) is refused there by the
same rules and dead-lettered with its reason (metertwin.twin.uplink, docs/mdms.md "One rule at
edge and fog"); the edge gateway's MQTT connector keeps every message a function refuses as a
dead letter of the zone too (gateway.dead_letters, ``GET /system/dead-letters``).
"""

from __future__ import annotations

import sys
from pathlib import Path

# On OpenFaaS, configuration.copy puts metertwin/ beside this file.
if (Path(__file__).parent / "metertwin").is_dir():
    sys.path.insert(0, str(Path(__file__).parent))

from metertwin.core.http import Context, Event, Response, Router
from metertwin.twin.uplink import register_reading_routes
from metertwin.upgrade.inbox import register_inbox_route, v1_ingest

router = Router()
# Readings of meters bound to another release are parked for it and it is nudged (metertwin.upgrade.inbox).
register_inbox_route(router, v1_ingest)
register_reading_routes(router, v1_ingest)


def handle(event: Event, context: Context) -> Response:
    return router.dispatch(event, context)
