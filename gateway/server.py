"""Start a gateway on a free port, in a thread or as a real process, and stop it (tests, demo).

In a thread (same process, so the zone's environment lands in this process)::

    with run_in_thread("stack.yml", "edge", secrets_dir=d) as gw:
        httpx.get(f"{gw.url}/function/edge-read/...")

As a process (``python -m gateway``; what a restart test kills)::

    with GatewayProcess("stack.yml", "edge", secrets_dir=d) as gw:
        ...
        gw.kill()        # SIGKILL, no graceful shutdown
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Self

import httpx
import uvicorn

from gateway.app import GatewayApp, create_app
from storage.embedded import ServiceError, private_log

_LISTENING_RE = re.compile(r"gateway listening on http://\S+:(\d+) ")


def uvicorn_config(app: Any, host: str, port: int, **kwargs: Any) -> uvicorn.Config:
    """The one way gateways (and the hello-world baseline) are served: uvloop, httptools, no access log."""
    return uvicorn.Config(
        app, host=host, port=port, loop="uvloop", http="httptools", access_log=False, lifespan="on",
        log_level=kwargs.pop("log_level", "warning"), timeout_graceful_shutdown=10, **kwargs,
    )


class ThreadedGateway:
    """A uvicorn server running one :class:`GatewayApp` on its own event loop in a thread."""

    def __init__(self, app: GatewayApp, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.app = app
        self.host = host
        # Bound here (port 0: any free port) and handed to uvicorn, so no other process can take it first.
        self._sock = socket.create_server((host, port or 0))
        self.port = int(self._sock.getsockname()[1])
        self.server = uvicorn.Server(uvicorn_config(app, host, self.port))
        self._thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._sock]},
                                        name=f"gateway-{app.zone}", daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout_s: float = 20.0) -> Self:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self._thread.is_alive():
                raise ServiceError(f"gateway {self.app.zone} on port {self.port} failed to start (see log)")
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceError(f"gateway {self.app.zone} did not start within {timeout_s} s")
            time.sleep(0.01)
        return self

    def stop(self, timeout_s: float = 20.0) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        self._sock.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_in_thread(
    stack_path: str | Path,
    zone: str,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    secrets_dir: str | Path | None = None,
    **options: Any,
) -> ThreadedGateway:
    """Create the zone's gateway (see :func:`gateway.app.create_app`) and serve it; returns once it listens."""
    app = create_app(stack_path, zone, secrets_dir=secrets_dir, **options)
    return ThreadedGateway(app, host, port).start()


class GatewayProcess:
    """``python -m gateway`` as a child process on a free port; waits until ``/healthz`` answers."""

    def __init__(
        self,
        stack_path: str | Path,
        zone: str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        secrets_dir: str | Path | None = None,
        env: dict[str, str] | None = None,
        args: list[str] | None = None,
        log_path: str | Path | None = None,
        start_timeout_s: float = 30.0,
    ) -> None:
        self.host = host
        self._own_log = log_path is None
        if log_path is None:
            fd, name = tempfile.mkstemp(prefix=f"gateway-{zone}-", suffix=".log")
            os.close(fd)
            log_path = name
        self.log_path = Path(log_path)
        # Without a port the child binds port 0 itself and announces the port: no free-port race.
        self.port = port or 0
        argv = [sys.executable, "-m", "gateway", "--stack", str(stack_path), "--zone", zone,
                "--host", host, "--port", str(self.port)]
        if secrets_dir is not None:
            argv += ["--secrets-dir", str(secrets_dir)]
        argv += args or []
        self._log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
        with private_log(self.log_path) as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                start_new_session=True, cwd=Path(__file__).resolve().parent.parent,
            )
        self._wait_ready(start_timeout_s)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"gateway exited with {self.proc.returncode}:\n{self.log_text()[-3000:]}")
            if not self.port:
                found = _LISTENING_RE.search(self.log_text()[self._log_start:])
                if found is None:
                    time.sleep(0.02)
                    continue
                self.port = int(found.group(1))
            with contextlib.suppress(httpx.HTTPError):
                resp = httpx.get(f"{self.url}/healthz", timeout=1.0)
                # The pid header tells our child from whoever else might hold this port.
                if resp.status_code == 200 and resp.headers.get("x-gateway-pid") == str(self.proc.pid):
                    return
            time.sleep(0.05)
        self.kill()
        raise ServiceError(f"gateway did not answer /healthz within {timeout_s} s:\n{self.log_text()[-3000:]}")

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGTERM (graceful: drains in-flight calls), SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        """SIGKILL: the crash case (no shutdown code runs)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if self._own_log and exc[0] is None:  # keep the log when the block failed
            self.log_path.unlink(missing_ok=True)


async def serve(app: GatewayApp, host: str, port: int) -> None:
    """Serve ``app`` on the running event loop until cancelled (for asyncio programs such as the demo)."""
    server = uvicorn.Server(uvicorn_config(app, host, port))
    try:
        await server.serve()
    except asyncio.CancelledError:
        server.should_exit = True
        raise
