"""Synthetic probe function for the comparison runs: an app request that touches the zone's hot store.

``GET /probe?ops=<n>&bytes=<n>`` does ``ops`` Redis round trips to the hot store (``REDIS_URL``,
which the comparison wires through the emulated links) and returns ``bytes`` of payload
(default 512, seed 000's application payload). Needs a ``utility`` (or admin/service) token.
It exists so the comparison can run end to end with nothing but a gateway, and so tests can
check that the report follows the topology.
"""

from __future__ import annotations

import sys
from pathlib import Path

# On OpenFaaS, configuration.copy puts metertwin/ beside this file.
if (Path(__file__).parent / "metertwin").is_dir():
    sys.path.insert(0, str(Path(__file__).parent))

from metertwin.core.clients import get_redis
from metertwin.core.http import Context, Event, Request, Response, Router, json_response, query_float

router = Router()
PROBE_KEY = "mt:loadtest:probe"


@router.get("/probe", scopes={"utility"})
def probe(req: Request) -> Response:
    ops = int(query_float(req.query, "ops", 1, lo=0, hi=100))
    size = int(query_float(req.query, "bytes", 512, lo=0, hi=65536))
    redis = get_redis()
    for _ in range(ops):
        redis.get(PROBE_KEY)
    return json_response({"ops": ops, "payload": "x" * size, "elapsed_ms": req.elapsed_ms()})


def handle(event: Event, context: Context) -> Response:
    return router.dispatch(event, context)
