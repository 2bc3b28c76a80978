"""The grid capability (fog zone): aggregates up the grid tree and threshold rules on them.

Modules:

* :mod:`~metertwin.grid.places` — the fog's copy of each meter's place in the tree
  (transformer → feeder → substation → region), versioned like the edge topology it mirrors;
* :mod:`~metertwin.grid.aggregates` — the interface the MDMS ingest calls after each reading:
  one Lua script in the meter's slot turns the reading into an outbox entry, then one script per
  tree node (each under its own hash tag) applies it, then the outbox entry is acknowledged;
* :mod:`~metertwin.grid.agg_scripts` — those Lua scripts;
* :mod:`~metertwin.grid.load` — node summaries and load history (JSON/CSV), hot and cold;
* :mod:`~metertwin.grid.archive` — aggregate history to S3, like meter intervals;
* :mod:`~metertwin.grid.rules` — threshold rules (validation, store);
* :mod:`~metertwin.grid.evaluate` — rule evaluation with hysteresis and minimum duration,
  alerts (one open per rule and subject) and notifications;
* :mod:`~metertwin.grid.keys`, :mod:`~metertwin.grid.settings`.

See docs/grid.md.
"""
