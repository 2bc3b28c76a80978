"""``python -m dr_bridge --vtn-url ... --gateway ... --meters-file ... --shard 0/1``: run one bridge shard.

The meters file lists meter ids, one per line (``#`` comments allowed); this process
hosts the VENs of the meters whose stable hash falls into its shard. The ``service``
bearer token for the gateway comes from ``--token-file`` or ``DR_BRIDGE_TOKEN``; with
neither, one is minted from the ``token-signing-key`` secret (SECRETS_DIR).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from dr_bridge.bridge import Bridge, BridgeConfig
from dr_bridge.invoke import HttpInvoker
from dr_bridge.shard import in_shard, parse_shard

log = logging.getLogger("dr_bridge")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dr_bridge", description="OpenADR 2.0b VEN bridge for metertwin twins.")
    p.add_argument("--vtn-url", required=True, help="e.g. https://vtn.utility.example/OpenADR2/Simple/2.0b")
    p.add_argument("--gateway", required=True, help="zone gateway base URL, e.g. http://gateway.openfaas:8080")
    p.add_argument("--function", default="edge-dr-event", help="name of the dr-event function on the gateway")
    p.add_argument("--meters-file", required=True, help="meter ids, one per line")
    p.add_argument("--shard", default=os.environ.get("DR_BRIDGE_SHARD", "0/1"),
                   help="i/n: host the meters with hash %% n == i (default $DR_BRIDGE_SHARD or 0/1); "
                        "'ordinal/n' takes i from the StatefulSet pod name in $HOSTNAME")
    p.add_argument("--token-file", help="file holding the service bearer token (else $DR_BRIDGE_TOKEN)")
    # security
    p.add_argument("--cert", help="client certificate (PEM) for TLS and message signing")
    p.add_argument("--key", help="private key (PEM) of --cert; ECDSA P-256 recommended")
    p.add_argument("--passphrase-file", help="file holding the key's passphrase")
    p.add_argument("--ca-file", help="CA bundle (PEM) to verify the VTN's TLS certificate")
    p.add_argument("--vtn-fingerprint", help="fingerprint of the VTN's signing certificate (checked on TLS)")
    p.add_argument("--no-sign", action="store_true", help="send unsigned messages even with --cert/--key")
    p.add_argument("--no-check-hostname", action="store_true")
    # timing
    p.add_argument("--due-poll", type=float, default=0.5, help="seconds between POST /due calls")
    p.add_argument("--telemetry-refresh", type=float, default=5.0, help="seconds between telemetry refreshes")
    p.add_argument("--register-concurrency", type=int, default=50)
    p.add_argument("--register-jitter", type=float, default=10.0,
                   help="each VEN registers after a random delay within this many seconds (staggered fleet)")
    p.add_argument("--log-level", default="info")
    return p.parse_args(argv)


def resolve_shard(text: str) -> tuple[int, int]:
    if text.startswith("ordinal/"):
        host = os.environ.get("HOSTNAME", "")
        ordinal = host.rsplit("-", 1)[-1]
        if not ordinal.isdigit():
            raise ValueError(f"--shard ordinal/n needs a StatefulSet pod name ending in -<n>; HOSTNAME is {host!r}")
        text = f"{ordinal}/{text.split('/', 1)[1]}"
    return parse_shard(text)


def read_meters(path: str, index: int, shards: int) -> list[str]:
    ids = []
    for line in Path(path).read_text().splitlines():
        meter_id = line.split("#", 1)[0].strip()
        if meter_id and in_shard(meter_id, index, shards):
            ids.append(meter_id)
    return ids


def service_token(args: argparse.Namespace) -> str:
    if args.token_file:
        return Path(args.token_file).read_text().strip()
    if os.environ.get("DR_BRIDGE_TOKEN"):
        return os.environ["DR_BRIDGE_TOKEN"].strip()
    from metertwin.core.auth import issue_token

    return issue_token("dr-bridge", {"service"}, ttl_s=365 * 86400)


async def run(args: argparse.Namespace) -> int:
    index, shards = resolve_shard(args.shard)
    meters = read_meters(args.meters_file, index, shards)
    passphrase = Path(args.passphrase_file).read_text().strip() if args.passphrase_file else None
    config = BridgeConfig(
        vtn_url=args.vtn_url, cert=args.cert, key=args.key, passphrase=passphrase, ca_file=args.ca_file,
        vtn_fingerprint=args.vtn_fingerprint, sign=not args.no_sign, check_hostname=not args.no_check_hostname,
        due_poll_s=args.due_poll, telemetry_refresh_s=args.telemetry_refresh,
        register_concurrency=args.register_concurrency, register_jitter_s=args.register_jitter,
    )
    bridge = Bridge(meters, config, HttpInvoker(args.gateway, service_token(args), function=args.function))
    log.info("shard %d/%d: %d VENs for %s", index, shards, len(meters), args.vtn_url)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await bridge.start(wait=False)
    await stop.wait()
    log.info("stopping")
    await bridge.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return asyncio.run(run(args))
    except (ValueError, OSError) as exc:
        print(f"dr_bridge: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
