"""Redis Cluster clients: what :mod:`metertwin.core.clients` builds for a ``redis+cluster://`` URL.

metertwin runs on a Redis Cluster unchanged because every Lua script and every MULTI touches
the keys of one meter (or one operation, one market) under one hash tag, so one slot; writes
to zone-wide keys (indexes such as ``mt:twins``) are separate commands (see each capability's
store for the order and why a crash between them is recoverable).

One gap in redis-py's cluster pipeline is closed here: it refuses EVALSHA, SMOVE and RENAME
("blocked when running redis in cluster mode"), although routing such a call by its keys is
what the cluster client does outside a pipeline (and a call whose keys share a hash tag is
one slot). Ingest and the upgrade operations pipeline hundreds
of script calls per round trip, so :class:`ScriptingClusterPipeline` queues EVALSHA like any
keyed command (redis-py groups the stack by slot and node, follows MOVED/ASK, and refuses a
call whose keys span slots), loads each script on every primary before its first use, and
re-sends, in their order, only the calls a node answered NOSCRIPT (a restarted or new
primary forgets its scripts; a NOSCRIPT call ran nothing, so re-sending it is safe).
"""

from __future__ import annotations

from typing import Any

import redis
from redis._parsers.commands import CommandPolicies, RequestPolicy, ResponsePolicy
from redis.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.commands.core import Script
from redis.commands.policies import PolicyResolver


class ScriptingRedisCluster(RedisCluster):
    """A ``RedisCluster`` whose pipelines accept script calls."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: sha -> source of every script registered on this client (to load it where it is missing).
        self.script_sources: dict[str, str] = {}
        self.loaded_shas: set[str] = set()

    def register_script(self, script: Any) -> Script:
        found = super().register_script(script)
        self.script_sources[found.sha] = found.script if isinstance(found.script, str) else bytes(found.script).decode()
        return found

    def pipeline(self, transaction: Any = None, shard_hint: Any = None) -> ScriptingClusterPipeline:
        if shard_hint:
            raise redis.RedisClusterException("shard_hint is deprecated in cluster mode")
        return ScriptingClusterPipeline(
            self,
            nodes_manager=self.nodes_manager, commands_parser=self.commands_parser,
            startup_nodes=self.nodes_manager.startup_nodes, result_callbacks=self.result_callbacks,
            cluster_response_callbacks=self.cluster_response_callbacks,
            read_from_replicas=self.read_from_replicas, load_balancing_strategy=self.load_balancing_strategy,
            reinitialize_steps=self.reinitialize_steps, retry=self.retry, lock=self._lock,
            transaction=transaction, event_dispatcher=self._event_dispatcher,
        )

    def load_scripts(self, shas: set[str]) -> None:
        """SCRIPT LOAD each of ``shas`` (that this client registered) on every primary."""
        for sha in shas:
            source = self.script_sources.get(sha)
            if source is not None:
                self.script_load(source)  # redis-py sends SCRIPT LOAD to all primaries
                self.loaded_shas.add(sha)


_KEYED = CommandPolicies(request_policy=RequestPolicy.DEFAULT_KEYED, response_policy=ResponsePolicy.DEFAULT_KEYED)


class _ScriptsAreKeyed(PolicyResolver):
    """Routes EVALSHA by its keys without asking the server.

    redis-py's pipeline knows no policy for EVALSHA and falls back to ``COMMAND GETKEYS``, one
    round trip per queued script call (measured: a pipelined MDMS batch ran at a quarter of
    the single-Redis rate); its keyed routing then computes the slot from ``numkeys`` itself.
    """

    def __init__(self, inner: PolicyResolver) -> None:
        self._inner = inner

    def resolve(self, command_name: str) -> CommandPolicies | None:
        return _KEYED if command_name in ("evalsha", "eval") else self._inner.resolve(command_name)

    def with_fallback(self, fallback: PolicyResolver) -> PolicyResolver:
        return _ScriptsAreKeyed(self._inner.with_fallback(fallback))


class ScriptingClusterPipeline(ClusterPipeline):
    """A cluster pipeline that queues EVALSHA, SMOVE and RENAME (see the module docstring)."""

    def __init__(self, owner: ScriptingRedisCluster, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._owner = owner
        self._policy_resolver = _ScriptsAreKeyed(self._policy_resolver)

    def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> Any:
        return self.execute_command("EVALSHA", sha, numkeys, *keys_and_args)  # type: ignore[no-untyped-call]

    def smove(self, src: str, dst: str, value: Any) -> Any:  # type: ignore[override]
        return self.execute_command("SMOVE", src, dst, value)  # type: ignore[no-untyped-call]

    def rename(self, src: str, dst: str) -> Any:  # type: ignore[override]
        return self.execute_command("RENAME", src, dst)  # type: ignore[no-untyped-call]

    def _queue(self) -> list[Any]:
        return list(self._execution_strategy.command_queue)

    def _queued_shas(self) -> list[tuple[int, str]]:
        return [(i, str(c.args[1])) for i, c in enumerate(self._queue()) if str(c.args[0]).upper() == "EVALSHA"]

    def execute(self, raise_on_error: bool = True) -> list[Any]:
        scripted = self._queued_shas()
        if not scripted:
            return super().execute(raise_on_error)
        stack = [(c.args, c.options) for c in self._queue()]
        self._owner.load_scripts({sha for _, sha in scripted} - self._owner.loaded_shas)
        results = super().execute(raise_on_error=False)
        missing = [i for i, _ in scripted if isinstance(results[i], redis.exceptions.NoScriptError)]
        if missing:
            self._owner.load_scripts({str(stack[i][0][1]) for i in missing})
            retry = self._owner.pipeline(transaction=False)
            for i in missing:
                retry.execute_command(*stack[i][0], **stack[i][1])  # type: ignore[no-untyped-call]
            for i, value in zip(missing, retry.execute(raise_on_error=False), strict=True):
                results[i] = value
        if raise_on_error:
            for value in results:
                if isinstance(value, Exception):
                    raise value
        return results


def cluster_client(first_url: str, nodes: list[tuple[str, int]], *, timeout_s: float,
                   max_connections: int) -> ScriptingRedisCluster:
    """The sync client: discovery from ``nodes``, per-node blocking pools of ``max_connections``."""
    return ScriptingRedisCluster.from_url(  # type: ignore[return-value]  # from_url is typed as the base class
        first_url, startup_nodes=[ClusterNode(h, p) for h, p in nodes[1:]],  # type: ignore[no-untyped-call]
        decode_responses=True,
        socket_timeout=timeout_s, socket_connect_timeout=timeout_s, max_connections=max_connections,
        connection_pool_class=redis.BlockingConnectionPool, timeout=timeout_s,
    )


def async_cluster_client(first_url: str, nodes: list[tuple[str, int]], *, timeout_s: float,
                         max_connections: int, decode_responses: bool = True) -> Any:
    """The asyncio client (``redis.asyncio.cluster.RedisCluster``; its pipelines are not used for scripts)."""
    from redis.asyncio.cluster import ClusterNode as AsyncNode
    from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster

    return AsyncRedisCluster.from_url(
        first_url, startup_nodes=[AsyncNode(h, p) for h, p in nodes[1:]], decode_responses=decode_responses,
        socket_timeout=timeout_s, socket_connect_timeout=timeout_s, max_connections=max_connections,
    )
