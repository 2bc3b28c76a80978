"""Redis Cluster plumbing: the cluster URL, the cluster client's scripted pipelines, the slot guard."""

from __future__ import annotations

import pytest
import redis

from metertwin.core import clients
from metertwin.core.settings import Settings, redis_cluster_nodes
from storage.redis_cluster import RedisCluster
from tests.script_keys import cross_slot


def test_cluster_url_names_its_nodes_and_only_database_zero() -> None:
    assert redis_cluster_nodes("redis://127.0.0.1:6379/0") is None
    assert redis_cluster_nodes("redis+cluster://u:p@a:7000,b:7001") == (
        "redis://u:p@a:7000", [("a", 7000), ("b", 7001)])
    assert redis_cluster_nodes("rediss+cluster://a:7000/0") == ("rediss://a:7000", [("a", 7000)])
    with pytest.raises(ValueError, match="database"):
        redis_cluster_nodes("redis+cluster://a:7000/3")
    with pytest.raises(ValueError, match="host:port"):
        Settings(redis_url="redis+cluster://u:secret@a:7000,b")
    with pytest.raises(ValueError) as caught:
        redis_cluster_nodes("redis+cluster://u:secret@a:x")
    assert "secret" not in str(caught.value)


def test_pipelined_scripts_run_on_every_node_even_after_a_script_flush(redis_cluster: RedisCluster) -> None:
    redis_cluster.flushall()
    client = clients.redis_cluster(redis_cluster.url, timeout_s=5.0, max_connections=8)
    assert client is not None
    script = client.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
    keys = [f"mt:test:{{m-{i}}}" for i in range(60)]  # spread over the three masters
    for attempt in range(2):
        if attempt:  # a restarted primary forgets its scripts: the calls it refused are sent again
            for url in redis_cluster.node_urls:
                redis.Redis.from_url(url).script_flush()
        pipe = client.pipeline(transaction=False)
        for i, key in enumerate(keys):
            script(keys=[key], args=[i], client=pipe)
        pipe.smove("mt:test:{a}:x", "mt:test:{a}:y", "m")  # same slot: allowed, as outside a pipeline
        assert pipe.execute() == [*(i * (attempt + 1) for i in range(60)), False]
    pipe = client.pipeline(transaction=False)
    pipe.evalsha(script.sha, 2, "mt:test:{m-1}", "mt:twins", 1)  # past the in-process guard: refused
    with pytest.raises(redis.RedisClusterException, match="same key slot"):
        pipe.execute()
    client.close()


def test_slot_guard_groups_keys_by_slot() -> None:
    assert cross_slot(["mt:twin:{m-1}", "mt:cmdq:{m-1}"]) == {}
    assert len(cross_slot(["mt:twin:{m-1}", "mt:twins"])) == 2
