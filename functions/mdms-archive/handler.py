"""MDMS archive (cloud): moves rarely read hot interval data to the cold tier, cron triggered.

The cron connector (stack.yml annotation ``schedule``) invokes ``POST /`` with the
gateway's ``service`` token (the local gateway and ``python -m gateway.connect`` send one);
the ``X-Connector`` header proves nothing, anyone can set it, so it is not looked at
(issue 10, item 1; docs/security.md, "Connector-triggered routes"). Operators may also run
it (``POST /run``) or ask what it would do (``GET /plan``). The policy and the write-verify-index-trim protocol are in
``metertwin/mdms/tiering.py``; see docs/mdms.md. Runs in the cloud zone, reaching the fog
zone's Redis through ``HOT_REDIS_URL``.
"""

from __future__ import annotations

import sys
from pathlib import Path

# On OpenFaaS, configuration.copy puts metertwin/ beside this file.
if (Path(__file__).parent / "metertwin").is_dir():
    sys.path.insert(0, str(Path(__file__).parent))

from typing import Any, cast

from metertwin.core.http import Context, Event, Request, Response, Router, json_response
from metertwin.mdms import keys, tiering
from metertwin.mdms.hot_store import get_hot_redis

router = Router()
OPENAPI_PATHS: dict[str, Any] = {
    "/": {"post": {"summary": "Cron tick (service token): move rarely read hot data to S3"}},
    "/run": {"post": {"summary": "Run the archive now"}},
    "/plan": {"get": {"summary": "What the archive would do with every hot meter-day, and why"}},
}


def _run() -> Response:
    report = tiering.archive()
    status = 503 if report["status"] == "failed" else 200
    return json_response(report, status)


@router.post("/", scopes={"mdms"})
def on_schedule(req: Request) -> Response:
    """A cron tick: the connector's service token (or an mdms/admin one), like ``POST /run``."""
    return _run()


@router.post("/run", scopes={"mdms"})
def run(req: Request) -> Response:
    return _run()


@router.get("/plan", scopes={"mdms", "utility"})
def plan(req: Request) -> Response:
    """Dry run: the decision and its reason for every hot meter-day, and the last run."""
    decisions = tiering.plan()
    last = cast(dict[str, str], get_hot_redis().hgetall(keys.MDMS_ARCHIVE_LAST_RUN))
    summary: dict[str, int] = {}
    for d in decisions:
        summary[f"{d.action}:{d.reason}"] = summary.get(f"{d.action}:{d.reason}", 0) + 1
    return json_response({"policy": tiering.policy(), "summary": summary,
                          "decisions": [d.to_dict() for d in decisions[:5000]], "last_run": last or None})


def handle(event: Event, context: Context) -> Response:
    return router.dispatch(event, context)
