"""Issue 10, items 1 and 2: no route trusts a header, and async callbacks cannot reach inside.

Through the real local gateway (``python -m gateway``) where it matters: a connector header
alone gets 401, the service token works; an ``X-Callback-Url`` on loopback, link-local,
private or metadata ranges gets a 400 naming it unless the allow-list names it; a name whose
second resolution (at connect time) points at loopback is never called. And
``/system/functions`` shows no credential (item 10).
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.app import create_app
from gateway.server import GatewayProcess
from gateway.system import redact_environment
from metertwin.core import destinations
from metertwin.core.auth import issue_token
from metertwin.core.destinations import DestinationPolicy, DestinationRefused
from storage.embedded import Mosquitto, MotoS3
from tests.conftest import TEST_SIGNING_KEY
from tests.fixtures.gateway_support import (
    PASSWORD,
    STACK,
    CallbackReceiver,
    gateway_client,
    saved_environ,
    write_basic_auth,
)
from tests.waiting import await_until, wait_until

ROOT = Path(__file__).resolve().parents[2]
PUBLIC_ADDRESS = "93.184.215.14"  # a global unicast address (never connected to: the rebinding test swaps it)


def bearer(*scopes: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {issue_token('t', set(scopes), key=TEST_SIGNING_KEY)}"}


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    rx = CallbackReceiver()
    yield rx
    rx.close()


# --- the policy itself ---------------------------------------------------------------------------
@pytest.mark.parametrize("address", [
    "127.0.0.1", "127.8.9.10", "::1", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "::", "fd00:ec2::254", "fe80::1", "::ffff:127.0.0.1", "224.0.0.1", "2002:7f00:1::", "64:ff9b::7f00:1",
    "192.0.2.10", "198.18.0.1",
])
def test_non_public_addresses_are_refused(address: str) -> None:
    assert DestinationPolicy().address_refusal(address) is not None
    # An IPv4-mapped IPv6 address is judged (and allowed) as the IPv4 address it is.
    allowed_range = "127.0.0.1/32" if address.startswith("::ffff:") else address
    allowed = DestinationPolicy(allowed_networks=(ipaddress.ip_network(allowed_range),))
    assert allowed.address_refusal(address) is None


def test_urls_are_checked_by_scheme_host_and_every_address() -> None:
    policy = DestinationPolicy(resolver=lambda host, port: [PUBLIC_ADDRESS])
    assert policy.check_url("https://ems.example.com/hook").host == "ems.example.com"
    for url, needle in [("ftp://ems.example.com/x", "scheme 'ftp'"), ("http:///x", "no host"),
                        ("http://127.0.0.1:9/x", "127.0.0.1"), ("http://[::1]/x", "::1"),
                        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
                        ("http://2130706433/x", "127.0.0.1")]:  # a decimal IPv4 literal is resolved like any name
        policy = DestinationPolicy(resolver=destinations.system_resolver)
        with pytest.raises(DestinationRefused) as err:
            policy.check_url(url)
        assert needle in err.value.message, err.value.message
        assert url in err.value.message, err.value.message
    # One refused address among several refuses the name: a client may connect to any of them.
    mixed = DestinationPolicy(resolver=lambda host, port: [PUBLIC_ADDRESS, "10.0.0.7"])
    with pytest.raises(DestinationRefused, match=r"10\.0\.0\.7"):
        mixed.check_url("https://ems.example.com/")
    only = DestinationPolicy(hosts=("*.example.com",), resolver=lambda host, port: [PUBLIC_ADDRESS])
    only.check_url("https://a.b.example.com/")
    with pytest.raises(DestinationRefused, match="destination_allowed_hosts"):
        only.check_url("https://example.org/")


def test_redirects_are_not_followed_and_answers_are_bounded() -> None:
    hits: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            hits.append(self.path)
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path == "/redirect":
                self.send_response(307)
                self.send_header("Location", "/target")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", str(1_000_000))
            self.end_headers()
            self.wfile.write(b"x" * 1_000_000)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    policy = DestinationPolicy(allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),),
                               max_response_bytes=1000, timeout_s=5)
    try:
        with destinations.guarded_client(policy) as client:
            status, _ = destinations.post(client, policy, f"{base}/redirect", content=b"{}", headers={})
            assert (status, hits) == (307, ["/redirect"])
            status, body = destinations.post(client, policy, f"{base}/big", content=b"{}", headers={})
            assert (status, len(body)) == (200, 1000)
        with destinations.guarded_client(DestinationPolicy()) as client, pytest.raises(DestinationRefused):
            client.post(f"{base}/big", content=b"{}")  # the transport refuses loopback by itself
    finally:
        server.shutdown()
        server.server_close()


def test_an_answer_trickled_byte_by_byte_is_cut_at_the_deadline() -> None:
    """Each read within ``timeout_s`` is not enough: 1 byte every 0.2 s of a 50-byte body held an
    EMS webhook send for 10 s (measured 100 s with 100 bytes on the embedded stack)."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            self.send_response(200)
            self.send_header("Content-Length", "50")
            self.end_headers()
            for _ in range(50):
                try:
                    self.wfile.write(b"x")
                    self.wfile.flush()
                except OSError:
                    return
                time.sleep(0.2)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    policy = DestinationPolicy(allowed_networks=(ipaddress.ip_network("127.0.0.1/32"),), timeout_s=0.5)
    try:
        with destinations.guarded_client(policy) as client:
            started = time.monotonic()
            with pytest.raises(httpx.ReadTimeout):
                destinations.post(client, policy, f"http://127.0.0.1:{server.server_address[1]}/", content=b"{}",
                                  headers={})
            assert time.monotonic() - started < 3 * policy.timeout_s
    finally:
        server.shutdown()
        server.server_close()


