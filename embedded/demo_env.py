"""What ``make demo`` hands a newcomer: every address and credential of the running stack, printed and in
``.run/demo.env`` (a shell file: ``source .run/demo.env``). Passwords stay in their secret files: the file
names where they are, never the values. Tokens are short-lived bearer tokens for this demo only."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_PATH = ROOT / ".run" / "demo.env"
GATEWAY_USER = "admin"


def values(stack: Any, *, admin_token: str, billing_token: str) -> dict[str, str]:
    """The variables, in the order they are printed."""
    assert stack.broker is not None
    out: dict[str, str] = {}
    for zone in stack.gateways:
        out[f"{zone.upper()}_GATEWAY_URL"] = stack.url(zone)
    out["MQTT_HOST"] = stack.broker.host
    out["MQTT_PORT"] = str(stack.broker.port)
    out["GATEWAY_USER"] = GATEWAY_USER
    out["GATEWAY_PASSWORD_FILE"] = str(stack.secrets_dir / "gateway-basic-auth-password")
    out["ADMIN_TOKEN"] = admin_token
    out["BILLING_TOKEN"] = billing_token
    out["SECRETS_DIR"] = str(stack.secrets_dir)
    out["LOGS_DIR"] = str(stack.dir)
    for zone, server in stack.redis.items():
        out[f"{zone.upper()}_REDIS_URL"] = server.url
    # For `python -m metertwin.tokens` (reads SECRETS_DIR and REDIS_URL as an edge function does).
    out["REDIS_URL"] = stack.redis["edge"].url
    return out


def write(env: dict[str, str], path: Path = DEFAULT_PATH) -> Path:
    """Write ``env`` as a sourceable shell file, readable by its owner only (it holds tokens)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["# metertwin demo: valid while `make demo` runs. Use: source .run/demo.env",
             "# Passwords are not here: $GATEWAY_PASSWORD_FILE holds the /system basic-auth password."]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text("\n".join(lines) + "\n")
    return path


def describe(env: dict[str, str], path: Path) -> str:
    """The lines the demo prints (tokens shortened: the full ones are in the file)."""
    rows = []
    for k, v in env.items():
        shown = f"{v[:24]}... (full value in the file)" if k.endswith("_TOKEN") else v
        rows.append(f"  {k:<22} {shown}")
    return "\n".join([f"credentials and addresses (source {path}):", *rows,
                      "  try: curl -H \"Authorization: Bearer $BILLING_TOKEN\" "
                      "\"$EDGE_GATEWAY_URL/function/edge-registry/meters\"",
                      "       curl -u \"$GATEWAY_USER:$(cat $GATEWAY_PASSWORD_FILE)\" "
                      "\"$EDGE_GATEWAY_URL/system/functions\"",
                      "       python -m metertwin.tokens issue --scope consumer --meter demo-0001"])
