"""``metertwin.client`` against the embedded stack: every route covered, typed errors, pagination, retries,
revocation through a real gateway."""

from __future__ import annotations

import http.server
import itertools
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from embedded.stack import EmbeddedStack
from metertwin.client import Client, errors
from metertwin.client.fleet import Fleet
from metertwin.client.grid import Grid
from metertwin.client.jobs import Jobs
from metertwin.client.markets import DemandResponse, P2PBid, P2PMarket, Upgrades
from metertwin.client.mdms import Archive, MdmsIngest, MdmsQuery
from metertwin.client.transport import Api, Transport, retry_after_s
from metertwin.client.twins import Forward, Ingest, Read, ReadV2, Registry, Write
from metertwin.core import auth, revocation
from storage.embedded import free_port
from tests.python3_http import import_handler
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
_ids = itertools.count()

#: Which client class serves which function of stack.yml.
CLIENT_OF: dict[str, type[Api]] = {
    "edge-registry": Registry, "edge-fleet": Fleet, "edge-jobs": Jobs, "edge-read": Read, "edge-read-v2": ReadV2,
    "edge-write": Write,
    "edge-forward": Forward, "edge-ingest": Ingest, "edge-ingest-v2": Ingest, "edge-p2p-market": P2PMarket,
    "edge-p2p-bid": P2PBid, "edge-dr-event": DemandResponse, "edge-upgrade-manager": Upgrades,
    "fog-mdms-ingest": MdmsIngest, "fog-mdms-query": MdmsQuery, "fog-grid": Grid,
    "cloud-mdms-archive": Archive,
}


def _client_routes(cls: type[Api]) -> set[tuple[str, str]]:
    return {fn.__route__ for c in cls.__mro__ for fn in vars(c).values() if hasattr(fn, "__route__")}


