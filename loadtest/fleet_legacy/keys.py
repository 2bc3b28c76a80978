"""Redis keys and sizes of the fleet capability.

Every key carries the one hash tag ``{fleet-ix}`` (see :mod:`metertwin.fleet`): the fleet index
is cross-meter by nature, so it lives in one slot; no key here is per meter.
"""

from __future__ import annotations

from metertwin.core.keys import PREFIX

_BASE = f"{PREFIX}:fleet:{{fleet-ix}}"

#: Hash: meter id -> its topology document (JSON with ``v`` version, ``at`` changed at epoch s).
TOPOLOGY = f"{_BASE}:topo"
#: Sorted set (all scores 0, ordered by meter id): every twin with a fleet record; the lexicographic
#: walk behind unfiltered and low-selectivity searches.
ALL_METERS = f"{_BASE}:all"
#: Hash: ``<level>:<node>`` -> the parent node (transformer -> feeder -> substation -> region).
TREE = f"{_BASE}:tree"
#: Stream: topology changes (meter, actor, at, old, new), capped near this many entries.
AUDIT = f"{_BASE}:audit"
AUDIT_MAXLEN = 100_000


def index(attribute: str, value: str) -> str:
    """Set: ids of the meters whose ``attribute`` is ``value`` (``group``/``tag`` members per entry)."""
    return f"{_BASE}:ix:{attribute}:{value}"
