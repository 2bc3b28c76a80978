"""``python -m metertwin.tokens``: issue, inspect and revoke bearer tokens of one zone.

The signing key is read exactly as the functions read it (:mod:`metertwin.core.settings`):
the file ``token-signing-key`` in ``SECRETS_DIR`` (``/var/openfaas/secrets`` by default),
else the ``TOKEN_SIGNING_KEY`` environment variable. Revocations go to the zone's Redis
(``REDIS_URL``); name ``--redis-url`` once per zone to revoke everywhere a token reaches.
After ``make demo``, ``source .run/demo.env`` sets all of these. Examples::

    python -m metertwin.tokens issue --scope billing --subject billing-app --ttl 86400
    python -m metertwin.tokens issue --scope consumer --meter demo-0003
    python -m metertwin.tokens inspect "$TOKEN"
    python -m metertwin.tokens revoke "$TOKEN" --reason "laptop lost" \\
        --redis-url "$EDGE_REDIS_URL" --redis-url "$FOG_REDIS_URL" --redis-url "$CLOUD_REDIS_URL"

A thin CLI: the logic is :mod:`metertwin.core.auth` and :mod:`metertwin.core.revocation`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import UTC, datetime
from typing import Any

import redis

from metertwin.core import auth, clients, revocation
from metertwin.core.errors import MeterTwinError
from metertwin.core.settings import get_settings, reset_settings


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _redis_clients(urls: list[str] | None) -> list[tuple[str, Any]]:
    s = get_settings()
    return [(url, clients.redis_cluster(url, timeout_s=s.redis_timeout_s, max_connections=4)
             or redis.Redis.from_url(url, socket_timeout=s.redis_timeout_s, socket_connect_timeout=s.redis_timeout_s,
                                     decode_responses=True))
            for url in (urls or [s.redis_url])]


def _describe(principal: auth.Principal) -> dict[str, Any]:
    return {
        "subject": principal.subject, "scopes": sorted(principal.scopes), "meter": principal.meter,
        "jti": principal.token_id, "expires_at": _iso(principal.expires_at),
        "remaining_s": max(0, int(principal.expires_at - time.time())),
    }


def cmd_issue(args: argparse.Namespace) -> int:
    if args.ttl <= 0:
        raise SystemExit(f"tokens: --ttl {args.ttl} must be a positive number of seconds")
    try:
        token = auth.issue_token(args.subject, set(args.scope), meter=args.meter, ttl_s=args.ttl)
    except ValueError as exc:
        raise SystemExit(f"tokens: {exc}") from None
    if args.json:
        print(json.dumps({"token": token, **_describe(auth.verify_token(token))}, indent=2))
    else:
        print(token)
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    principal = auth.verify_token(args.token)
    out = _describe(principal)
    if not args.offline and principal.token_id:
        out["revoked"] = {}
        for url, client in _redis_clients(args.redis_url):
            try:
                out["revoked"][url] = revocation.revocation_reason(client, principal.token_id, cache_s=0)
            except MeterTwinError as exc:
                out["revoked"][url] = f"unknown ({exc.message})"
    print(json.dumps(out, indent=2))
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    if args.token:
        principal = auth.verify_token(args.token)
        if principal.token_id is None:
            raise SystemExit("tokens: this token has no jti; it cannot be revoked alone (rotate token-signing-key)")
        token_id, expires_at = principal.token_id, principal.expires_at
    elif args.jti and args.expires_at:
        token_id, expires_at = args.jti, float(args.expires_at)
    else:
        raise SystemExit("tokens: revoke needs a TOKEN, or --jti with --expires-at (epoch s)")
    for url, client in _redis_clients(args.redis_url):
        try:
            done = revocation.revoke(client, token_id, expires_at=expires_at, reason=args.reason)
        except redis.RedisError as exc:
            raise SystemExit(f"tokens: cannot reach Redis at {url}: {exc}") from None
        print(f"{'revoked' if done else 'already expired'}: {token_id} in {url} "
              f"(until {_iso(expires_at)}; reason: {args.reason})")
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m metertwin.tokens", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--secrets-dir", help="folder holding token-signing-key (default: $SECRETS_DIR)")
    sub = p.add_subparsers(dest="command", required=True)

    issue = sub.add_parser("issue", help="mint a token; prints it")
    issue.add_argument("--scope", action="append", required=True, choices=sorted(auth.SCOPES),
                       help="repeat for several scopes")
    issue.add_argument("--meter", help="the one meter a consumer or ems token reaches")
    issue.add_argument("--subject", default="cli", help="who the token is for (sub claim)")
    issue.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    issue.add_argument("--json", action="store_true", help="print the token with its claims as JSON")
    issue.set_defaults(fn=cmd_issue)

    inspect = sub.add_parser("inspect", help="verify a token and show its claims and revocation state")
    inspect.add_argument("token")
    inspect.add_argument("--redis-url", action="append", help="zone Redis to check (repeatable; default $REDIS_URL)")
    inspect.add_argument("--offline", action="store_true", help="do not look at the deny-list")
    inspect.set_defaults(fn=cmd_inspect)

    revoke = sub.add_parser("revoke", help="deny a token until it expires")
    revoke.add_argument("token", nargs="?")
    revoke.add_argument("--jti", help="token id, when the token itself is not at hand")
    revoke.add_argument("--expires-at", help="with --jti: the token's exp (epoch seconds)")
    revoke.add_argument("--reason", default="revoked by operator", help="shown in the 401 answer")
    revoke.add_argument("--redis-url", action="append", help="zone Redis to write (repeatable; default $REDIS_URL)")
    revoke.set_defaults(fn=cmd_revoke)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.secrets_dir:
        os.environ["SECRETS_DIR"] = args.secrets_dir
        reset_settings()
    try:
        return int(args.fn(args))
    except MeterTwinError as exc:
        print(f"tokens: {exc.message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
