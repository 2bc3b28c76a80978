"""Fleet search: every filter, combined, exact counts, stable cursors, scopes; indexes agree with documents."""

from __future__ import annotations

import random
import time
from typing import Any

import pytest
import redis

from metertwin.core.errors import Conflict
from metertwin.fleet import keys, search
from metertwin.fleet.topology import index_keys, topology_store
from metertwin.twin.state import twin_store
from tests.fleet.helpers import fleet, provision, token
from tests.fleet.helpers import search as find
from tests.invoke import call, load_handler

write = load_handler("write")
dr_event = load_handler("dr-event")


def _grid(prefix: str, n: int) -> list[dict[str, Any]]:
    """n meters over 2 feeders, 4 transformers (2 per feeder), phases A/B/C, every 5th in group 'pilot'."""
    out = []
    for i in range(n):
        feeder, transformer = f"f{i % 2}", f"t{i % 4}"
        out.append({"meter_id": f"{prefix}-{i:04d}", "profile": {
            "region": "north", "substation": "s1", "feeder": feeder, "transformer": transformer,
            "phase": "ABC"[i % 3], "tariff": "tou" if i % 2 else "flat", "customer_class": "residential",
            "groups": ["pilot"] if i % 5 == 0 else [], "tags": {"vendor": "acme" if i % 3 else "zeta"}}})
    return out


def _ids(body: dict[str, Any]) -> list[str]:
    return [m["meter_id"] for m in body["meters"]]


def _all_pages(**query: Any) -> tuple[list[str], set[int]]:
    seen: list[str] = []
    counts: set[int] = set()
    cursor = query.pop("cursor", "")
    while True:
        status, body = find(**query, **({"cursor": cursor} if cursor else {}))
        assert status == 200, body
        seen += _ids(body)
        counts.add(body["count"])
        if not body["next_cursor"]:
            return seen, counts
        cursor = body["next_cursor"]


def test_filters_combine_count_and_page(env: dict[str, str], meter_id: str) -> None:
    grid = _grid(meter_id, 240)
    provision(grid)
    expect = sorted(m["meter_id"] for m in grid if m["profile"]["feeder"] == "f0")
    seen, counts = _all_pages(feeder="f0", limit=50)
    assert seen == expect
    assert counts == {120}
    status, body = find(feeder="f1", transformer="t3", phase="A", limit=1000)
    want = sorted(m["meter_id"] for i, m in enumerate(grid) if i % 4 == 3 and i % 3 == 0)
    assert (status, _ids(body), body["count"]) == (200, want, len(want))
    assert body["meters"][0]["topology"]["transformer"] == "t3"
    assert body["meters"][0]["version"] == 1
    status, body = find(group="pilot", tag="vendor:zeta", limit=1000)
    want = sorted(m["meter_id"] for i, m in enumerate(grid) if i % 5 == 0 and i % 3 == 0)
    assert _ids(body) == want
    status, body = find(region="north", zone="edge", tariff="tou", customer_class="residential", substation="s1")
    assert body["count"] == 120
    assert len(body["meters"]) == 100
    assert body["next_cursor"] == body["meters"][-1]["meter_id"]
    assert find(feeder="nowhere")[1] == {"count": 0, "meters": [], "next_cursor": None}
    seen, counts = _all_pages(limit=1000)
    assert seen == sorted(m["meter_id"] for m in grid)
    assert counts == {240}


def test_repeated_group_and_tag_parameters_all_apply(env: dict[str, str], meter_id: str) -> None:
    provision([{"meter_id": f"{meter_id}-1", "profile": {"groups": ["a", "b"], "tags": {"k": "1"}}},
               {"meter_id": f"{meter_id}-2", "profile": {"groups": ["a"], "tags": {"k": "1"}}}])
    from starlette.datastructures import Headers, QueryParams

    from tests.invoke import Context, Event

    event = Event(b"", Headers({"Authorization": f"Bearer {token('mdms')}"}), "GET",
                  QueryParams([("group", "a"), ("group", "b"), ("tag", "k:1")]), "/meters")
    body = fleet.handle(event, Context())["body"]
    assert [m["meter_id"] for m in body["meters"]] == [f"{meter_id}-1"]


def test_cursor_is_stable_while_the_fleet_changes(env: dict[str, str], meter_id: str) -> None:
    grid = _grid(meter_id, 60)
    provision(grid)
    _status, first = find(feeder="f0", limit=10)
    # meters before the cursor leave the feeder, a new one joins after it: no id is skipped or repeated
    store = topology_store(redis.Redis.from_url(env["REDIS_URL"], decode_responses=True))
    for gone in _ids(first)[:3]:
        store.patch(gone, {"feeder": "f9", "transformer": "t9"}, actor="test")
    provision([{"meter_id": f"{meter_id}-9999", "profile": {"feeder": "f0", "transformer": "t0"}}])
    rest, counts = _all_pages(feeder="f0", limit=7, cursor=first["next_cursor"])
    assert rest == [*sorted(m["meter_id"] for m in grid if m["profile"]["feeder"] == "f0")[10:], f"{meter_id}-9999"]
    assert counts == {28}


