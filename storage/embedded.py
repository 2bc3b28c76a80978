"""Embedded data services for local runs and tests: real processes on free loopback ports.

* :class:`RedisServer`: ``redis-server`` with no persistence (a zone's hot store).
* :class:`Mosquitto`: ``mosquitto`` with the dynamic-security plugin; an admin
  account for the twin services, per-meter accounts created by the registry.
* :class:`MotoS3`: moto's S3 server, the embedded default S3 endpoint (MinIO or
  AWS in production).

Each is a context manager; ``stop()`` terminates the process and removes its
temporary directory. Readiness is awaited by polling the port, with a deadline.
"""

from __future__ import annotations

import contextlib
import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Self


class ServiceError(RuntimeError):
    """An embedded service failed to start or stop."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, *, proc: subprocess.Popen[bytes] | None = None, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise ServiceError(f"process {proc.args!r} exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise ServiceError(f"nothing listened on 127.0.0.1:{port} within {timeout_s} s")


class _Process:
    name = "service"

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix=f"metertwin-{self.name}-"))
        self.proc: subprocess.Popen[bytes] | None = None

    def _spawn(self, argv: list[str], env: dict[str, str] | None = None) -> None:
        binary = shutil.which(argv[0]) or argv[0]
        if not Path(binary).exists():
            raise ServiceError(f"{argv[0]} is not installed; run `make setup`")
        log = open(self.dir / f"{self.name}.log", "wb")  # noqa: SIM115 - kept open for the child
        self.proc = subprocess.Popen(
            [binary, *argv[1:]], stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        log.close()
        wait_for_port(self.port, proc=self.proc)

    def log_text(self) -> str:
        path = self.dir / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: Zone Redis setting (set it in production too): keeps each twin hash in listpack encoding.
HASH_MAX_LISTPACK_VALUE = 1024


class RedisServer(_Process):
    name = "redis"

    def __init__(self, *, maxmemory_mb: int | None = None) -> None:
        super().__init__()
        argv = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.dir), "--protected-mode", "yes",
            # Twin hashes hold JSON values of 100-300 bytes; above 64 bytes (the default)
            # Redis abandons the compact listpack encoding and a twin takes ~1 KB instead of ~0.5 KB.
            "--hash-max-listpack-value", str(HASH_MAX_LISTPACK_VALUE),
        ]
        if maxmemory_mb:
            argv += ["--maxmemory", f"{maxmemory_mb}mb", "--maxmemory-policy", "noeviction"]
        self._spawn(argv)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


class Mosquitto(_Process):
    """Mosquitto 2 with dynamic security.

    ``admin_user`` administers the plugin only; ``service_user`` is the twin
    services' account: every topic, plus the right to administer dynamic security
    (the registry creates the meters' accounts with it).
    """

    name = "mosquitto"
    admin_user = "dynsec-admin"
    service_user = "twin-service"

    def __init__(self, *, max_queued_messages: int = 10_000) -> None:
        super().__init__()
        self.admin_password = os.urandom(12).hex()
        self.service_password = os.urandom(12).hex()
        dynsec = self.dir / "dynamic-security.json"
        subprocess.run(
            ["mosquitto_ctrl", "dynsec", "init", str(dynsec), self.admin_user, self.admin_password],
            check=True, capture_output=True, timeout=10,
        )
        plugin = _dynsec_plugin()
        conf = self.dir / "mosquitto.conf"
        conf.write_text(
            "\n".join([
                "per_listener_settings false",
                # Started as root, mosquitto would switch to user 'mosquitto', who cannot
                # read our private temporary directory; keep the invoking user instead.
                f"user {getpass.getuser()}",
                f"listener {self.port} 127.0.0.1",
                "allow_anonymous false",
                f"plugin {plugin}",
                f"plugin_opt_config_file {dynsec}",
                f"max_queued_messages {max_queued_messages}",
                "max_inflight_messages 1000",
                "persistence false",
                # Request/response over MQTT is latency-bound: without this, Nagle's algorithm
                # and delayed ACKs add ~40 ms to a live read.
                "set_tcp_nodelay true",
                "",
            ])
        )
        self._spawn(["mosquitto", "-c", str(conf)])
        self._bootstrap_roles()

    def ctrl(self, *args: str) -> str:
        """Run one ``mosquitto_ctrl dynsec`` command as the admin account."""
        argv = ["mosquitto_ctrl", "-h", "127.0.0.1", "-p", str(self.port), "-u", self.admin_user,
                "-P", self.admin_password, "dynsec", *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        if done.returncode != 0 or "Error" in done.stdout:
            raise ServiceError(f"mosquitto_ctrl dynsec {' '.join(args)} failed: {done.stdout}{done.stderr}")
        return done.stdout

    def _bootstrap_roles(self) -> None:
        # The twin services' account may use every topic; meters get roles of their own
        # from the registry (metertwin.twin.dynsec), confined to meters/<id>/.
        self.ctrl("createRole", "twin-service")
        for acltype in ("publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern"):
            self.ctrl("addRoleACL", "twin-service", acltype, "#", "allow")
        self.ctrl("createClient", self.service_user, "-p", self.service_password)
        self.ctrl("addClientRole", self.service_user, "twin-service")
        self.ctrl("addClientRole", self.service_user, "admin")

    @property
    def host(self) -> str:
        return "127.0.0.1"


def _dynsec_plugin() -> str:
    for candidate in (
        "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
        "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
        "/usr/lib/mosquitto_dynamic_security.so",
    ):
        if Path(candidate).exists():
            return candidate
    found = sorted(Path("/usr/lib").rglob("mosquitto_dynamic_security.so"))
    if not found:
        raise ServiceError("mosquitto_dynamic_security.so not found; install mosquitto 2.x (`make setup`)")
    return str(found[0])


class MotoS3(_Process):
    name = "moto"

    def __init__(self) -> None:
        super().__init__()
        moto = str(Path(sys.executable).with_name("moto_server"))
        self._spawn([moto, "-H", "127.0.0.1", "-p", str(self.port)])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


__all__ = ["Mosquitto", "MotoS3", "RedisServer", "ServiceError", "free_port", "wait_for_port"]
