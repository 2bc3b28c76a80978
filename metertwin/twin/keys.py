"""Redis keys and TTLs of the twin capability. One meter's keys share the hash tag ``{meter_id}`` (Redis Cluster)."""

from __future__ import annotations

from metertwin.core.keys import PREFIX


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


#: Set of meter ids that have open commands: what the sweeper visits.
METERS_WITH_OPEN_COMMANDS = f"{PREFIX}:cmdq:meters"


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


# --- concentrators (DCUs) -------------------------------------------------------------------
#: The twin hash field naming the concentrator a meter is behind (absent: the meter is direct).
#: It lives in the twin hash so that the ingest script checks it atomically with the reading.
ROUTE_FIELD = "dcu"


def concentrator(concentrator_id: str) -> str:
    """Hash: the concentrator's record (created, MQTT username). Hash tag ``{dcu:<id>}``."""
    return f"{PREFIX}:dcu:{{dcu:{concentrator_id}}}"


def concentrator_meters(concentrator_id: str) -> str:
    """Set: the meters assigned to the concentrator (the twin hash's ``dcu`` field is the authority)."""
    return f"{PREFIX}:dcu:{{dcu:{concentrator_id}}}:meters"


def concentrator_rejections(concentrator_id: str) -> str:
    """Stream: readings the concentrator sent for meters not assigned to it, with the reason."""
    return f"{PREFIX}:dcu:{{dcu:{concentrator_id}}}:rejected"


CONCENTRATOR_REJECTIONS_MAXLEN = 1000
#: Set of every concentrator id in this zone.
CONCENTRATOR_INDEX = f"{PREFIX}:dcus"