# --- X-Callback-Url through the real gateway ----------------------------------------------------
def test_loopback_callback_is_refused_by_default_and_allowed_by_the_list(
    env: dict[str, str], receiver: CallbackReceiver, tmp_path: Path
) -> None:
    secrets = write_basic_auth(env)
    with GatewayProcess(STACK, "edge", secrets_dir=secrets, env={"DESTINATION_ALLOWED_CIDRS": ""},
                        args=["--log-level", "warning"], log_path=tmp_path / "default.log") as gw:
        for url in (receiver.url, receiver.url.replace("127.0.0.1", "localhost"),
                    "http://169.254.169.254/latest/meta-data/", "http://[fd00:ec2::254]/latest",
                    "http://10.0.0.1/hook", "file:///etc/passwd"):
            resp = httpx.post(f"{gw.url}/async-function/edge-echo", headers={"X-Callback-Url": url}, timeout=10)
            assert resp.status_code == 400, (url, resp.text)
            assert resp.json()["error"] == "destination_refused"
            assert url in resp.json()["message"]
    assert receiver.calls == []
    with GatewayProcess(STACK, "edge", secrets_dir=secrets, env={"DESTINATION_ALLOWED_CIDRS": "127.0.0.1/32"},
                        args=["--log-level", "warning"], log_path=tmp_path / "allowed.log") as gw:
        resp = httpx.post(f"{gw.url}/async-function/edge-echo", headers={"X-Callback-Url": receiver.url},
                          timeout=10)
        assert resp.status_code == 202, resp.text
        call_id = resp.headers["x-call-id"]
        wait_until(lambda: call_id in receiver.call_ids(), 15, "the allowed callback")