def test_every_route_of_every_function_has_a_client_method() -> None:
    """Read each handler's router (what it really serves) and compare with the client's ``@route`` marks."""
    stack = yaml.safe_load((ROOT / "stack.yml").read_text())
    functions = stack["functions"]
    assert set(functions) == set(CLIENT_OF), "a function was added or removed: give it a client class"
    missing: list[str] = []
    for name, spec in functions.items():
        handler = import_handler(ROOT / spec["handler"] / "handler.py", f"_client_cov_{name.replace('-', '_')}")
        served = {(r.method, r.regex.pattern) for r in handler.router._routes}
        covered = {(m, "^" + re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", t.rstrip("/")) + "/?$")
                   for m, t in _client_routes(CLIENT_OF[name])}
        missing += [f"{name}: {m} {p}" for m, p in sorted(served - covered)]
    assert not missing, "routes without a client method:\n" + "\n".join(missing)


@pytest.fixture(scope="module")
def stack() -> Iterator[EmbeddedStack]:
    with EmbeddedStack() as running:
        yield running


def _client(stack: EmbeddedStack, *scopes: str, meter: str | None = None) -> Client:
    return Client(edge=stack.url("edge"), fog=stack.url("fog"), cloud=stack.url("cloud"),
                  token=stack.token(*scopes, meter=meter), basic_auth=("admin", stack.basic_auth_password))


def test_twins_and_typed_errors(stack: EmbeddedStack) -> None:
    admin = _client(stack, "admin")
    meter = f"cli-{next(_ids)}"
    made = admin.registry.provision(meter, {"kind": "household"})
    assert made["meter_id"] == meter
    assert admin.registry.get_meter(meter)["meter_id"] == meter
    twin = admin.read.twin(meter)
    assert twin["meter_id"] == meter
    with pytest.raises(errors.UnknownMeter) as unknown:
        admin.read.twin("no-such-meter")
    assert unknown.value.status == 404
    assert "no-such-meter" in unknown.value.message
    with pytest.raises(errors.Forbidden):
        _client(stack, "consumer", meter="someone-else").read.twin(meter)
    with pytest.raises(errors.Unauthorized):
        admin.with_token("not-a-token").read.twin(meter)
    with pytest.raises(errors.BadRequest, match="interval='5m'") as bad:
        _client(stack, "billing").mdms.load_profile(meter, 0, 86_400, interval="5m")  # type: ignore[arg-type]
    assert bad.value.details["field"] == "interval"
    from metertwin.core import errors as core

    assert isinstance(bad.value, core.InvalidInput)  # one root on both sides of the wire
    assert isinstance(bad.value, core.MeterTwinError)


def test_concentrators_through_the_client(stack: EmbeddedStack) -> None:
    admin = _client(stack, "admin")
    n = next(_ids)
    dcu, direct, behind = f"dcu-cli-{n}", f"cli-direct-{n}", f"cli-behind-{n}"
    made = admin.registry.create_concentrator(dcu)
    assert made["password"]
    assert made["topics"]["publish"] == f"dcu/{dcu}/up/#"
    admin.registry.provision(direct)
    assert admin.registry.provision_behind(dcu, [{"meter_id": behind}])["created"] == 1
    assert admin.registry.assign_meters(dcu, [direct, "cli-nobody"])["unknown"] == ["cli-nobody"]
    assert sorted(admin.registry.get_concentrator(dcu)["meters"]) == sorted([direct, behind])
    assert admin.registry.set_meter_route(direct, None)["assigned"] == 1
    assert admin.registry.get_concentrator(dcu)["meters"] == [behind]
    assert admin.registry.concentrator_rejections(dcu)["rejected"] == []
    with pytest.raises(errors.NotFound):
        admin.registry.set_meter_route(direct, f"dcu-none-{n}")
    with pytest.raises(errors.Conflict):  # still carries a meter
        admin.registry.remove_concentrator(dcu)
    admin.registry.set_meter_route(behind, None)
    assert admin.registry.remove_concentrator(dcu)["removed"] is True


def test_billing_finds_its_meters_page_by_page(stack: EmbeddedStack) -> None:
    admin = _client(stack, "admin")
    prefix = f"page-{next(_ids)}"
    ids = [f"{prefix}-{i:03d}" for i in range(300)]  # past Redis's small-set encoding: SSCAN really pages
    assert admin.registry.provision_bulk([{"meter_id": m} for m in ids])["created"] == 300
    billing = _client(stack, "billing").registry
    pages = 0

    def counting(cursor: int | str | None = None, count: int = 100) -> dict[str, Any]:
        nonlocal pages
        pages += 1
        return Registry.list_meters(billing, cursor=cursor, count=count)

    billing.list_meters = counting  # type: ignore[method-assign]
    seen = [m for m in billing.iter_meters(count=50) if m.startswith(prefix)]
    assert sorted(seen) == ids
    assert pages > 1
    with pytest.raises(errors.Forbidden):
        billing.get_meter(ids[0])  # the listing only


def test_mdms_batch_intervals_pagination_and_load_profile(stack: EmbeddedStack) -> None:
    meter = f"mdms-{next(_ids)}"
    start = (int(time.time()) // 86_400 - 1) * 86_400
    readings = [{"meter_id": meter, "seq": i, "ts": start + i * 900, "import": 100 + i * 0.25, "power": 1000.0}
                for i in range(40)]
    head_end = _client(stack, "mdms")
    assert head_end.mdms_ingest.upload_batch(readings)["accepted"] == 40
    billing = _client(stack, "billing").mdms
    rows = list(billing.iter_intervals(meter, start, start + 40 * 900, limit=7))
    assert [r["seq"] for r in rows] == list(range(40))
    profile = billing.load_profile(meter, start, start + 39 * 900, interval="1h")
    assert profile["count"] == 9
    assert profile["intervals"][0]["import_kwh"] == pytest.approx(1.0)
    assert profile["intervals"][0]["quality"] == "valid"
    text = billing.load_profile_csv(meter, start, start + 4 * 900)
    assert text.splitlines()[0].startswith("meter_id,start,end,import_kwh")
    bill = billing.bill(meter, start, start + 39 * 900)
    assert bill["bill"]["currency"] == "EUR"
    assert head_end.archive.plan()["policy"]


def test_system_routes_and_openapi(stack: EmbeddedStack) -> None:
    c = _client(stack, "admin")
    names = {f["name"] for f in c.system("edge").functions()}
    assert {"edge-read", "edge-registry"} <= names
    assert c.system("fog").healthy()
    doc = c.system("fog").openapi()
    assert "/function/fog-mdms-query/meters/{meter_id}/load-profile" in doc["paths"]
    with pytest.raises(errors.ApiError, match="basic-auth"):
        Client(edge=stack.url("edge")).system("edge").functions()


def test_revoked_token_is_refused_by_the_gateway_naming_the_reason(stack: EmbeddedStack) -> None:
    admin = _client(stack, "admin")
    meter = f"rev-{next(_ids)}"
    admin.registry.provision(meter)
    token = auth.issue_token("billing-app", {"billing"}, key=stack.signing_key)
    billing = admin.with_token(token)
    assert meter in list(billing.registry.iter_meters())
    principal = auth.verify_token(token, stack.signing_key)
    r = redis.Redis.from_url(stack.redis["edge"].url, decode_responses=True)
    revocation.revoke(r, principal.token_id or "", expires_at=principal.expires_at, reason="contract ended")
    r.close()

    def refused() -> errors.Unauthorized | None:
        try:
            billing.registry.list_meters()
        except errors.Unauthorized as exc:
            return exc
        return None

    err = wait_until(refused, 10, "the gateway's functions to refuse the revoked token")
    assert err.status == 401
    assert "revoked: contract ended" in err.message
    assert err.details["reason"] == "contract ended"


# --- retries: a tiny real server that answers 429/503 first ----------------------------------------------------
class _Flaky(http.server.BaseHTTPRequestHandler):
    script: list[tuple[int, dict[str, str]]] = []
    seen: list[str] = []

    def _answer(self) -> None:
        self.seen.append(self.command)
        status, headers = self.script.pop(0) if self.script else (200, {})
        body = b'{"ok": true}' if status == 200 else b'{"error": "backend_unavailable", "message": "busy"}'
        self.send_response(status)
        for k, v in {"Content-Type": "application/json", **headers}.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self._answer()

    def do_POST(self) -> None:
        self._answer()

    def log_message(self, *_args: Any) -> None:
        return


@pytest.fixture
def flaky() -> Iterator[tuple[str, type[_Flaky]]]:
    port = free_port()
    _Flaky.script, _Flaky.seen = [], []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Flaky)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}", _Flaky
    server.shutdown()
    server.server_close()


