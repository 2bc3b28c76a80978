"""``python -m embedded.zone --zone edge --port 8080``: one zone's gateway on a fresh clone, ready to call.

``python -m gateway`` alone needs the zone's services and secrets to exist already (else every
function route answers 401 "not configured" while ``/healthz`` says OK). This starts what it
needs — Mosquitto with dynamic security, the zones' Redis, moto S3 for the fog and cloud zones,
a secrets folder laid out as OpenFaaS mounts it — then the zone's ``python -m gateway`` on the
given port, and writes ``.run/zone-<zone>.env`` (mode 0600: the gateway URL, an admin token, the
basic-auth user and password file, the secrets, logs and Redis) for ``source``. It runs until
Ctrl-C or SIGTERM and stops everything it started.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from embedded import demo_env
from embedded.stack import ZONES, EmbeddedStack

ROOT = Path(__file__).resolve().parent.parent


def env_values(stack: EmbeddedStack, zone: str) -> dict[str, str]:
    """What ``.run/zone-<zone>.env`` exports."""
    assert stack.broker is not None
    return {
        "GATEWAY_URL": stack.url(zone),
        f"{zone.upper()}_GATEWAY_URL": stack.url(zone),
        "ADMIN_TOKEN": stack.token("admin", subject="local-admin"),
        "GATEWAY_USER": demo_env.GATEWAY_USER,
        "GATEWAY_PASSWORD_FILE": str(stack.secrets_dir / "gateway-basic-auth-password"),
        "SECRETS_DIR": str(stack.secrets_dir),
        "LOGS_DIR": str(stack.dir),
        "MQTT_HOST": stack.broker.host,
        "MQTT_PORT": str(stack.broker.port),
        "REDIS_URL": stack.redis[zone].url,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m embedded.zone", description=__doc__.splitlines()[0])
    p.add_argument("--zone", choices=ZONES, default="edge")
    p.add_argument("--port", type=int, default=8080, help="the gateway's port (0: any free port)")
    p.add_argument("--env-file", type=Path, help="default .run/zone-<zone>.env")
    args = p.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    env_file = args.env_file or ROOT / ".run" / f"zone-{args.zone}.env"
    ports = {args.zone: args.port} if args.port else {}
    try:
        stack = EmbeddedStack(zones=(args.zone,), with_s3=args.zone != "edge", fixed_ports=ports).start()
    except Exception as exc:
        print(f"embedded.zone: cannot start the {args.zone} zone: {exc}", file=sys.stderr)
        return 1
    try:
        values = env_values(stack, args.zone)
        demo_env.write(values, env_file)
        example = ('  curl -H "Authorization: Bearer $ADMIN_TOKEN" "$GATEWAY_URL/function/edge-registry/meters"\n'
                   if args.zone == "edge" else "")
        print(f"{args.zone} gateway on {values['GATEWAY_URL']} (its log: {stack.dir}/gateway-{args.zone}.log)\n"
              f"  source {env_file}\n{example}"
              '  curl "$GATEWAY_URL/readyz"\nCtrl-C stops it.', flush=True)
        stop.wait()
    finally:
        stack.stop()
        env_file.unlink(missing_ok=True)
    print("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
