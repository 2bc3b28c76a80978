"""Redis keys and sizes of the fleet capability.

Every key carries the one hash tag ``{fleet-ix}`` (see :mod:`metertwin.fleet`): the fleet index
is cross-meter by nature, so it lives in one slot; no key here is per meter.

**Ordinals.** Each twin with a fleet record gets an integer ordinal (``SEQ``, never reused), so
that the index sets hold small integers (``intset`` encoding: 4 bytes a member instead of ~55
for a meter id in a hashtable set) and the documents sit in small hashes of
:data:`DOC_BUCKET` ordinals each (``listpack`` encoding, no per-entry dictionary overhead).
"""

from __future__ import annotations

from metertwin.core.keys import PREFIX

_BASE = f"{PREFIX}:fleet:{{fleet-ix}}"

#: Prefix of the document buckets: hash ``<DOC_PREFIX><ordinal // DOC_BUCKET>``, field
#: ``<ordinal % DOC_BUCKET>`` -> ``"<meter id> <document>"`` (the document: see
#: :func:`metertwin.fleet.topology.encode`). The Lua scripts build these names from the ordinal;
#: they carry the hash tag, so they are in the slot of the script's declared keys.
DOC_PREFIX = f"{_BASE}:doc:"
#: Ordinals per document bucket: at most ``hash-max-listpack-entries`` (128 by default). A field read
#: scans its bucket, so 32 keeps a search's reads of thousands of candidates fast (about 3 bytes a
#: twin of key overhead).
DOC_BUCKET = 32
#: String: the last ordinal given (INCR).
SEQ = f"{_BASE}:seq"
#: Sorted set (all scores 0, ordered lexicographically): ``"<meter id> <ordinal>"`` of every twin
#: with a fleet record (a space sorts below every meter id character, so the order is the meter
#: ids'); the walk behind unfiltered and low-selectivity searches, and meter -> ordinal.
ALL_METERS = f"{_BASE}:all"
#: Hash: ``<level>:<node>`` -> the parent node (transformer -> feeder -> substation -> region).
TREE = f"{_BASE}:tree"
#: Stream: topology changes (meter, actor, at, old, new), capped near this many entries.
AUDIT = f"{_BASE}:audit"
AUDIT_MAXLEN = 100_000


def doc_bucket(ordinal: int) -> str:
    """Hash: the documents of ordinals ``ordinal // DOC_BUCKET * DOC_BUCKET`` and the next ``DOC_BUCKET - 1``."""
    return f"{DOC_PREFIX}{ordinal // DOC_BUCKET}"


def index(attribute: str, value: str) -> str:
    """Set: ordinals of the meters whose ``attribute`` is ``value`` (``group``/``tag`` members per entry)."""
    return f"{_BASE}:ix:{attribute}:{value}"
#: Set: ordinals of the twins whose reported ``online`` is true (the ``online`` filter, by index;
#: see :mod:`metertwin.fleet.status`). Not under ``:ix:``: it follows the twin, not the topology document.
ONLINE = f"{_BASE}:live:online"
#: Sorted set: ordinal -> ts of the twin's newest applied reading (the ``stale_s`` filter, by index).
LAST_READING = f"{_BASE}:live:last"
