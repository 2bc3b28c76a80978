"""Redis keys of the grid capability (fog Redis). Prefix ``mt:grid:``.

* per meter, hash tag ``{meter_id}`` (the MDMS keys' slot): its place and aggregation state, the
  outbox of node updates not yet acknowledged, the reading timestamps recently aggregated;
* per tree node, hash tag ``{grid:<level>:<node>}``: one slot per node, so the update of one node
  is one script; a reading touches up to four nodes (see :mod:`metertwin.grid.aggregates`);
* per rule, hash tag ``{grid-rule:<id>}``: its subjects' states, its alerts and open-alert index;
* zone-wide (``{grid-ix}``): the rule list and the known nodes per level.
"""

from __future__ import annotations

from metertwin.core.keys import PREFIX

LEVELS = ("transformer", "feeder", "substation", "region")


def meter_state(meter_id: str) -> str:
    """Hash: place (``p_<level>``, ``p_v``), counted path (``c_<level>``), latest ``ts``/``pw``/``v``, counter ``n``."""
    return f"{PREFIX}:grid:m:{{{meter_id}}}"


def meter_outbox(meter_id: str) -> str:
    """Sorted set: node updates (JSON) scored by their number ``n``, removed once every node applied them."""
    return f"{PREFIX}:grid:out:{{{meter_id}}}"


def _node(level: str, node: str) -> str:
    return f"{PREFIX}:grid:n:{{grid:{level}:{node}}}"


def node_state(level: str, node: str) -> str:
    """Hash: ``import_w``, ``export_w`` (sums of each meter's latest power), ``at_ms`` (last update)."""
    return f"{_node(level, node)}:cur"


def node_meters(level: str, node: str) -> str:
    """Hash: meter id -> ``n|ts_ms|power_w|voltage_v``: what the node counts of each meter below it."""
    return f"{_node(level, node)}:m"


def node_seen(level: str, node: str) -> str:
    """Sorted set: meter id scored by its latest reading (ms): reporting, online, stale by ZCOUNT."""
    return f"{_node(level, node)}:seen"


def node_voltage(level: str, node: str) -> str:
    """Sorted set: meter id scored by its latest voltage (V): min and max by rank."""
    return f"{_node(level, node)}:volt"


def node_history(level: str, node: str) -> str:
    """Hash: per interval start ``<ms>:i|e|n|lo|hi|pk`` (kWh in, kWh out, readings, V min, V max, peak W)."""
    return f"{_node(level, node)}:h"


def node_buckets(level: str, node: str) -> str:
    """Sorted set: interval starts (ms) with hot history; what the archive visits and trims."""
    return f"{_node(level, node)}:hb"


def node_cold_days(level: str, node: str) -> str:
    """Hash: UTC day ``yyyymmdd`` -> the committed S3 object of its archived history (written with the trim)."""
    return f"{_node(level, node)}:cold"


def nodes(level: str) -> str:
    """Sorted set: nodes of ``level`` that ever had a meter (score: first seen, epoch s)."""
    return f"{PREFIX}:grid:{{grid-ix}}:nodes:{level}"


#: Hash: rule id -> rule JSON.
RULES = f"{PREFIX}:grid:{{grid-ix}}:rules"
#: Lock so that one rule evaluation / archive runs at a time (seconds it may hold it).
EVAL_LOCK = f"{PREFIX}:grid:{{grid-ix}}:eval-lock"
ARCHIVE_LOCK = f"{PREFIX}:grid:{{grid-ix}}:archive-lock"
LOCK_TTL_S = 300


def rule_states(rule_id: str) -> str:
    """Hash: subject -> JSON state (``since`` the condition holds, ``open`` alert id)."""
    return f"{PREFIX}:grid:r:{{grid-rule:{rule_id}}}:state"


def rule_alerts(rule_id: str) -> str:
    """Hash: alert id -> alert JSON (the rule's alerts, open and closed, capped by ``GRID_ALERTS_MAX``)."""
    return f"{PREFIX}:grid:r:{{grid-rule:{rule_id}}}:alerts"


def rule_alert_order(rule_id: str) -> str:
    """Sorted set: alert id scored by opened at (epoch s): listing, capping."""
    return f"{PREFIX}:grid:r:{{grid-rule:{rule_id}}}:order"


#: String: the edge topology audit stream id up to which places were copied (:mod:`metertwin.grid.places`).
PLACES_CURSOR = f"{PREFIX}:grid:{{grid-ix}}:places-cursor"
#: String: where the last bounded rule evaluation stopped (rule index, subject offset) for the next tick.
EVAL_CURSOR = f"{PREFIX}:grid:{{grid-ix}}:eval-cursor"
#: String with a TTL: set by the cron tick that runs the archive, so it runs at most this often.
ARCHIVE_DUE = f"{PREFIX}:grid:{{grid-ix}}:archive-due"
ARCHIVE_EVERY_S = 3600
#: Set: meters whose outbox may hold entries not applied yet (written after the MDMS script; drained).
DIRTY = f"{PREFIX}:grid:{{grid-ix}}:dirty"
