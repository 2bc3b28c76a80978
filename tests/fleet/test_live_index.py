"""The live indexes (metertwin.fleet.status): online set and last-reading scores follow the twins
through the status and reading paths, twin and record removal, moves and late fleet records."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import redis

from metertwin.core import topics
from metertwin.core.clients import get_redis
from metertwin.fleet import keys
from metertwin.fleet.search import fleet_search
from metertwin.fleet.topology import topology_store
from metertwin.twin import keys as twin_keys
from metertwin.twin.state import twin_store
from metertwin.twin.uplink import ingest_messages
from metertwin.upgrade.inbox import v1_ingest
from tests.fleet.helpers import provision
from tests.fleet.helpers import search as find


def _grid(prefix: str, n: int) -> list[str]:
    provision([{"meter_id": f"{prefix}-{i:03d}", "profile": {"region": "north", "substation": "s1",
                                                              "feeder": f"f{i % 2}", "transformer": f"t{i % 2}"}}
               for i in range(n)])
    return [f"{prefix}-{i:03d}" for i in range(n)]


def _status(meter: str, state: str) -> None:
    [(code, body)] = ingest_messages(v1_ingest(get_redis()), [(topics.status(meter), state.encode())], None)
    assert code == 200, body


def _readings(*items: tuple[str, float, int]) -> None:
    messages = [(topics.readings(m), json.dumps({"ts": ts, "seq": seq, "import_kwh": 1.0, "power_w": 5.0}).encode())
                for m, ts, seq in items]
    answers = ingest_messages(v1_ingest(get_redis()), messages, None)
    assert all(code == 200 for code, _ in answers), answers


def _ordinal(r: redis.Redis, meter: str) -> str | None:
    hit = r.zrangebylex(keys.ALL_METERS, f"[{meter} ", f"({meter}!", start=0, num=1)
    return str(hit[0]).rpartition(" ")[2] if hit else None


def _disagreements(r: redis.Redis, meters: list[str]) -> list[str]:
    """Meters whose live index entries differ from their twin (online flag, last reading ts)."""
    bad = []
    for m in meters:
        o = _ordinal(r, m)
        reported, measurement = r.hmget(twin_keys.twin(m), ["r", "m"]) if o else (None, None)
        online = (json.loads(reported or "{}").get("online") or [False])[0] is True
        ts = json.loads(measurement)["ts"] if measurement else None
        if o is not None and (bool(r.sismember(keys.ONLINE, o)) != online or r.zscore(keys.LAST_READING, o) != ts):
            bad.append(m)
    return bad


def _ids(body: dict[str, Any]) -> list[str]:
    return [m["meter_id"] for m in body["meters"]]


def test_status_flips_move_a_twin_in_and_out_of_the_online_index(env: dict[str, str], meter_id: str) -> None:
    ids = _grid(meter_id, 4)
    r = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    assert r.scard(keys.ONLINE) == 0
    _status(ids[0], "online")
    _status(ids[2], "online")
    assert _ids(find(feeder="f0", online=True)[1]) == [ids[0], ids[2]]
    _status(ids[2], "offline")
    assert _ids(find(feeder="f0", online=True)[1]) == [ids[0]]
    assert _ids(find(feeder="f0", online=False)[1]) == [ids[2]]
    assert r.smembers(keys.ONLINE) == {_ordinal(r, ids[0])}
    assert _disagreements(r, ids) == []


def test_readings_keep_the_newest_ts_and_stale_s_follows_it(env: dict[str, str], meter_id: str) -> None:
    ids = _grid(meter_id, 4)
    r = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    now = time.time()
    _readings((ids[0], now - 3600, 1), (ids[1], now - 10, 1), (ids[2], now - 5, 1))
    _readings((ids[1], now - 7200, 2))  # buffered while offline: older, the twin and the index keep the newest
    assert r.zscore(keys.LAST_READING, str(_ordinal(r, ids[1]))) == now - 10
    assert _disagreements(r, ids) == []
    # ids[3] never sent a reading: stale; ids[0] is an hour old
    assert _ids(find(feeder="f0", stale_s=600)[1]) == [ids[0]]
    assert _ids(find(feeder="f1", stale_s=600)[1]) == [ids[3]]
    assert find(feeder="f1", online=False, stale_s=1)[1]["count"] == 2
    twin_store(r).report_measurement(ids[0], {"ts": now - 1, "import_kwh": 2.0, "power_w": 1.0}, seq=None)
    assert _ids(find(feeder="f0", stale_s=600)[1]) == []
    assert _disagreements(r, ids) == []


def test_removed_twins_and_records_leave_the_live_indexes(env: dict[str, str], meter_id: str) -> None:
    ids = _grid(meter_id, 4)
    r = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    now = time.time()
    for m in ids:
        _status(m, "online")
    _readings(*((m, now - 1, 1) for m in ids))
    assert r.scard(keys.ONLINE) == r.zcard(keys.LAST_READING) == 4
    topology_store(r).remove([ids[0]], actor="test")
    twin_store(r).delete(ids[1])
    gone = {str(_ordinal(r, ids[1]))}
    assert r.smembers(keys.ONLINE) == {_ordinal(r, m) for m in ids[2:]}
    assert set(r.zrange(keys.LAST_READING, 0, -1)) == {_ordinal(r, m) for m in ids[2:]}
    assert not gone & r.smembers(keys.ONLINE)


def test_a_moved_twin_keeps_its_live_state_on_the_new_feeder(env: dict[str, str], meter_id: str) -> None:
    ids = _grid(meter_id, 2)
    r = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    _status(ids[0], "online")
    topology_store(r).patch(ids[0], {"feeder": "f1", "transformer": "t1"}, actor="test")
    assert _ids(find(feeder="f1", online=True)[1]) == [ids[0]]
    assert _ids(find(feeder="f0", online=True)[1]) == []
    assert _ids(find(feeder="f1", online=False)[1]) == [ids[1]]


def test_a_record_created_after_the_twin_reported_starts_from_the_twin(env: dict[str, str], meter_id: str) -> None:
    r = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    twins = twin_store(r)
    ts = time.time() - 30
    for m in (f"{meter_id}-a", f"{meter_id}-b"):
        twins.create(m, "edge", {"kind": "household"})
        twins.report(m, {"online": True})
        twins.report_measurement(m, {"ts": ts, "import_kwh": 1.0, "power_w": 1.0}, seq=1)
    assert r.scard(keys.ONLINE) == 0  # no fleet record yet: no ordinal, nothing indexed
    topology_store(r).patch(f"{meter_id}-a", {"feeder": "f9", "transformer": "t9"}, actor="test", zone="edge")
    topology_store(r).create_many({f"{meter_id}-b": {"feeder": "f9", "transformer": "t9"}}, actor="test",
                                  zone="edge")
    assert _disagreements(r, [f"{meter_id}-a", f"{meter_id}-b"]) == []
    assert find(feeder="f9", online=True, stale_s=600)[1]["count"] == 0
    assert find(feeder="f9", online=True, stale_s=10)[1]["count"] == 2


def test_random_statuses_and_readings_keep_index_and_twins_in_agreement(env: dict[str, str], meter_id: str) -> None:
    ids = _grid(meter_id, 12)
    r = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    rnd, now, seqs = random.Random(3), time.time(), dict.fromkeys(ids, 0)
    for _ in range(20):
        _status(rnd.choice(ids), rnd.choice(["online", "offline"]))
        batch = []
        for m in rnd.sample(ids, 4):
            seqs[m] += 1
            batch.append((m, now - rnd.randrange(0, 5000), seqs[m]))
        _readings(*batch)
    assert _disagreements(r, ids) == []
    # the index answer equals the per-twin answer for every combination
    for query in ({"online": True}, {"online": False}, {"stale_s": 1200}, {"online": False, "stale_s": 1200}):
        for feeder in ("f0", "f1"):
            by_index = find(feeder=feeder, **query)[1]
            s = fleet_search(get_redis())
            s.by_index = False
            try:
                per_twin = find(feeder=feeder, **query)[1]
            finally:
                s.by_index = True
            assert (by_index["count"], _ids(by_index)) == (per_twin["count"], _ids(per_twin)), query
