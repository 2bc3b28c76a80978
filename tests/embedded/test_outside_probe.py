"""What an outside probe of the running stack found (issues 10 and 12), checked through real gateways:
a command's 202 says where to follow it, an unknown command kind is named, a bill honours
``Accept: text/csv`` and its CSV ends with the total."""

from __future__ import annotations

import csv
import io
import itertools
import time
from collections.abc import Iterator

import httpx
import pytest

from embedded.stack import EmbeddedStack

_ids = itertools.count()


@pytest.fixture(scope="module")
def stack() -> Iterator[EmbeddedStack]:
    with EmbeddedStack() as running:
        yield running


def test_command_202_carries_location_that_serves_the_command(stack: EmbeddedStack) -> None:
    meter = f"probe-cmd-{next(_ids)}"
    stack.provision([meter])
    tok = stack.token("utility")
    resp = stack.call("edge", "edge-write", "POST", f"/meters/{meter}/commands", token=tok,
                      json={"kind": "relay", "params": {"state": "open"}})
    assert resp.status_code == 202, resp.text
    command_id = resp.json()["command"]["id"]
    location = resp.headers.get("location")
    assert location, f"no Location on a 202: {dict(resp.headers)}"
    followed = httpx.get(httpx.URL(str(resp.request.url)).join(location),
                         headers={"Authorization": f"Bearer {tok}"}, timeout=10)
    assert followed.status_code == 200, (location, followed.text)
    assert followed.json()["command"]["id"] == command_id


def test_unknown_command_kind_is_named_even_without_params(stack: EmbeddedStack) -> None:
    meter = f"probe-kind-{next(_ids)}"
    stack.provision([meter])
    resp = stack.call("edge", "edge-write", "POST", f"/meters/{meter}/commands", token=stack.token("utility"),
                      json={"kind": "selfdestruct"})
    assert resp.status_code == 400
    assert "selfdestruct" in resp.json()["message"]


def test_bill_honours_accept_csv_and_its_csv_ends_with_the_total(stack: EmbeddedStack) -> None:
    meter = f"probe-bill-{next(_ids)}"
    stack.provision([meter])
    start = (int(time.time()) // 86_400 - 2) * 86_400
    readings = [{"meter_id": meter, "seq": i, "ts": start + i * 900, "import": 100 + i * 0.25, "power": 1000.0}
                for i in range(96)]
    up = stack.call("fog", "fog-mdms-ingest", "POST", "/readings/batch", token=stack.token("mdms"),
                    json={"readings": readings})
    assert up.status_code == 200, up.text
    assert up.json()["accepted"] == 96
    billing = stack.token("billing")
    query = {"from": str(start), "to": str(start + 86_400), "tariff": "tou-3"}
    as_json = stack.call("fog", "fog-mdms-query", "GET", f"/meters/{meter}/billing", token=billing, params=query)
    total = as_json.json()["bill"]["total"]
    for how in ({"headers": {"Accept": "text/csv"}}, {"params": {**query, "format": "csv"}}):
        resp = stack.call("fog", "fog-mdms-query", "GET", f"/meters/{meter}/billing", token=billing,
                          **{"params": query, **how})  # type: ignore[arg-type]
        assert resp.status_code == 200
        assert resp.headers["content-type"].startswith("text/csv"), (how, resp.headers)
        rows = list(csv.DictReader(io.StringIO(resp.text)))
        assert rows[-1]["item"] == "total", rows
        assert float(rows[-1]["amount"]) == pytest.approx(total)
        assert sum(float(r["amount"]) for r in rows[:-1]) == pytest.approx(total)


def test_files_the_stack_writes_are_private(stack: EmbeddedStack) -> None:
    """docs/security.md: the data files *and the logs* are 0600. The logs were opened by the parent
    (umask 022), so gateway-<zone>.log, redis.log and mosquitto.log were 0644."""
    stack.call("edge", "edge-registry", "GET", "/meters", token=stack.token("admin"))  # something in the logs
    loose = sorted(f"{oct(p.stat().st_mode & 0o777)} {p.relative_to(stack.dir)}" for p in stack.dir.rglob("*")
                   if p.is_file() and p.stat().st_mode & 0o077)
    assert not loose, loose
