"""``python -m gateway --stack stack.yml --zone edge --port 8080``: serve one zone's functions."""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys

import uvicorn

from gateway import access_log
from gateway.app import GatewayOptions, create_app
from gateway.server import uvicorn_config
from metertwin.core.errors import MeterTwinError

#: First words of the line announcing the address (GatewayProcess reads it with --port 0).
LISTENING = "gateway listening on"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = GatewayOptions()
    p = argparse.ArgumentParser(prog="python -m gateway", description="Local OpenFaaS-compatible gateway of one zone.")
    p.add_argument("--stack", required=True, help="path of stack.yml")
    p.add_argument("--zone", required=True, help="serve functions named <zone>-*; 'all' serves every function")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080, help="0: any free port (announced on stderr)")
    p.add_argument("--secrets-dir", help="folder of secret files (becomes SECRETS_DIR; /var/openfaas/secrets)")
    p.add_argument("--workers", type=int, default=1, help="uvicorn worker processes (each with its own pool)")
    p.add_argument("--threads", type=int, default=defaults.max_threads, help="handler threads per worker")
    p.add_argument("--exec-timeout", type=float, default=defaults.exec_timeout_s,
                   help="seconds before a call is answered 504 (its handler thread runs on)")
    p.add_argument("--instance", help="stable worker name for the async queue and MQTT session "
                   "(default <host>-<zone>-<port>; with --workers > 1 the pid is appended)")
    p.add_argument("--claim-idle", type=float, default=defaults.claim_idle_s,
                   help="take over async calls left pending by another worker this many seconds")
    p.add_argument("--async-concurrency", type=int, default=defaults.async_concurrency,
                   help="async calls run at once per worker")
    p.add_argument("--mqtt-concurrency", type=int, default=defaults.mqtt_concurrency,
                   help="MQTT messages in flight per worker (the session's Receive Maximum)")
    p.add_argument("--mqtt-no-share", action="store_true",
                   help="subscribe plainly instead of in the zone's shared group: only for a zone served by "
                   "one worker; survives broker restarts (Mosquitto 2.0 does not restore shared subscriptions)")
    p.add_argument("--no-background", action="store_true",
                   help="serve HTTP only: no async worker, MQTT or cron connectors")
    p.add_argument("--log-level", default="info")
    p.add_argument("--access-log-format", choices=access_log.FORMATS, default=defaults.access_log_format,
                   help="one line per function call: json (default) or text key=value")
    p.add_argument("--access-log-level", choices=access_log.LEVELS, default=defaults.access_log_level,
                   help="info: every call; warning: 4xx and 5xx; error: 5xx; off: no access log")
    p.add_argument("--ready-timeout", type=float, default=defaults.ready_timeout_s,
                   help="seconds each /readyz probe (Redis, broker, S3) may take")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = {"access_log_format": args.access_log_format, "access_log_level": args.access_log_level,
               "ready_timeout_s": args.ready_timeout,
               "max_threads": args.threads, "claim_idle_s": args.claim_idle, "background": not args.no_background,
               "async_concurrency": args.async_concurrency,
               "mqtt_concurrency": args.mqtt_concurrency, "exec_timeout_s": args.exec_timeout,
               "mqtt_shared": not args.mqtt_no_share}
    try:
        if args.workers > 1:
            if args.port == 0:
                print("gateway: --port 0 needs --workers 1", file=sys.stderr)
                return 2
            if args.mqtt_no_share:
                print("gateway: --mqtt-no-share needs --workers 1 (every worker would get every message)",
                      file=sys.stderr)
                return 2
            instance = args.instance or f"{socket.gethostname()}-{args.zone}-{args.port}"
            # Each worker process builds its own app through the factory; names must differ per worker.
            os.environ["GATEWAY_STACK"] = args.stack
            os.environ["GATEWAY_ZONE"] = args.zone
            os.environ["GATEWAY_SECRETS_DIR"] = args.secrets_dir or ""
            os.environ["GATEWAY_OPTIONS"] = json.dumps(options)
            os.environ["GATEWAY_INSTANCE_PREFIX"] = instance
            # Fail fast on stack errors before forking workers.
            create_app(args.stack, args.zone, secrets_dir=args.secrets_dir, **options).executor.shutdown(wait=False)
            access_log.configure()
            uvicorn.run(
                "gateway.app:app_from_env", factory=True, host=args.host, port=args.port, workers=args.workers,
                loop="uvloop", http="httptools", access_log=False, log_level=args.log_level,
                timeout_graceful_shutdown=10,
            )
            return 0
        # Bind here (port 0: the kernel picks a free one, no race) and hand the socket to uvicorn.
        try:
            sock = socket.create_server((args.host, args.port))
        except OSError as exc:
            print(f"gateway: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
            return 1
        port = sock.getsockname()[1]
        instance = args.instance or f"{socket.gethostname()}-{args.zone}-{port}"
        app = create_app(args.stack, args.zone, secrets_dir=args.secrets_dir, instance=instance, **options)
    except MeterTwinError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    print(f"{LISTENING} http://{args.host}:{port} zone={args.zone} pid={os.getpid()}", file=sys.stderr, flush=True)
    access_log.configure()
    uvicorn.Server(uvicorn_config(app, args.host, port, log_level=args.log_level)).run(sockets=[sock])
    return 0


if __name__ == "__main__":
    sys.exit(main())
