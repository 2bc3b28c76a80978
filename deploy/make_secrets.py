"""``make secrets ZONE=edge|fog|cloud``: random values for every secret one zone needs.

Writes one file per secret (the value alone, no newline) under ``deploy/k8s/<zone>/.secrets/``
(directory mode 0700, files 0600), where the zone's kustomize overlay reads them
(``secretGenerator``; kustomize only reads files inside the overlay's folder). Values are never
printed; only the file names are.

What a zone gets:

* every secret its functions list in stack.yml (``secrets:`` of the ``<zone>-*`` functions);
* its infrastructure's own: the broker's dynamic-security admin (``mqtt-admin-password``), the
  edge broker's read-only ``fog-bridge`` account that the fog broker bridges readings with
  (``mqtt-bridge-password``, edge and fog), and the VEN bridge's ``service`` JWT
  (``dr-bridge-token``, edge; HS256, signed with ``token-signing-key``, one year).

Idempotent: an existing file is kept (delete it to rotate). Values every zone must agree on
(``token-signing-key``, the S3 keys, ``mqtt-bridge-password``) are copied from another zone's
folder when one already has them, so generating the zones in any order gives matching values.
Standard library only: runs before ``make setup``.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import secrets
import string
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ZONES = ("edge", "fog", "cloud")

#: Secrets of the zone's infrastructure, besides those its functions name in stack.yml.
INFRA = {
    "edge": ["mqtt-admin-password", "mqtt-bridge-password", "dr-bridge-token"],
    "fog": ["mqtt-admin-password", "mqtt-bridge-password"],
    "cloud": [],
}
#: Values shared by every zone that has them.
SHARED = {"token-signing-key", "s3-access-key-id", "s3-secret-access-key", "mqtt-bridge-password"}

TOKEN_TTL_S = 365 * 86_400
#: Re-mint the VEN bridge's token when it expires sooner than this.
TOKEN_RENEW_S = 30 * 86_400

_FUNCTION = re.compile(r"^  ([A-Za-z0-9][A-Za-z0-9_-]*):\s*(#.*)?$")
_SECRETS_FLOW = re.compile(r"^    secrets:\s*\[(.*)\]\s*(#.*)?$")
_SECRETS_BLOCK = re.compile(r"^    secrets:\s*(#.*)?$")
_ITEM = re.compile(r"^      -\s*([^\s#]+)")


def function_secrets(stack_text: str, zone: str) -> list[str]:
    """Secret names the ``<zone>-*`` functions of stack.yml list, in first-seen order.

    A line-based reader for stack.yml's layout (two-space function keys under ``functions:``,
    ``secrets: [a, b]`` or a block list), so that this runs without PyYAML.
    """
    names: list[str] = []
    in_functions = False
    current: str | None = None
    block = False
    for line in stack_text.splitlines():
        if re.match(r"^\S", line):
            in_functions = line.startswith("functions:")
            current = None
            block = False
            continue
        if not in_functions:
            continue
        if m := _FUNCTION.match(line):
            current, block = m.group(1), False
            continue
        if current is None or not current.startswith(f"{zone}-"):
            continue
        if m := _SECRETS_FLOW.match(line):
            names += [s.strip().strip("'\"") for s in m.group(1).split(",") if s.strip()]
            block = False
        elif _SECRETS_BLOCK.match(line):
            block = True
        elif block and (m := _ITEM.match(line)):
            names.append(m.group(1).strip("'\""))
        elif block and line.strip() and not line.strip().startswith("#"):
            block = False
    seen: dict[str, None] = dict.fromkeys(names)
    return list(seen)


def zone_secrets(stack_text: str, zone: str) -> list[str]:
    return list(dict.fromkeys(function_secrets(stack_text, zone) + INFRA[zone]))


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint_service_token(key: str, subject: str, *, now: float | None = None, ttl_s: int = TOKEN_TTL_S) -> str:
    """An HS256 JWT with the ``service`` scope, as metertwin.auth expects (``sub``, ``scope``, ``exp``)."""
    issued = int(now if now is not None else time.time())
    header = _b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    claims = {"sub": subject, "scope": "service", "iat": issued, "exp": issued + ttl_s}
    payload = _b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = _b64url(hmac.new(key.encode(), signing_input, hashlib.sha256).digest())
    return f"{header}.{payload}.{signature}"


def token_is_current(token: str, key: str, *, now: float | None = None) -> bool:
    """Signed with ``key`` and not expiring within TOKEN_RENEW_S."""
    try:
        header, payload, signature = token.split(".")
        expected = _b64url(hmac.new(key.encode(), f"{header}.{payload}".encode(), hashlib.sha256).digest())
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, json.JSONDecodeError):
        return False
    moment = now if now is not None else time.time()
    return hmac.compare_digest(signature, expected) and float(claims.get("exp", 0)) > moment + TOKEN_RENEW_S


def random_value(name: str) -> str:
    if name == "s3-access-key-id":
        # AWS-style access key id (20 upper-case letters and digits); MinIO's root user.
        alphabet = string.ascii_uppercase + string.digits
        return "MT" + "".join(secrets.choice(alphabet) for _ in range(18))
    if name == "s3-secret-access-key":
        return secrets.token_urlsafe(30)  # 40 characters
    if name == "token-signing-key":
        return secrets.token_urlsafe(48)  # 384 bits for HS256
    return secrets.token_urlsafe(32)


def write_private(path: Path, value: str) -> None:
    """Write ``value`` to ``path`` with mode 0600 from the first byte (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        return None


def make_secrets(zone: str, *, stack: Path, k8s_root: Path) -> list[tuple[str, str]]:
    """Create the zone's missing secret files; returns (name, what happened) per secret."""
    if zone not in ZONES:
        raise SystemExit(f"ZONE must be one of {', '.join(ZONES)} (got {zone!r})")
    out = k8s_root / zone / ".secrets"
    out.mkdir(parents=True, exist_ok=True)
    out.chmod(0o700)
    report: list[tuple[str, str]] = []
    names = zone_secrets(stack.read_text(), zone)
    # The signing key first: the VEN bridge's token is minted with it.
    names.sort(key=lambda n: (n == "dr-bridge-token", n != "token-signing-key"))
    for name in names:
        path = out / name
        current = _read(path)
        if name == "dr-bridge-token":
            key = _read(out / "token-signing-key")
            if key is None:
                raise SystemExit("token-signing-key is missing; cannot mint dr-bridge-token")
            if current is not None and token_is_current(current, key):
                report.append((name, "kept"))
            else:
                write_private(path, mint_service_token(key, f"dr-bridge-{zone}"))
                report.append((name, "minted" if current is None else "re-minted"))
            continue
        if current is not None:
            path.chmod(0o600)
            report.append((name, "kept"))
            continue
        value, origin = None, "generated"
        if name in SHARED:
            for other in ZONES:
                if other != zone and (value := _read(k8s_root / other / ".secrets" / name)) is not None:
                    origin = f"copied from {other}"
                    break
        write_private(path, value or random_value(name))
        report.append((name, origin))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deploy/make_secrets.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--zone", required=True, choices=ZONES)
    p.add_argument("--stack", type=Path, default=ROOT / "stack.yml")
    p.add_argument("--k8s-root", type=Path, default=ROOT / "deploy" / "k8s",
                   help="folder holding the zone overlays (default deploy/k8s)")
    args = p.parse_args(argv)
    report = make_secrets(args.zone, stack=args.stack, k8s_root=args.k8s_root)
    out = args.k8s_root / args.zone / ".secrets"
    try:
        shown = out.relative_to(Path.cwd())
    except ValueError:
        shown = out
    print(f"secrets of zone {args.zone} in {shown}/ (mode 0600; values not shown):")
    for name, what in report:
        print(f"  {name:<22} {what}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
