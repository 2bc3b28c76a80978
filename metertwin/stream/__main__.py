"""``python -m metertwin.stream``: the zone's SSE streaming service under uvicorn."""

from __future__ import annotations

import argparse
import logging

import uvicorn

from metertwin.stream.service import create_app


def main(argv: list[str] | None = None) -> None:
    """Parse the command line and serve until stopped."""
    parser = argparse.ArgumentParser(prog="python -m metertwin.stream", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    # One process per zone: the hub's fan-out is in-process; run more replicas for more clients.
    uvicorn.run(create_app(), host=args.host, port=args.port, log_level=args.log_level, lifespan="on",
                access_log=False, timeout_graceful_shutdown=5)


if __name__ == "__main__":
    main()