def test_the_walk_plan_answers_like_the_sort_plan(env: dict[str, str], meter_id: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    provision(_grid(meter_id, 150))
    by_sort = _all_pages(phase="B", tag="vendor:acme", limit=9)
    monkeypatch.setattr(search, "SORT_MAX", 5)  # every intersection is now 'large'
    monkeypatch.setattr(search, "WALK_CHUNK", 4)
    assert _all_pages(phase="B", tag="vendor:acme", limit=9) == by_sort
    assert by_sort[1] == {50}


def test_live_filters_read_the_twins(env: dict[str, str], meter_id: str) -> None:
    grid = _grid(meter_id, 12)
    provision(grid)
    ids = [m["meter_id"] for m in grid]
    r = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    twins, now = twin_store(r), time.time()
    for i, m in enumerate(ids):
        twins.report(m, {"online": i % 2 == 0})
        twins.report_measurement(m, {"ts": now - (3600 if i < 4 else 5), "import_kwh": 1.0}, None)
    f0 = [m for i, m in enumerate(ids) if i % 2 == 0]
    assert _ids(find(feeder="f0", online=True)[1]) == f0
    assert _ids(find(feeder="f1", online=True)[1]) == []
    assert find(feeder="f0", online=True, stale_s=600)[1]["count"] == 2  # ids 0 and 2
    assert _ids(find(transformer="t1", online=False, stale_s=600)[1]) == [ids[1]]
    r.hset(f"mt:twin:{{{ids[3]}}}", "b", "v2")  # as upgrade.switch binds a twin
    assert _ids(find(release="v2", feeder="f1")[1]) == [ids[3]]
    assert find(release="v1", feeder="f1")[1]["count"] == 5
    status, body = call(write, "POST", f"/meters/{ids[5]}/commands", token=token("utility"),
                        body={"kind": "relay", "params": {"state": "open"}})
    assert status == 202, body
    assert _ids(find(feeder="f1", has_pending_commands=True)[1]) == [ids[5]]
    assert find(feeder="f1", has_pending_commands=False)[1]["count"] == 5
    status, body = call(dr_event, "PUT", f"/meters/{ids[6]}/dr-preferences", body={"opt_out": True},
                        token=token("consumer", meter=ids[6]))
    assert status == 200, body
    assert _ids(find(feeder="f0", dr_opted_out=True)[1]) == [ids[6]]
    page, counts = _all_pages(feeder="f0", online=True, limit=2)
    assert page == f0
    assert counts == {6}


def test_scopes_and_bad_parameters(env: dict[str, str], meter_id: str) -> None:
    provision([{"meter_id": meter_id, "profile": {"feeder": "f1"}}])
    for scope in ("billing", "mdms", "admin", "utility"):
        assert find(token(scope), feeder="f1")[1]["count"] == 1, scope
    assert find(token("consumer", meter=meter_id), feeder="f1")[0] == 403
    assert find(token("ems", meter=meter_id))[0] == 403
    for query, name in (({"feeder": "{x}"}, "feeder"), ({"tag": "novalue"}, "tag"), ({"online": "maybe"}, "online"),
                        ({"limit": "0"}, "limit"), ({"stale_s": "-1"}, "stale_s"), ({"cursor": "a b"}, "cursor")):
        status, body = find(**query)
        assert status == 400
        assert body["details"]["field"] == name
        assert str(next(iter(query.values()))) in body["message"]


def test_indexes_always_agree_with_documents(env: dict[str, str], meter_id: str) -> None:
    """Random patches, moves and removals: every index set holds exactly the meters whose document says so."""
    rnd = random.Random(7)
    grid = _grid(meter_id, 40)
    provision(grid)
    r = redis.Redis.from_url(env["REDIS_URL"], decode_responses=True)
    store = topology_store(r)
    ids = [m["meter_id"] for m in grid]
    clashes: list[str] = []
    for _ in range(200):
        m = rnd.choice(ids)
        t = rnd.randrange(8)
        patch = {"transformer": f"x{t}", "feeder": rnd.choice(["g0", "g1"]), "phase": rnd.choice("ABC"),
                 "groups": rnd.sample(["a", "b", "c"], rnd.randrange(3)),
                 "tags": {"k": rnd.choice(["1", "2", None])}}
        try:
            store.patch(m, patch, actor="test")
        except Conflict as exc:  # a tree clash is a refused write, nothing half-applied
            clashes.append(exc.message)
    assert clashes
    assert all("belongs to" in c for c in clashes)
    store.remove(ids[:5], actor="test")
    # the stored form (ordinals, encoded documents in buckets) read back as meter ids and documents
    docs: dict[str, Any] = {str(k): v for k, v in store.documents()}
    expected: dict[str, set[str]] = {}
    for m, doc in docs.items():
        for key in index_keys(doc):
            expected.setdefault(key, set()).add(str(m))
    actual = {k: store.index_members(k) for k in r.scan_iter(keys.index("*", "*").replace("*:*", "*"))}
    assert {k: v for k, v in actual.items() if v} == expected
    assert set(store.all_meters()) == set(docs) == set(ids[5:])
