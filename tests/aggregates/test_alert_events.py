"""A grid alert's life on the zone's event stream (``alert``: raised, acknowledged, cleared, once each), and a
rule's ``job`` action creating its job in the real edge-jobs handler (real Redis, Mosquitto, HTTP)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from metertwin.core.clients import get_redis
from metertwin.core.settings import get_settings
from metertwin.grid.settings import reset_grid_settings
from metertwin.stream import events, keys
from tests.aggregates.test_rules import Meter, _alerts, _eval, _rule, grid_env
from tests.fleet.helpers import provision
from tests.invoke import call, load_handler
from tests.mdms.mdms_fixtures import mdms_env, token

__all__ = ["grid_env", "mdms_env"]


def alert_events() -> list[tuple[str, dict[str, Any]]]:
    """(topic, data) of the zone's ``alert`` events, oldest first."""
    out = []
    for entry_id, fields in get_redis().xrange(keys.zone_events(get_settings().zone)):
        e = events.Event.from_entry(entry_id, fields)
        if e.type == events.ALERT:
            out.append((e.topic, json.loads(e.data)))
    return out


def test_an_alert_is_raised_acknowledged_and_cleared_on_the_stream_once_each(meter_id: str) -> None:
    m = Meter(meter_id)
    rule = _rule(for_s=0, thresholds={"T1": 2000})
    m.power(5000)
    _eval(100)
    _eval(160)  # still open: no second event
    [alert] = _alerts(status="open")
    grid = load_handler("grid")
    for _ in range(2):  # the second acknowledgement changes nothing and emits nothing
        status, out = call(grid, "POST", f"/rules/{rule['id']}/alerts/{alert['id']}/ack", token=token("utility"))
        assert status == 200, out
    m.power(100)
    _eval(220)
    got = alert_events()
    assert [t for t, _d in got] == ["alert/transformer/T1/raised", "alert/transformer/T1/acknowledged",
                                    "alert/transformer/T1/cleared"]
    raised, acked, cleared = (d for _t, d in got)
    assert raised == {"level": "transformer", "node": "T1", "state": "raised", "id": alert["id"],
                      "rule_id": rule["id"], "rule": "T overload", "metric": "net_w", "value": 5000.0,
                      "threshold": 2000, "severity": rule["severity"], "at": 100}
    assert (acked["id"], acked["state"]) == (alert["id"], "acknowledged")
    assert (cleared["id"], cleared["value"], cleared["at"]) == (alert["id"], 100.0, 220)


def test_a_job_action_creates_its_job_in_edge_jobs(meter_id: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """GRID_JOBS_URL points at an HTTP server that hands each request to the real edge-jobs handler."""
    jobs = load_handler("jobs")
    posted: list[tuple[str, int, Any]] = []

    class EdgeJobs(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            status, out = call(jobs, "POST", "/jobs", body=body,
                               token=self.headers["Authorization"].removeprefix("Bearer "))
            posted.append((self.path, status, out))
            data = json.dumps(out).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), EdgeJobs)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("GRID_JOBS_URL", f"http://127.0.0.1:{server.server_port}/function/edge-jobs/jobs")
    reset_grid_settings()
    try:
        provision([{"meter_id": meter_id, "profile": {"feeder": "F1", "transformer": "T1"}}])
        m = Meter(meter_id)
        job = {"target": {"filter": {"transformer": "T1"}},
               "action": {"type": "topology", "patch": {"tags": {"overload": "T1"}}}}
        _rule(for_s=0, actions=[{"type": "alert"}, {"type": "job", "job": job}])
        m.power(5000)
        _eval(0)
    finally:
        server.shutdown()
    [(path, status, created)] = posted
    assert (path, status) == ("/function/edge-jobs/jobs", 201), created
    [alert] = _alerts()
    assert [(a["type"], a["status"], a["detail"]) for a in alert["actions"]] == [
        ("job", "sent", f"job {created['id']}")]
    assert created["spec"]["description"].startswith(f"alert {alert['id']} of rule T overload on T1")
    status, done = call(jobs, "GET", f"/jobs/{created['id']}", token=token("utility"))
    assert status == 200, done
    assert (done["state"], done["progress"]["succeeded"], done["progress"]["total"]) == ("completed", 1, 1)
    status, doc = call(load_handler("fleet"), "GET", f"/meters/{meter_id}/topology", token=token("utility"))
    assert status == 200, doc
    assert doc["topology"]["tags"] == {"overload": "T1"}  # the job ran its action on the transformer's twin
