"""A zone written with the fleet layout before the compaction moves to the current one, searchable the same."""

from __future__ import annotations

import redis

from loadtest.fleet_legacy.topology import topology_store as legacy_store
from metertwin.fleet.migrate import migrate
from metertwin.fleet.search import Query, fleet_search
from metertwin.fleet.topology import topology_store
from tests.fleet.helpers import provision


def test_legacy_records_are_migrated(env: dict[str, str], meter_id: str) -> None:
    r = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    ids = [f"{meter_id}-{i}" for i in range(6)]
    provision([{"meter_id": m, "profile": {}} for m in ids])
    topology_store(r).remove(ids, actor="test")  # twins only: their records are written the old way below
    old = legacy_store(r)
    for i, m in enumerate(ids):
        old.patch(m, {"feeder": f"mg{i % 2}", "transformer": f"mg{i % 2}t", "tags": {"k": "v"}}, actor="test")
    old.patch(ids[0], {"phase": "B"}, actor="test")
    assert migrate(r) == 6
    store = topology_store(r)
    doc = store.get(ids[0])
    assert doc is not None
    assert (doc["v"], doc["feeder"], doc["phase"], doc["tags"]) == (2, "mg0", "B", {"k": "v"})
    page = fleet_search(r).run(Query.from_params({"feeder": "mg0", "tag": "k:v"}))
    assert [m["meter_id"] for m in page.meters] == sorted(ids[0::2])
    assert page.count == 3
    assert migrate(r) == 0  # done once
