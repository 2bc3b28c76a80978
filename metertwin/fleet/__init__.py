"""The fleet capability: where each twin sits in the grid (topology) and finding twins by it (search).

Modules:

* :mod:`~metertwin.fleet.topology` — the topology of one twin (region, substation, feeder,
  transformer, phase, location, tariff, customer class, groups, tags): validation, versioned
  writes (``If-Match``) that update the search indexes in the same Lua script, the audit stream;
* :mod:`~metertwin.fleet.importer` — bulk topology from CSV (the GIS/CIS export), per-row errors;
* :mod:`~metertwin.fleet.search` — ``GET /meters`` filters, ``count`` and cursor paging;
* :mod:`~metertwin.fleet.live` — the live filters checked inside Redis (single Redis);
* :mod:`~metertwin.fleet.status` — the live indexes (online, last reading) the twin paths write;
* :mod:`~metertwin.fleet.keys` — Redis keys and sizes.

**Redis Cluster.** A search intersects index sets of many meters, so the index cannot live in
each meter's slot. The documented choice: every fleet key (the topology documents, the
per-value index sets, the tree of parents, the audit stream) shares one hash tag,
``{fleet-ix}``, so each topology write (document + indexes + audit) is one Lua script and
each search one script with ``SINTERCARD``/``SINTER``, on a single Redis and on Cluster alike.
The price is that the whole zone's fleet index sits on one shard (about 0.35-0.55 KB per twin
with its indexes and audit, see ``loadtest.fleet_bench`` and docs/benchmarks.md): a few million
twins per zone.

**Storage.** Each twin with a fleet record has an integer ordinal; index sets hold ordinals
(``intset`` up to ``set-max-intset-entries``), documents are compact JSON arrays in hashes of 32
ordinals (``listpack``), and the id-ordered set of all meters holds ``"<meter> <ordinal>"`` (see
:mod:`metertwin.fleet.keys`). A zone beyond that would split
the index by region (tag ``{fleet-ix:<region>}``) and fan a search out over the regions.
The topology document therefore is a field of the fleet hash, not a key in the meter's slot;
the twin's own keys (``mt:twin:{meter}``) are untouched.

**Live filters.** ``online`` and ``stale_s`` are answered from two live indexes in the fleet slot
(:mod:`~metertwin.fleet.status`: the set of online ordinals, written where the twin's reported
``online`` changes, and ordinal -> last reading ts, written after each batch of applied readings);
they follow the twin one round trip behind (bounds documented there). ``release``,
``has_pending_commands`` and ``dr_opted_out`` are read from their sources of truth (the twin hash,
the command queue, the DR preferences) for each candidate left, at query time. On a single Redis
one script does both inside Redis (:mod:`~metertwin.fleet.live`); on Redis Cluster the twins are in
other slots, so the candidates are checked from Python, pipelined (about ten times the cost a
candidate; that path still reads ``online``/``stale_s`` from the twins).
"""