def test_retries_honour_retry_after_then_succeed(flaky: tuple[str, type[_Flaky]]) -> None:
    url, server = flaky
    server.script = [(429, {"Retry-After": "2"}), (503, {}), (503, {"Retry-After": "0"})]
    delays: list[float] = []
    t = Transport(url, "tok", retries=4, backoff_s=0.05, sleep=delays.append)
    assert t.call("edge-read", "POST", "/x", json={}) == {"ok": True}  # POSTs too: 429/503 were not processed
    assert server.seen == ["POST"] * 4
    assert delays[0] == 2.0
    assert 0.025 <= delays[1] <= 0.2  # no Retry-After: exponential back-off with jitter
    assert delays[2] == 0.0


def test_retries_give_up_with_a_typed_error(flaky: tuple[str, type[_Flaky]]) -> None:
    url, server = flaky
    server.script = [(503, {"Retry-After": "60"})] * 3
    delays: list[float] = []
    t = Transport(url, None, retries=2, max_backoff_s=5, sleep=delays.append)
    with pytest.raises(errors.Unavailable, match="busy") as err:
        t.call("fog-mdms-query", "GET", "/tariffs")
    assert err.value.status == 503
    assert delays == [5.0, 5.0]  # Retry-After is honoured up to the cap


def test_connection_refused_is_unavailable() -> None:
    t = Transport(f"http://127.0.0.1:{free_port()}", None, retries=1, sleep=lambda _s: None)
    with pytest.raises(errors.Unavailable) as err:
        t.call("edge-read", "GET", "/meters/x/twin")
    assert err.value.status == 0


def test_retry_after_http_date() -> None:
    import email.utils

    import httpx

    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    resp = httpx.Response(429, headers={"Retry-After": when})
    assert 25 <= (retry_after_s(resp) or 0) <= 31
    assert retry_after_s(httpx.Response(429, headers={"Retry-After": "soon"})) is None


@pytest.mark.parametrize("zone", ["edge", "fog", "cloud"])
def test_each_zone_openapi_document_validates(stack: EmbeddedStack, zone: str) -> None:
    """What docs/api.md tells integrators to feed to a generator must be a valid OpenAPI document."""
    validator = pytest.importorskip("openapi_spec_validator")
    doc = _client(stack, "admin").system(zone).openapi()
    validator.validate(doc)
    assert any(p.startswith(f"/function/{zone}-") for p in doc["paths"])
