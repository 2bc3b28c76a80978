"""The key prefix every capability's keys start with; each capability owns its own keys module."""

from __future__ import annotations

PREFIX = "mt"


def revoked_token(token_id: str) -> str:
    """String: the reason a token (its JWT ``jti``) was revoked; expires with the token (TTL = its remaining life)."""
    return f"{PREFIX}:auth:revoked:{token_id}"
