"""One-off move of a zone's fleet records from the layout before the compaction (issue 13) to the
current one (:mod:`metertwin.fleet.keys`): ``python -m metertwin.fleet.migrate --redis-url URL``.

Before, the documents were JSON objects in one hash (``mt:fleet:{fleet-ix}:topo``, meter -> JSON)
and the index sets held meter ids, under the same names the ordinals' sets use now. Run it with the
fleet's writers stopped (the ``edge-fleet`` and ``edge-registry`` functions, the jobs' topology
action), before the new code serves searches: it drops the index sets, the all-meters set, the
document buckets and the ordinal counter, then writes every document of the old hash again with
its version and time kept (one audit entry each, actor ``migration``), and deletes the old hash
last. A crash part way leaves the old hash in place: run it again, it starts over.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from metertwin.core.clients import StrRedis
from metertwin.fleet import keys
from metertwin.fleet.topology import _write_args, decode, topology_store

#: The documents hash of the old layout.
LEGACY_TOPOLOGY = keys.ALL_METERS.rsplit(":", 1)[0] + ":topo"
BATCH = 1000


def migrate(client: StrRedis) -> int:
    """Move every old document to the current layout; returns how many (0: nothing to migrate)."""
    if not client.exists(LEGACY_TOPOLOGY):
        return 0
    base = keys.ALL_METERS.rsplit(":", 1)[0]
    stale = [keys.ALL_METERS, keys.SEQ, *client.scan_iter(match=f"{base}:ix:*", count=1000),
             *client.scan_iter(match=f"{keys.DOC_PREFIX}*", count=1000)]
    for start in range(0, len(stale), 500):
        client.delete(*stale[start:start + 500])
    store = topology_store(client)
    moved = 0
    batch: list[tuple[str, dict[str, Any]]] = []
    for meter_id, raw in client.hscan_iter(LEGACY_TOPOLOGY, count=BATCH):
        doc = decode(json.loads(raw)) if raw else None
        if doc:
            batch.append((str(meter_id), doc))
        if len(batch) >= BATCH:
            moved += _write(client, store, batch)
            batch = []
    moved += _write(client, store, batch)
    client.delete(LEGACY_TOPOLOGY)
    return moved


def _write(client: StrRedis, store: Any, batch: list[tuple[str, dict[str, Any]]]) -> int:
    pipe = client.pipeline(transaction=False)
    for meter_id, doc in batch:
        ks, args = _write_args(meter_id, "", None, doc, "migration")
        store._write(keys=ks, args=args, client=pipe)
    pipe.execute()
    return len(batch)


def main(argv: list[str] | None = None) -> None:
    import redis

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--redis-url", required=True)
    args = ap.parse_args(argv)
    print(f"{migrate(redis.Redis.from_url(args.redis_url, decode_responses=True))} fleet records migrated")


if __name__ == "__main__":
    main()
