"""The token deny-list: ``jti`` claims, revocation in Redis with the token's remaining life, the 401 answer."""

from __future__ import annotations

import time

import pytest

from metertwin.core import auth, clients, keys, revocation
from metertwin.core.errors import BackendUnavailable, Unauthorized
from metertwin.core.settings import reset_settings
from tests.invoke import call, load_handler
from tests.waiting import wait_until


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    revocation.forget()


def test_every_token_has_its_own_id(env: dict[str, str]) -> None:
    a, b = auth.issue_token("x", {"utility"}), auth.issue_token("x", {"utility"})
    ids = {auth.verify_token(a).token_id, auth.verify_token(b).token_id}
    assert len(ids) == 2
    assert None not in ids


def test_revocation_lives_as_long_as_the_token(env: dict[str, str]) -> None:
    token = auth.issue_token("ops", {"utility"}, ttl_s=120)
    p = auth.verify_token(token)
    r = clients.get_redis()
    assert revocation.revoke(r, p.token_id or "", expires_at=p.expires_at, reason="lost laptop")
    ttl = r.ttl(keys.revoked_token(p.token_id or ""))
    assert 110 <= ttl <= 122
    assert not revocation.revoke(r, "old", expires_at=time.time() - 5)
    assert r.exists(keys.revoked_token("old")) == 0


def test_revoked_token_is_refused_naming_the_reason(env: dict[str, str]) -> None:
    token = auth.issue_token("ops", {"utility"})
    assert auth.authenticate(f"Bearer {token}").subject == "ops"
    p = auth.verify_token(token)
    revocation.revoke(clients.get_redis(), p.token_id or "", expires_at=p.expires_at, reason="key leaked")
    with pytest.raises(Unauthorized, match=r"was revoked: key leaked") as err:
        wait_until(lambda: auth.authenticate(f"Bearer {token}") and False, 5, "revocation to take effect")
    assert err.value.details["reason"] == "key leaked"
    revocation.unrevoke(clients.get_redis(), p.token_id or "")
    assert auth.authenticate(f"Bearer {token}").subject == "ops"


def test_cache_zero_asks_redis_every_call(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOKEN_REVOCATION_CACHE_S", "0")
    reset_settings()
    token = auth.issue_token("ops", {"utility"})
    auth.authenticate(f"Bearer {token}")
    p = auth.verify_token(token)
    clients.get_redis().set(keys.revoked_token(p.token_id or ""), "at once", ex=60)
    with pytest.raises(Unauthorized, match="at once"):
        auth.authenticate(f"Bearer {token}")


def test_unreadable_deny_list_fails_closed(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    from storage.embedded import free_port

    monkeypatch.setenv("REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    monkeypatch.setenv("REDIS_TIMEOUT_S", "0.5")
    clients.close_all()
    reset_settings()
    token = auth.issue_token("ops", {"utility"})
    with pytest.raises(BackendUnavailable, match="deny-list"):
        auth.authenticate(f"Bearer {token}")


def test_tokens_without_an_id_still_verify(env: dict[str, str]) -> None:
    import jwt

    from metertwin.core.settings import get_settings

    legacy = jwt.encode({"sub": "old", "scope": "utility", "exp": int(time.time()) + 60},
                        get_settings().token_signing_key.get_secret_value(), algorithm="HS256")
    assert auth.authenticate(f"Bearer {legacy}").token_id is None


def test_revoked_token_gets_401_from_a_function_and_billing_lists_meters(env: dict[str, str]) -> None:
    """End to end: the registry function lists meters for billing; after ``tokens revoke`` it answers 401."""
    from metertwin.tokens import main

    registry = load_handler("registry")
    admin = auth.issue_token("ops", {"admin"})
    status, _ = call(registry, "POST", "/meters", body={"meter_id": "bill-1"}, token=admin)
    assert status == 201
    billing = auth.issue_token("billing-app", {"billing"})
    status, body = call(registry, "GET", "/meters", token=billing)
    assert status == 200
    assert "bill-1" in body["meters"]
    status, body = call(registry, "GET", "/meters/bill-1", token=billing)
    assert status == 403  # the listing only: details and changes stay with operators
    assert main(["revoke", billing, "--reason", "contract ended", "--redis-url", env["REDIS_URL"]]) == 0

    def refused() -> tuple[int, dict[str, str]] | None:
        got = call(registry, "GET", "/meters", token=billing)
        return got if got[0] == 401 else None

    status, body = wait_until(refused, 5, "the revoked token to be refused")
    assert body["error"] == "unauthorized"
    assert "revoked: contract ended" in body["message"]
    assert body["details"]["reason"] == "contract ended"


def test_redis_errors_are_not_swallowed_by_the_cli(env: dict[str, str]) -> None:
    from metertwin.tokens import main
    from storage.embedded import free_port

    token = auth.issue_token("ops", {"utility"})
    with pytest.raises(SystemExit, match="cannot reach Redis"):
        main(["revoke", token, "--redis-url", f"redis://127.0.0.1:{free_port()}/0"])
