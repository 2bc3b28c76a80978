"""An embedded Redis Cluster: real ``redis-server --cluster-enabled yes`` processes on free ports.

For tests and benchmarks of a zone that outgrew one Redis (issue 16 item 6): each node is a
:class:`storage.embedded.RedisServer` with cluster mode on, and ``redis-cli --cluster create``
joins them.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from typing import Self

from storage.embedded import RedisServer, ServiceError, free_port


class RedisCluster:
    """A Redis Cluster of ``masters`` ``redis-server --cluster-enabled yes`` nodes, no replicas.

    Each node is a :class:`RedisServer` (same persistence and memory settings) on its own free
    port and data directory; ``redis-cli --cluster create`` spreads the 16,384 slots over them.
    Ready when every node reports ``cluster_state:ok`` (all slots served, the nodes agreeing).
    ``url`` is the ``redis+cluster://`` URL metertwin's settings take (``metertwin.core.settings``).
    """

    def __init__(self, *, masters: int = 3, timeout_s: float = 30.0) -> None:
        if masters < 3:
            raise ServiceError(f"a Redis Cluster needs at least 3 masters, not {masters}")
        self.nodes: list[RedisServer] = []
        try:
            for _ in range(masters):
                self.nodes.append(_ClusterNode())
            self._create(timeout_s)
        except BaseException:
            self.stop()
            raise

    def _create(self, timeout_s: float) -> None:
        import redis

        cli = shutil.which("redis-cli")
        if cli is None:
            raise ServiceError("redis-cli is not installed; run `make setup`")
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        done = subprocess.run([cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
                              capture_output=True, timeout=timeout_s, check=False)
        if done.returncode != 0:
            raise ServiceError(f"redis-cli --cluster create failed: {done.stdout.decode()[-500:]}"
                               f"{done.stderr.decode()[-500:]}")
        deadline = time.monotonic() + timeout_s
        for node in self.nodes:
            client = redis.Redis(host="127.0.0.1", port=node.port, socket_timeout=1.0)
            try:
                while client.cluster("INFO").get("cluster_state") != "ok":
                    if time.monotonic() > deadline:
                        raise ServiceError(f"cluster node {node.port} not ok within {timeout_s} s")
                    time.sleep(0.02)
            finally:
                client.close()

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    @property
    def node_urls(self) -> list[str]:
        """Each master's plain ``redis://`` URL (FLUSHALL, INFO per node)."""
        return [n.url for n in self.nodes]

    def flushall(self) -> None:
        """Empty every master (a FLUSHALL through a cluster client reaches only one node)."""
        import redis

        for url in self.node_urls:
            client = redis.Redis.from_url(url, socket_timeout=5.0)
            try:
                client.flushall()
            finally:
                client.close()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.nodes = []

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _ClusterNode(RedisServer):
    """A :class:`RedisServer` with cluster mode on (its ``nodes.conf`` in its data directory)."""

    name = "redis-cluster"

    def _spawn(self, argv: list[str]) -> None:
        # The bus port is free_port() too: the default, port + 10000, may be taken or above 65535.
        self.bus_port = free_port()
        super()._spawn([*argv, "--cluster-enabled", "yes", "--cluster-config-file", str(self.dir / "nodes.conf"),
                        "--cluster-port", str(self.bus_port), "--cluster-node-timeout", "5000"])

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"
