"""Embedded data services for local runs and tests: real processes on loopback ports.

* :class:`RedisServer`: ``redis-server`` persisting to an append-only file (a zone's hot store).
* ``storage.redis_cluster.RedisCluster``: three (or more) such servers as one Redis Cluster.
* :class:`Mosquitto`: ``mosquitto`` with the dynamic-security plugin; an admin
  account for the twin services, per-meter accounts created by the registry.
* :class:`MotoS3`: moto's S3 server, the embedded default S3 endpoint (MinIO or
  AWS in production).

Each is a context manager; ``stop()`` terminates the process and removes its
temporary directory (a ``data_dir`` given by the caller is kept). ``kill()`` and
``restart()`` are the crash and recovery of the same service: same port, same data
directory, so what the service persisted is there again. Readiness is awaited by
polling the port, with a deadline. Children run with umask 077: their data files
(AOF, the dynamic-security JSON with password hashes, logs) are readable by this user only.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO, Self


class ServiceError(RuntimeError):
    """An embedded service failed to start or stop."""


def private_log(path: Path) -> BinaryIO:
    """``path`` opened for appending, mode 0600 (made by this process, so the children's umask 077 does not apply)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)  # a log left by an earlier run keeps its mode otherwise
    return os.fdopen(fd, "ab")


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

    def __init__(self, *, data_dir: str | Path | None = None, port: int | None = None) -> None:
        self.port = port or free_port()
        self._own_dir = data_dir is None
        if data_dir is None:
            self.dir = Path(tempfile.mkdtemp(prefix=f"metertwin-{self.name}-"))
        else:
            self.dir = Path(data_dir)
            self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self._argv: list[str] = []

    def _spawn(self, argv: list[str]) -> None:
        binary = shutil.which(argv[0]) or argv[0]
        if not Path(binary).exists():
            raise ServiceError(f"{argv[0]} is not installed; run `make setup`")
        self._argv = [binary, *argv[1:]]
        self.start()

    def start(self) -> None:
        """Start the process (again) with the same arguments, port and data directory."""
        if self.alive():
            return
        log = private_log(self.dir / f"{self.name}.log")
        self.proc = subprocess.Popen(
            self._argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, umask=0o077
        )
        log.close()
        wait_for_port(self.port, proc=self.proc)

    def alive(self) -> bool:
        """True while the process runs (a SIGSTOPped process counts as running)."""
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: the crash case, no shutdown code runs; the data directory is kept."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def terminate(self) -> None:
        """SIGTERM (SIGKILL after 10 s); the data directory is kept."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, *, crash: bool = False) -> None:
        """Stop (``crash``: SIGKILL, else SIGTERM) and start again on the same port and data directory."""
        if crash:
            self.kill()
        else:
            self.terminate()
        self.start()

    def log_text(self) -> str:
        path = self.dir / f"{self.name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGCONT)  # a paused process could not act on SIGTERM
        self.terminate()
        self.proc = None
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: Zone Redis setting (set it in production too): keeps each twin hash in listpack encoding.
HASH_MAX_LISTPACK_VALUE = 1024
#: Zone Redis setting (set it in production too): the fleet index sets hold integer ordinals and stay
#: ``intset`` (4 bytes a member) up to this size instead of turning into hashtables (~40-60 bytes a
#: member) past 512 (see metertwin.fleet.keys). Measured at 1M members: an append ~60 us, a removal
#: ~0.1-0.2 ms (the intset is one block moved in memory).
SET_MAX_INTSET_ENTRIES = 2_000_000


class RedisServer(_Process):
    """``redis-server`` with an append-only file in its data directory.

    ``appendfsync everysec``: every write reaches the AOF (the OS page cache) before
    Redis answers it, so a crash of redis-server alone (``kill -9``) loses nothing
    acknowledged; a crash of the whole host loses at most the last ~1 s, the interval
    of the background fsync. ``always`` would close that second at the cost of one
    fsync per write (ingest is write-bound); RDB snapshots alone would lose minutes.
    RDB ``save`` points stay off: the AOF already holds everything, and each snapshot
    forks the process. See docs/mdms.md, "Production Redis settings".
    """

    name = "redis"

    def __init__(
        self, *, maxmemory_mb: int | None = None, data_dir: str | Path | None = None, port: int | None = None
    ) -> None:
        super().__init__(data_dir=data_dir, port=port)
        argv = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.dir),
            "--protected-mode", "yes",
            # Twin hashes hold JSON values of 100-300 bytes; above 64 bytes (the default)
            # Redis abandons the compact listpack encoding and a twin takes ~1 KB instead of ~0.5 KB.
            "--hash-max-listpack-value", str(HASH_MAX_LISTPACK_VALUE),
            "--set-max-intset-entries", str(SET_MAX_INTSET_ENTRIES),
            # Refuse writes when full rather than evict: an evicted twin is a lost twin.
            "--maxmemory-policy", "noeviction",
        ]
        if maxmemory_mb:
            argv += ["--maxmemory", f"{maxmemory_mb}mb"]
        self._spawn(argv)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def wait_loaded(self, timeout_s: float = 30.0) -> None:
        """Wait until Redis has loaded its AOF after a (re)start and serves commands."""
        import redis

        deadline = time.monotonic() + timeout_s
        client = redis.Redis.from_url(self.url, socket_timeout=1.0)
        try:
            while True:
                with contextlib.suppress(redis.RedisError):
                    if client.info("persistence").get("loading") == 0:
                        return
                if time.monotonic() > deadline:
                    raise ServiceError(f"redis on {self.port} did not finish loading within {timeout_s} s")
                time.sleep(0.02)
        finally:
            client.close()

    def start(self) -> None:
        super().start()
        self.wait_loaded()


#: Mosquitto 2.0's dynamic-security plugin stores PBKDF2-SHA512 password hashes with these parameters.
_DYNSEC_ITERATIONS = 101
_DYNSEC_SALT_BYTES = 12


def dynsec_client(username: str, password: str, roles: list[str], text_name: str = "") -> dict[str, Any]:
    """A client entry of the dynamic-security JSON file, with its password hashed as the plugin does."""
    salt = secrets.token_bytes(_DYNSEC_SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, _DYNSEC_ITERATIONS)
    return {
        "username": username, "textName": text_name, "password": base64.b64encode(digest).decode(),
        "salt": base64.b64encode(salt).decode(), "iterations": _DYNSEC_ITERATIONS,
        "roles": [{"rolename": r} for r in roles],
    }


def _acls(topic: str, *acltypes: str) -> list[dict[str, Any]]:
    return [{"acltype": t, "topic": topic, "allow": True} for t in acltypes]


class Mosquitto(_Process):
    """Mosquitto 2 with dynamic security.

    ``admin_user`` administers the plugin only; ``service_user`` is the twin
    services' account: every topic, plus the right to administer dynamic security
    (the registry creates the meters' accounts with it).

    The dynamic-security file is written here (as ``mosquitto_ctrl dynsec init`` would,
    plus the service account and its role), so no password is ever on a command line,
    where ``ps`` shows it; the broker runs with umask 077, so the file stays 0600 when
    the plugin rewrites it. Sessions and queued QoS1 messages persist in the data
    directory (saved on shutdown): a broker restart keeps them.
    """

    name = "mosquitto"
    admin_user = "dynsec-admin"
    service_user = "twin-service"

    def __init__(
        self, *, max_queued_messages: int = 10_000, data_dir: str | Path | None = None, port: int | None = None
    ) -> None:
        super().__init__(data_dir=data_dir, port=port)
        self.dynsec_path = self.dir / "dynamic-security.json"
        self.admin_password = os.urandom(12).hex()
        self.service_password = os.urandom(12).hex()
        self._write_dynsec()
        plugin = _dynsec_plugin()
        conf = self.dir / "mosquitto.conf"
        conf.touch(mode=0o600)
        conf.write_text(
            "\n".join([
                "per_listener_settings false",
                # Started as root, mosquitto would switch to user 'mosquitto', who cannot
                # read our private temporary directory; keep the invoking user instead.
                f"user {getpass.getuser()}",
                f"listener {self.port} 127.0.0.1",
                "allow_anonymous false",
                f"plugin {plugin}",
                f"plugin_opt_config_file {self.dynsec_path}",
                f"max_queued_messages {max_queued_messages}",
                "max_inflight_messages 1000",
                # Persistent sessions and their queued messages survive a broker restart.
                "persistence true",
                f"persistence_location {self.dir}/",
                "autosave_interval 60",
                # Request/response over MQTT is latency-bound: without this, Nagle's algorithm
                # and delayed ACKs add ~40 ms to a live read.
                "set_tcp_nodelay true",
                "",
            ])
        )
        self._spawn(["mosquitto", "-c", str(conf)])

    def _write_dynsec(self) -> None:
        admin_acls = (
            _acls("$CONTROL/dynamic-security/#", "publishClientSend", "publishClientReceive", "subscribePattern")
            + _acls("$SYS/#", "publishClientReceive", "subscribePattern")
            + _acls("#", "publishClientReceive", "subscribePattern", "unsubscribePattern")
        )
        config = {
            "clients": [
                dynsec_client(self.admin_user, self.admin_password, ["admin"], "Dynsec admin user"),
                # The twin services' account may use every topic; meters get roles of their own
                # from the registry (metertwin.twin.dynsec), confined to meters/<id>/.
                dynsec_client(self.service_user, self.service_password, ["twin-service", "admin"]),
            ],
            "roles": [
                {"rolename": "admin", "acls": admin_acls},
                {"rolename": "twin-service", "acls": _acls(
                    "#", "publishClientSend", "publishClientReceive", "subscribePattern", "unsubscribePattern")},
            ],
            "defaultACLAccess": {"publishClientSend": False, "publishClientReceive": True,
                                 "subscribe": False, "unsubscribe": True},
        }
        fd = os.open(self.dynsec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)

    def control(self, commands: list[dict[str, Any]], timeout_s: float = 10.0) -> list[dict[str, Any]]:
        """Send dynamic-security commands as the admin account (over MQTT); returns the responses.

        Raises :class:`ServiceError` when a command answers an error.
        """
        import threading

        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        answered = threading.Event()
        responses: list[dict[str, Any]] = []
        subscribed = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        client.username_pw_set(self.admin_user, self.admin_password)
        client.on_subscribe = lambda *_a: subscribed.set()

        def on_message(_c: Any, _u: Any, msg: Any) -> None:
            responses.extend(json.loads(msg.payload).get("responses", []))
            answered.set()

        client.on_message = on_message
        client.connect(self.host, self.port)
        client.loop_start()
        try:
            client.subscribe("$CONTROL/dynamic-security/v1/response", qos=1)
            if not subscribed.wait(timeout_s):
                raise ServiceError("no SUBACK for the dynamic-security response topic")
            client.publish("$CONTROL/dynamic-security/v1", json.dumps({"commands": commands}), qos=1)
            if not answered.wait(timeout_s):
                raise ServiceError(f"the dynamic-security plugin did not answer within {timeout_s} s")
        finally:
            client.disconnect()
            client.loop_stop()
        errors = [r for r in responses if r.get("error")]
        if errors:
            raise ServiceError(f"dynamic-security commands failed: {errors}")
        return responses

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
    """moto's S3 server. It keeps objects in memory: a restart loses them (pause it with
    :meth:`pause` to make S3 unavailable without losing what it holds)."""

    name = "moto"

    def __init__(self, *, port: int | None = None) -> None:
        super().__init__(port=port)
        moto = str(Path(sys.executable).with_name("moto_server"))
        self._spawn([moto, "-H", "127.0.0.1", "-p", str(self.port)])

    def pause(self) -> None:
        """SIGSTOP: connections are accepted by the kernel but never answered (an unavailable S3)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


__all__ = [
    "HASH_MAX_LISTPACK_VALUE", "SET_MAX_INTSET_ENTRIES", "Mosquitto", "MotoS3", "RedisServer", "ServiceError",
    "dynsec_client", "free_port", "wait_for_port",
]