async def test_name_rebound_to_loopback_is_not_called(env: dict[str, str], receiver: CallbackReceiver,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The name passes at submit time (public address), then resolves to 127.0.0.1 when the callback connects."""
    write_basic_auth(env)
    monkeypatch.delenv("DESTINATION_ALLOWED_CIDRS", raising=False)
    answers = iter([[PUBLIC_ADDRESS]])

    def rebinding(host: str, port: int) -> list[str]:
        assert host == "localhost"
        return next(answers, None) or destinations.system_resolver(host, port)

    async with gateway_client("edge") as (app, client):
        assert app.queue is not None
        app.queue.policy.resolver = rebinding
        url = receiver.url.replace("127.0.0.1", "localhost")
        resp = await client.post("/async-function/edge-echo", headers={"X-Callback-Url": url})
        assert resp.status_code == 202, resp.text

        async def refused() -> bool:
            return app.queue is not None and app.queue.stats()["callbacks_refused"] == 1

        await await_until(refused, 10, "the callback refused at connect time")
        assert app.queue.processed == 1  # the entry is acknowledged, not retried
        status = await client.get("/system/info", auth=("admin", PASSWORD))
        assert status.json()["connectors"]["async"]["callbacks_refused"] == 1
    assert receiver.calls == []


# --- connector-triggered routes take the service token, never a header ----------------------------
def test_connector_header_is_no_credential(
    env: dict[str, str], mosquitto: Mosquitto, s3_server: MotoS3, redis_url: str, tmp_path: Path
) -> None:
    zone_env = {"CLOUD_REDIS_URL": redis_url, "FOG_REDIS_URL": redis_url, "CLOUD_MQTT_HOST": mosquitto.host,
                "CLOUD_MQTT_PORT": str(mosquitto.port), "S3_ENDPOINT_URL": s3_server.url,
                "MQTT_USERNAME": mosquitto.service_user}
    cron = {"X-Connector": "cron-connector"}
    with GatewayProcess(ROOT / "stack.yml", "cloud", secrets_dir=env["SECRETS_DIR"], env=zone_env,
                        args=["--no-background", "--log-level", "warning"], log_path=tmp_path / "gw.log") as gw:
        fn = f"{gw.url}/function/cloud-mdms-archive/"
        assert httpx.post(fn, headers=cron, timeout=10).status_code == 401
        assert httpx.post(fn, headers={**cron, **bearer("billing")}, timeout=10).status_code == 403
        resp = httpx.post(fn, headers={**cron, **bearer("service")}, timeout=30)
        assert resp.status_code == 200, resp.text
        assert resp.json()["status"] in ("ok", "skipped")
        # The async path authenticates like the function's router, before anything is queued.
        queued = f"{gw.url}/async-function/cloud-mdms-archive/"
        resp = httpx.post(queued, headers=cron, timeout=10)
        assert resp.status_code == 401, resp.text
        assert httpx.post(queued, headers={**cron, **bearer("billing")}, timeout=10).status_code == 403
        assert httpx.post(queued, headers=bearer("service"), timeout=10).status_code == 202


# --- /system/functions shows no credentials --------------------------------------------------------
async def test_system_functions_redacts_credentials(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    write_basic_auth(env)
    monkeypatch.setenv("REDIS_URL", "redis://twin:hunter2@127.0.0.1:1/0?password=hunter3")
    monkeypatch.setenv("ECHO_GREETING", "hello")
    with saved_environ():
        app = create_app(STACK, "edge")
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            resp = await client.get("/system/functions", auth=("admin", PASSWORD))
            one = await client.get("/system/function/edge-echo", auth=("admin", PASSWORD))
    assert resp.status_code == 200
    assert "hunter" not in resp.text
    assert "hunter" not in one.text
    env_vars = one.json()["envVars"]
    assert env_vars["REDIS_URL"] == "redis://[redacted]@127.0.0.1:1/0?password=[redacted]"
    assert env_vars["ECHO_GREETING"] == "hello"
    assert redact_environment({"S3_SECRET_ACCESS_KEY": "x", "API_TOKEN": "y", "MQTT_PASSWORD": "z"}) == {
        "S3_SECRET_ACCESS_KEY": "[redacted]", "API_TOKEN": "[redacted]", "MQTT_PASSWORD": "[redacted]"}


async def test_async_call_to_no_route_needs_a_valid_token(env: dict[str, str], receiver: CallbackReceiver,
                                                           mosquitto: Mosquitto, redis_url: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A path or method no route serves used to be queued without any token (the router answers
    404/405 before it looks at the token), and the gateway then POSTed that answer to the
    caller's callback URL: an anonymous caller could still make the gateway call out."""
    write_basic_auth(env)
    for name, value in {"DESTINATION_ALLOWED_CIDRS": "127.0.0.1/32", "EDGE_REDIS_URL": redis_url,
                        "EDGE_MQTT_HOST": mosquitto.host, "EDGE_MQTT_PORT": str(mosquitto.port)}.items():
        monkeypatch.setenv(name, value)
    async with gateway_client("edge", stack=ROOT / "stack.yml") as (_app, client):
        hook = {"X-Callback-Url": receiver.url}
        for path in ("/async-function/edge-registry/nonexistent", "/async-function/edge-read/meters/m-1/nope",
                     "/async-function/edge-registry/", "/async-function/edge-read/meters/NOT%20AN%20ID/twin"):
            for headers in (hook, {**hook, "Authorization": "Bearer garbage"},
                            {**hook, "X-Connector": "cron-connector"}):
                resp = await client.post(path, headers=headers, content=b"{}")
                assert resp.status_code == 401, (path, headers, resp.text)
        resp = await client.post("/async-function/edge-registry/nonexistent", headers={**hook, **bearer("billing")},
                                 content=b"{}")
        assert resp.status_code == 202, resp.text  # authenticated: the 404 comes back in the callback
        call_id = resp.headers["x-call-id"]

        async def called_back() -> bool:
            return call_id in receiver.call_ids()

        await await_until(called_back, 15, "the authenticated callback")
    assert receiver.call_ids() == {call_id}


def test_redaction_hides_every_credential_shape() -> None:
    """Found by the outside probe: a password holding '@' (redis-py reads up to the last '@') left its
    tail visible, a second host's credentials in a cluster URL were shown, and secret-like names
    beyond PASSWORD/SECRET/TOKEN/KEY (MQTT_PASS, REDIS_PWD, REDIS_AUTH, a DSN) were not recognised."""
    out = redact_environment({
        "REDIS_URL": "redis://twin:hunt@er2@127.0.0.1:1/0",
        "FOG_REDIS_URL": "redis+cluster://u:pw1@h1:1,u:pw2@h2:2/0",
        "MQTT_PASS": "s1", "REDIS_PWD": "s2", "REDIS_AUTH": "s3", "PG_DSN": "host=x password=hunter9",
        "CALLBACK": "https://h/x?a=1&api_key=k9#frag", "BANNER": "hello",
    })
    text = repr(out)
    for secret in ("er2", "pw1", "pw2", "s1", "s2", "s3", "hunter9", "k9"):
        assert secret not in text, (secret, out)
    assert out["REDIS_URL"].endswith("@127.0.0.1:1/0")
    assert out["BANNER"] == "hello"
