"""Redis keys of the local gateway (async queue, invocation counts, cron locks)."""

from __future__ import annotations

from metertwin.core.keys import PREFIX


# --- gateway ----------------------------------------------------------------------------
def async_queue(zone: str) -> str:
    """Stream of accepted ``/async-function`` calls for one zone's gateway."""
    return f"{PREFIX}:gw:{zone}:async"


ASYNC_GROUP = "gateway"
ASYNC_QUEUE_MAXLEN = 100_000


def invocation_counts(zone: str) -> str:
    """Hash: function name -> invocation count (shared by a zone's gateway workers)."""
    return f"{PREFIX}:gw:{zone}:invocations"


def schedule_lock(zone: str, function: str) -> str:
    """Lock so that one gateway worker fires a cron tick, not each of them."""
    return f"{PREFIX}:gw:{zone}:cron:{function}"


def connector_dead_letters(zone: str) -> str:
    """Stream of MQTT messages a zone's functions refused and did not keep themselves (gateway.dead_letters)."""
    return f"{PREFIX}:gw:{zone}:dead-letters"


#: Entries kept at most (approximate trim): the oldest go first.
CONNECTOR_DEAD_LETTERS_MAXLEN = 100_000
