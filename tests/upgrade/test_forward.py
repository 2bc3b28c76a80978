"""Calls forwarded to a meter's bound release (``metertwin.upgrade.binding.serve``/``forward``), served
through the python3-http template stand-in, so that an exception leaving ``handle`` would show
as the template's HTML 500 rather than the local gateway's JSON.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from metertwin.core.auth import issue_token
from metertwin.core.errors import BackendUnavailable
from metertwin.upgrade import binding
from storage.embedded import free_port
from tests.conftest import TEST_SIGNING_KEY
from tests.invoke import load_handler
from tests.python3_http import create_app
from tests.upgrade.upgrade_fixtures import ingest, twins

__all__ = ["twins"]  # a fixture: imported for pytest


def _read_v2(meter: str, query: str = "") -> tuple[int, str, dict[str, object] | None]:
    """GET the v2 reading of ``meter`` the way the template serves it: (status, content type, JSON body)."""
    token = issue_token("t", {"utility"}, key=TEST_SIGNING_KEY)
    app = create_app(load_handler("read-v2"))
    resp = app.test_client().get(f"/meters/{meter}/reading{query}", headers={"Authorization": f"Bearer {token}"})
    return resp.status_code, resp.content_type, resp.get_json(silent=True)


def test_forward_to_an_unreachable_peer_answers_the_json_error(
    twins: Callable[[int], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    (meter,) = twins(1)  # bound to v1: edge-read-v2 forwards the call to edge-read
    ingest("v1", meter, 1)
    monkeypatch.setenv("GATEWAY_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    status, content_type, body = _read_v2(meter)
    assert status == 503
    assert content_type.startswith("application/json")
    assert body is not None
    assert body["error"] == BackendUnavailable.code
    assert "forwarding to edge-read failed" in str(body["message"])


def test_forward_without_a_free_slot_answers_the_json_error(
    twins: Callable[[int], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    (meter,) = twins(1)
    monkeypatch.setenv("GATEWAY_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("BINDING_FORWARD_SLACK_S", "0")
    slots = binding._slots()
    taken = 0
    while slots.acquire(blocking=False):  # every forwarding slot busy, as under a burst of forwards
        taken += 1
    try:
        status, content_type, body = _read_v2(meter, "?timeout=0.05")
    finally:
        for _ in range(taken):
            slots.release()
    assert status == 503
    assert content_type.startswith("application/json")
    assert body is not None
    assert body["error"] == BackendUnavailable.code
    assert "no forwarding slot free" in str(body["message"])


def test_a_bug_in_the_forward_answers_a_json_500(
    twins: Callable[[int], list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    (meter,) = twins(1)
    monkeypatch.setenv("GATEWAY_URL", f"http://127.0.0.1:{free_port()}")
    calls: list[str] = []

    def broken(*args: object, **kwargs: object) -> object:
        calls.append("get_http")
        raise RuntimeError("a bug in the forward path")

    monkeypatch.setattr(binding, "get_http", broken)
    status, content_type, body = _read_v2(meter)
    assert calls
    assert status == 500
    assert content_type.startswith("application/json")
    assert body == {"error": "internal_error", "message": "internal error; see function logs"}
