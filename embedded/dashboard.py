"""The demo's dashboard: ``python -m metertwin.stream`` beside the embedded stack (edge zone's events).

Started as a child on a free port with the edge Redis, the stack's secrets (to verify tokens) and
``STREAM_GATEWAY_URLS`` naming the stack's gateways, so every dashboard page has its REST data.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from embedded.stack import EmbeddedStack
from storage.embedded import free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[1]


class Dashboard:
    def __init__(self, stack: EmbeddedStack) -> None:
        self.stack = stack
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Dashboard:
        gateways = ",".join(f"{zone}={self.stack.url(zone)}" for zone in self.stack.ports)
        env = {**os.environ, "ZONE": "edge", "REDIS_URL": self.stack.redis["edge"].url,
               "SECRETS_DIR": str(self.stack.secrets_dir), "STREAM_GATEWAY_URLS": gateways}
        log = open(self.stack.data_dir / "stream.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen([sys.executable, "-m", "metertwin.stream", "--port", str(self.port),
                                      "--log-level", "warning"], cwd=ROOT, env=env, stdout=log, stderr=log)
        wait_for_port(self.port, proc=self.proc)
        return self

    def login_line(self) -> str:
        """The URL to open, with a utility token that logs the page in."""
        token = self.stack.token("utility", subject="dashboard")
        return f"dashboard: {self.url}/#token={token}\n  (token, utility scope: {token})"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
