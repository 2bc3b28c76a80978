"""Bearer tokens with scopes (JWT, HS256, signed with the ``token-signing-key`` secret).

Claims: ``sub`` (who), ``scope`` (space-separated scopes, as OAuth 2 writes them),
``meter`` (the one meter a consumer or home-EMS token is bound to), ``exp``, ``iat`` and
``jti`` (the token's id, which :mod:`metertwin.core.revocation` deny-lists).
``admin`` (operators) and ``service`` (platform components) reach everything.
Operators mint, inspect and revoke tokens with ``python -m metertwin.tokens``.
"""

from __future__ import annotations

import functools
import os
import secrets
import time
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import jwt

from metertwin.core import clients, revocation
from metertwin.core.errors import Forbidden, Unauthorized
from metertwin.core.settings import get_settings

#: ``service`` is for platform components (connectors, VEN bridge, cron, peer functions).
SCOPES: Final = frozenset({"utility", "mdms", "billing", "ems", "consumer", "admin", "service"})
#: Scopes whose tokens must name the one meter they may reach.
METER_BOUND_SCOPES: Final = frozenset({"consumer", "ems"})
ALGORITHM: Final = "HS256"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling, as established by a verified token."""

    subject: str
    scopes: frozenset[str]
    meter: str | None
    expires_at: float
    #: The token's ``jti`` (``None`` for tokens minted before ids existed: not revocable one by one).
    token_id: str | None = None

    def allows_meter(self, meter_id: str) -> bool:
        return self.meter is None or self.meter == meter_id


class CallerSlot:
    """Where :func:`authenticate` leaves the caller it verified (``principal``; ``None``: none yet)."""

    __slots__ = ("principal",)

    def __init__(self) -> None:
        self.principal: Principal | None = None


#: The local gateway puts a fresh :class:`CallerSlot` here before a handler runs and reads it
#: afterwards for its access log, so the subject and scopes logged are the verified ones and the
#: token is never parsed twice. A slot (not the principal itself) so that tasks the handler runs
#: in (``asyncio.wait_for`` copies the context) fill the caller's slot. Unset on OpenFaaS.
CALLER: ContextVar[CallerSlot | None] = ContextVar("metertwin_caller", default=None)


def issue_token(
    subject: str,
    scopes: set[str] | frozenset[str],
    *,
    meter: str | None = None,
    ttl_s: int = 3600,
    key: str | None = None,
) -> str:
    """Sign a token (used by the operator CLI, the demo and tests)."""
    unknown = set(scopes) - SCOPES
    if unknown:
        raise ValueError(f"unknown scope(s) {sorted(unknown)}; known: {sorted(SCOPES)}")
    if set(scopes) & METER_BOUND_SCOPES and not meter:
        raise ValueError(f"scope(s) {sorted(set(scopes) & METER_BOUND_SCOPES)} need a meter")
    now = int(time.time())
    claims: dict[str, object] = {
        "sub": subject,
        "scope": " ".join(sorted(scopes)),
        "iat": now,
        "exp": now + ttl_s,
        "jti": secrets.token_hex(12),
    }
    if meter:
        claims["meter"] = meter
    return jwt.encode(claims, key or _signing_key(), algorithm=ALGORITHM)


def operator_token(token: str | None, signing_key_file: str | None, subject: str, scopes: set[str],
                   ttl_s: int = 12 * 3600) -> str | None:
    """The bearer token an operator CLI calls with: ``token``, else ``METERTWIN_TOKEN``, else one issued
    for ``subject``/``scopes`` with the zone's key read from ``signing_key_file``; None if none of them."""
    if token:
        return token
    if os.environ.get("METERTWIN_TOKEN"):
        return os.environ["METERTWIN_TOKEN"]
    if signing_key_file:
        return issue_token(subject, scopes, key=Path(signing_key_file).read_text().strip(), ttl_s=ttl_s)
    return None


def _signing_key() -> str:
    key = get_settings().token_signing_key.get_secret_value()
    if not key:
        raise Unauthorized("token verification is not configured (secret token-signing-key is empty)")
    return key


@functools.lru_cache(maxsize=4096)
def _decode(token: str, key: str) -> Principal:
    # Cached because signature checks dominate a cached read; expiry is rechecked per call.
    try:
        claims = jwt.decode(token, key, algorithms=[ALGORITHM], options={"require": ["exp", "sub"]})
    except jwt.ExpiredSignatureError as exc:
        raise Unauthorized("bearer token has expired") from exc
    except jwt.InvalidTokenError as exc:
        raise Unauthorized(f"bearer token is invalid: {exc}") from exc
    scopes = frozenset(str(claims.get("scope", "")).split())
    if not scopes or not scopes <= SCOPES:
        raise Unauthorized(f"bearer token has unknown scopes {sorted(scopes - SCOPES)}")
    meter = claims.get("meter")
    if scopes & METER_BOUND_SCOPES and not scopes & {"admin"} and not meter:
        raise Unauthorized("bearer token with a meter-bound scope names no meter")
    jti = claims.get("jti")
    return Principal(str(claims["sub"]), scopes, str(meter) if meter else None, float(claims["exp"]),
                     str(jti) if jti else None)


def verify_token(token: str, key: str | None = None) -> Principal:
    """Verify a bare token's signature, expiry and claims (not the deny-list)."""
    principal = _decode(token.strip(), key or _signing_key())
    if principal.expires_at < time.time():
        _decode.cache_clear()
        raise Unauthorized("bearer token has expired")
    return principal


def authenticate(authorization: str | None) -> Principal:
    """Verify an ``Authorization: Bearer <token>`` header value."""
    if not authorization:
        raise Unauthorized("missing Authorization header (expected 'Bearer <token>')")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized(f"Authorization scheme {scheme!r} is not 'Bearer'")
    principal = verify_token(token)
    if principal.token_id is not None:
        reason = revocation.revocation_reason(clients.get_redis(), principal.token_id,
                                              cache_s=get_settings().token_revocation_cache_s)
        if reason is not None:
            raise Unauthorized(f"bearer token {principal.token_id} was revoked: {reason}", reason=reason)
    slot = CALLER.get()
    if slot is not None:
        slot.principal = principal
    return principal


def authorize(principal: Principal, allowed: frozenset[str], meter_id: str | None = None) -> None:
    """Raise :class:`Forbidden` unless ``principal`` may act here."""
    if principal.scopes & {"admin", "service"}:
        return
    if not principal.scopes & allowed:
        raise Forbidden(
            f"scopes {sorted(principal.scopes)} do not include any of {sorted(allowed)}"
        )
    if meter_id is not None and not principal.allows_meter(meter_id):
        raise Forbidden(f"token for meter {principal.meter!r} does not reach meter {meter_id!r}")
    if meter_id is None and principal.meter is not None and principal.scopes <= METER_BOUND_SCOPES:
        raise Forbidden("a meter-bound token cannot reach a route that spans meters")
