"""meter_sim's concentrator mode against the real broker and the real functions: N concentrators x M
meters publish batches the ingest applies, and answer a live read through the twin."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

from meter_sim import ConcentratorFleet
from meter_sim.__main__ import build_parser
from metertwin.core import topics
from metertwin.core.clients import get_redis
from storage.embedded import Mosquitto
from tests.concentrator.support import Device, connector_call, ingest, provision, read, token, twin_hash
from tests.invoke import call
from tests.waiting import wait_until


def test_concentrator_fleet_batches_readings_and_answers_reads(env: dict[str, str], mosquitto: Mosquitto) -> None:
    tag = uuid.uuid4().hex[:8]
    specs = []
    for c in range(2):
        meters = [f"sim-{tag}-{c}-{i}" for i in range(3)]
        creds = provision(meters, f"dcu-{tag}-{c}")
        assert creds is not None
        specs.append({**creds, "meters": meters})
    watcher = Device(mosquitto, mosquitto.service_user, mosquitto.service_password)
    watcher.subscribe(topics.ALL_CONCENTRATOR_READINGS)
    try:
        with ConcentratorFleet(mosquitto.host, mosquitto.port, specs, reporting_interval_s=0, batch_max=2) as fleet:
            assert fleet.report_now() == 6
            wait_until(lambda: len(watcher.received) == 4, 5, "two batches of at most 2 from each concentrator")
            for msg in watcher.received:
                status, body = connector_call(ingest, msg.topic, msg.payload)
                assert status == 200, body
                assert body["applied"] == len(json.loads(msg.payload)["readings"])
            assert all(twin_hash(get_redis(), m)["s"] == "0" for s in specs for m in s["meters"])
            meter = specs[1]["meters"][2]
            status, body = call(read, "GET", f"/meters/{meter}/reading", token=token("utility"),
                                query={"live": "true", "timeout": "5"})
            assert status == 200, body
            assert body["source"] == "meter"
            assert fleet.stats().reads_answered == 1
    finally:
        watcher.close()


def test_cli_takes_a_concentrator_file(tmp_path: Path) -> None:
    path = tmp_path / "dcus.json"
    path.write_text(json.dumps({"concentrators": []}))
    args = build_parser().parse_args(["run", "--concentrators", str(path), "--batch-max", "100"])
    assert (args.concentrators, args.batch_max, args.credentials) == (path, 100, None)
