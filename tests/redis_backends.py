"""Which Redis a test runs against: one ``redis-server``, or a real 3-master Redis Cluster.

The modules in :data:`CLUSTER_MODULES` run twice, ``[single]`` and ``[cluster]`` (issue 16
item 6: metertwin runs on Redis Cluster unchanged). ``--redis-backends single`` (or
``cluster``) runs one of the two only. Test code that builds its own client from
``redis_url`` uses :func:`redis_client`, which understands both URL kinds.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.cluster import ClusterNode, RedisCluster

from metertwin.core.settings import redis_cluster_nodes

#: Twin state, ingest, commands, MDMS (VEE, edits, archive), upgrade, P2P, DR events and the
#: gateway's async queue: the paths whose Lua, MULTI and pipelines touch several keys. Paths
#: relative to the repository root.
CLUSTER_MODULES = frozenset({
    "tests/twin/test_twin_state.py",
    "tests/twin/test_functions.py",
    "tests/mdms/test_vee.py",
    "tests/upgrade/test_versioned_state.py",
    "tests/upgrade/test_upgrade_operations.py",
    "tests/p2p/test_runner.py",
    "tests/p2p/test_p2p.py",
    "tests/mdms/test_archive.py",
    "tests/mdms/test_vee_edits.py",
    "tests/dr/test_dr_event.py",
    "tests/gateway/test_gateway_async.py",
    "tests/gateway/test_gateway_connect.py",
    "tests/core/test_tokens_cli.py",
    "tests/aggregates/test_aggregates.py",
    "tests/aggregates/test_rules.py",
    "tests/aggregates/test_routes.py",
    "tests/jobs/test_jobs.py",
    "tests/jobs/test_command_batch.py",
    "tests/concentrator/test_concentrators.py",
    "tests/concentrator/test_batch_crash.py",
    "tests/stream/test_capability_events.py",
})

BACKENDS = ("single", "cluster")


def redis_client(url: str, **options: Any) -> Any:
    """A client for ``url``: ``redis.Redis`` for ``redis://``, ``RedisCluster`` for ``redis+cluster://``."""
    found = redis_cluster_nodes(url)
    if found is None:
        return redis.Redis.from_url(url, **options)
    first, nodes = found
    return RedisCluster.from_url(first, startup_nodes=[ClusterNode(h, p) for h, p in nodes],  # type: ignore[no-untyped-call]
                                 **options)
