"""The token deny-list: revoked tokens (their JWT ``jti``) in the zone's Redis, checked on every call.

A revocation is one key per token, ``keys.revoked_token(jti)``, holding the reason and
expiring when the token itself would (its remaining life): the list never outgrows the
tokens still alive. Revoke in every zone the token reaches (each zone has its own Redis).

The check sits on the hot path of every authenticated call, so its answer is kept in a
process-local cache for ``TOKEN_REVOCATION_CACHE_S`` (default 1 s): a token seen in the
last second costs a dict lookup, otherwise one Redis ``GET``. A revocation therefore takes
effect within that time in every process. Tokens without a ``jti`` (minted before the
deny-list existed) cannot be revoked one by one; rotate the signing key for those.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis

from metertwin.core import keys
from metertwin.core.errors import BackendUnavailable, InvalidInput

#: Longest reason kept with a revocation (it is shown in the 401 answer).
MAX_REASON_CHARS = 200
#: Entries the process-local cache holds before it is emptied (bounded memory).
CACHE_MAX_ENTRIES = 65_536

_cache: dict[str, tuple[float, str | None]] = {}
_cache_lock = threading.Lock()


def revoke(client: Any, token_id: str, *, expires_at: float, reason: str = "revoked", now: float | None = None) -> bool:
    """Deny ``token_id`` until ``expires_at`` (epoch s). Returns ``False`` if the token had expired already."""
    if not token_id:
        raise InvalidInput("token has no jti: it cannot be revoked on its own (rotate the signing key)", field="jti")
    remaining = int(expires_at - (time.time() if now is None else now)) + 1
    if remaining <= 0:
        return False
    client.set(keys.revoked_token(token_id), (reason or "revoked")[:MAX_REASON_CHARS], ex=remaining)
    forget(token_id)
    return True


def unrevoke(client: Any, token_id: str) -> bool:
    """Lift a revocation (an operator's mistake); ``True`` if one was lifted."""
    forget(token_id)
    return bool(client.delete(keys.revoked_token(token_id)))


def revocation_reason(client: Any, token_id: str, *, cache_s: float) -> str | None:
    """Why ``token_id`` was revoked, or ``None`` if it was not (cached for ``cache_s`` seconds)."""
    now = time.monotonic()
    hit = _cache.get(token_id)
    if hit is not None and hit[0] > now:
        return hit[1]
    try:
        raw = client.get(keys.revoked_token(token_id))
    except redis.RedisError as exc:
        # Fail closed: a deny-list that cannot be read must not let a revoked token through.
        raise BackendUnavailable(f"token deny-list unavailable (Redis): {exc}") from exc
    reason = raw.decode() if isinstance(raw, bytes) else raw
    if cache_s > 0:
        with _cache_lock:
            if len(_cache) >= CACHE_MAX_ENTRIES:
                _cache.clear()
            _cache[token_id] = (now + cache_s, reason)
    return reason


def forget(token_id: str | None = None) -> None:
    """Drop the cached answer for ``token_id`` (or all of them)."""
    with _cache_lock:
        if token_id is None:
            _cache.clear()
        else:
            _cache.pop(token_id, None)
