"""Every Redis key and TTL metertwin uses, in one place.

Keys use a ``mt:`` prefix and a hash tag ``{meter_id}`` where several keys of one
meter must live in the same Redis Cluster slot (so Lua scripts may touch them
together). TTL and size names carry their unit.
"""

from __future__ import annotations

PREFIX = "mt"

# --- twin state -----------------------------------------------------------------
#: Hash: the meter's shadow (version, reported, desired, metadata). No TTL: a twin
#: lives until the registry removes it.
def twin(meter_id: str) -> str:
    return f"{PREFIX}:twin:{{{meter_id}}}"


#: Set of every meter id provisioned in this zone.
TWIN_INDEX = f"{PREFIX}:twins"

# --- commands (write capability) ------------------------------------------------------
#: Hash per command: status, payload, timestamps. Kept this long after it ends.
COMMAND_RETENTION_S = 7 * 24 * 3600


def command(meter_id: str, command_id: str) -> str:
    return f"{PREFIX}:cmd:{{{meter_id}}}:{command_id}"


#: Sorted set of a meter's not-yet-finished command ids, scored by expiry (epoch s).
def pending_commands(meter_id: str) -> str:
    return f"{PREFIX}:cmdq:{{{meter_id}}}"


#: Sorted set of a meter's recent command ids, scored by creation time (epoch s).
def command_log(meter_id: str) -> str:
    return f"{PREFIX}:cmdlog:{{{meter_id}}}"


COMMAND_LOG_MAX = 200

# --- ingest ---------------------------------------------------------------------------
#: Sorted set of recently seen reading sequence numbers, for QoS1 redelivery dedupe.
def seen_sequences(meter_id: str) -> str:
    return f"{PREFIX}:seen:{{{meter_id}}}"


SEEN_SEQUENCES_MAX = 64

# --- forward (meter <-> home EMS) ----------------------------------------------------
def ems_route(meter_id: str) -> str:
    """Hash: where EMS messages of this meter go (``kind`` mqtt|webhook, ``target``)."""
    return f"{PREFIX}:ems:{{{meter_id}}}"


def forward_log(meter_id: str) -> str:
    """Stream of forwarded messages with their delivery status."""
    return f"{PREFIX}:fwd:{{{meter_id}}}"


FORWARD_LOG_MAXLEN = 500

# --- registry ---------------------------------------------------------------------------
def registry_entry(meter_id: str) -> str:
    """Hash: which edge zone serves the meter, its profile, its MQTT username."""
    return f"{PREFIX}:reg:{{{meter_id}}}"


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
