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


# --- p2p market ----------------------------------------------------------------------------
# One hash tag per market, so a market's keys share a Redis Cluster slot.
def p2p_market(market_id: str) -> str:
    """Hash: a market's spec (JSON), status, result (JSON), timestamps."""
    return f"{PREFIX}:p2p:{{{market_id}}}:market"


def p2p_participants(market_id: str) -> str:
    """Hash: meter id -> participant profile (JSON) of one market."""
    return f"{PREFIX}:p2p:{{{market_id}}}:participants"


def p2p_rounds(market_id: str) -> str:
    """List: one JSON record per negotiation round, in order."""
    return f"{PREFIX}:p2p:{{{market_id}}}:rounds"


def p2p_trades(market_id: str) -> str:
    """Hash: meter id -> final trade and settlement (JSON) of one market."""
    return f"{PREFIX}:p2p:{{{market_id}}}:trades"


def p2p_meter_trades(meter_id: str) -> str:
    """Sorted set: ids of the markets a meter traded in, scored by slot start (epoch s)."""
    return f"{PREFIX}:p2p:mtrades:{{{meter_id}}}"


#: Sorted set of every market id in this zone, scored by slot start (epoch s).
P2P_MARKETS = f"{PREFIX}:p2p:markets"
#: Round records are for watching a market converge; trades and settlements are kept.
P2P_ROUNDS_RETENTION_S = 7 * 24 * 3600
#: A market may have at most this many participants (one round must fit a round timeout).
P2P_MAX_PARTICIPANTS = 5_000


# --- mdms -------------------------------------------------------------------------------
# The MDMS hot tier (fog Redis). Per-meter keys share the hash tag {meter_id} so that the
# ingest, edit and trim Lua scripts may touch them together. Interval data have no TTL on
# purpose: they leave Redis only through the archive protocol (verified copy in S3 first),
# bounded by MDMS_HOT_RETENTION_S and MDMS_HOT_MEMORY_BUDGET_BYTES (metertwin/mdms_settings.py).
def mdms_intervals(meter_id: str) -> str:
    """Sorted set: the meter's hot interval rows, scored by timestamp (epoch ms); see metertwin/intervals.py."""
    return f"{PREFIX}:mdms:iv:{{{meter_id}}}"


def mdms_sequences(meter_id: str) -> str:
    """Sorted set: accepted sequence numbers -> timestamp (epoch ms), trimmed to the VEE horizon."""
    return f"{PREFIX}:mdms:seq:{{{meter_id}}}"


def mdms_latest(meter_id: str) -> str:
    """Hash: the latest accepted registers (ts_ms, seq, import_kwh, export_kwh, power_w, voltage_v)."""
    return f"{PREFIX}:mdms:latest:{{{meter_id}}}"


def mdms_counters(meter_id: str) -> str:
    """Hash: per-meter counters (accepted, duplicates, rejected, estimated, edited, queried)."""
    return f"{PREFIX}:mdms:count:{{{meter_id}}}"


def mdms_heat(meter_id: str) -> str:
    """Hash: tiering heat per UTC day ``r:<yyyymmdd>`` reads, ``l:`` last read (epoch s), ``h:`` hot until."""
    return f"{PREFIX}:mdms:heat:{{{meter_id}}}"


def mdms_cold_days(meter_id: str) -> str:
    """Sorted set: UTC days (``yyyymmdd``, scored by day start epoch s) with a committed cold copy."""
    return f"{PREFIX}:mdms:cold:{{{meter_id}}}"


def mdms_audit(meter_id: str) -> str:
    """Stream: the meter's edit audit trail (who, when, old, new, reason). Never trimmed."""
    return f"{PREFIX}:mdms:audit:{{{meter_id}}}"


#: Set of meter ids with hot interval data: what the archive visits.
MDMS_HOT_METERS = f"{PREFIX}:mdms:hot"
#: Set of every meter id the MDMS has accepted a reading of.
MDMS_METERS = f"{PREFIX}:mdms:meters"
#: Stream: rejected readings with the reason (the dead-letter store), capped at MDMS_DEAD_LETTER_MAX.
MDMS_DEAD_LETTERS = f"{PREFIX}:mdms:dlq"


def mdms_cold_partition(zone: str, day: str, bucket: int) -> str:
    """String: cache of the committed cold object key of one partition (the S3 manifest is the truth)."""
    return f"{PREFIX}:mdms:part:{zone}:{day}:{bucket:04d}"


#: Lock so that one archive run works at a time (seconds it may hold it).
MDMS_ARCHIVE_LOCK = f"{PREFIX}:mdms:archive:lock"
MDMS_ARCHIVE_LOCK_TTL_S = 900
#: Hash: summary of the last archive run (for operators).
MDMS_ARCHIVE_LAST_RUN = f"{PREFIX}:mdms:archive:last"


# --- demand response ------------------------------------------------------------------
# Per-meter keys share the hash tag {meter_id}; see metertwin/dr.py.
#: Demand-response records (event hashes, per-event indexes) are kept this long after their last change.
DR_RETENTION_S = 7 * 24 * 3600


def dr_events(meter_id: str) -> str:
    """Hash: event id -> the twin's record of one OpenADR event (JSON: decision, plan, execution)."""
    return f"{PREFIX}:dr:ev:{{{meter_id}}}"


def dr_preferences(meter_id: str) -> str:
    """String: the consumer's demand-response preferences (JSON, metertwin.dr.Preferences)."""
    return f"{PREFIX}:dr:pref:{{{meter_id}}}"


def dr_load_control(meter_id: str) -> str:
    """String: the load limit the twin last sent the meter for DR (JSON: watts, events, command id, acked)."""
    return f"{PREFIX}:dr:lc:{{{meter_id}}}"


def dr_event_meters(event_id: str) -> str:
    """Hash: meter id -> that twin's answer to one event (JSON), for the operator's view."""
    return f"{PREFIX}:dr:evm:{{{event_id}}}"


#: Sorted set of the zone's event ids, scored by event start (epoch s).
DR_EVENT_INDEX = f"{PREFIX}:dr:events"
#: Sorted set of due DR actions (JSON members), scored by when they are due (epoch s).
DR_DUE = f"{PREFIX}:dr:due"


# --- upgrade ----------------------------------------------------------------------------
# Versioned twins (docs/upgrade.md). A twin's binding is the field ``b`` of its twin hash
# (absent: the base release ``v1``). Per-meter keys share the hash tag {meter_id} so that
# the ingest, switch and migration Lua scripts touch them together; an operation's keys
# share the hash tag {op_id}.
def upgrade_release(release: str) -> str:
    """Hash: capability -> function name (without zone prefix) of one release; immutable once used."""
    return f"{PREFIX}:upg:rel:{release}"


def upgrade_inbox(meter_id: str) -> str:
    """Sorted set: readings parked for the version the meter is bound to (``seq|json``, scored by seq)."""
    return f"{PREFIX}:upg:inbox:{{{meter_id}}}"


def upgrade_inboxes(release: str) -> str:
    """Set: meter ids with readings parked for ``release``: what its drainer visits."""
    return f"{PREFIX}:upg:inboxes:{release}"


def upgrade_drainer(release: str) -> str:
    """String: set while a drainer of ``release`` is nudged or running (one at a time; expires if it dies)."""
    return f"{PREFIX}:upg:drainer:{release}"


UPGRADE_DRAINER_TTL_MS = 15_000


def upgrade_switch(meter_id: str) -> str:
    """Hash: the meter's switch between versions (op, from, to, phase, rebind ids, counters)."""
    return f"{PREFIX}:upg:sw:{{{meter_id}}}"


def twin_v2(meter_id: str) -> str:
    """Hash: release v2's twin state schema (registers in Wh, last seq, applied count)."""
    return f"{PREFIX}:tw2:{{{meter_id}}}"


def twin_v2_history(meter_id: str) -> str:
    """Sorted set: release v2's recent readings (``seq|json``, scored by seq), capped at TWIN_V2_HISTORY_MAX."""
    return f"{PREFIX}:tw2h:{{{meter_id}}}"


TWIN_V2_HISTORY_MAX = 96

#: Sorted set of upgrade operation ids, scored by creation time (epoch s).
UPGRADE_OPS = f"{PREFIX}:upg:ops"


def upgrade_op(op_id: str) -> str:
    """Hash: one upgrade operation (spec, state, counters, health snapshot)."""
    return f"{PREFIX}:upg:op:{{{op_id}}}"


def upgrade_op_set(op_id: str, phase: str) -> str:
    """Set: the operation's meter ids in one phase (queued, prepared, ..., done, failed, rolled_back)."""
    return f"{PREFIX}:upg:op:{{{op_id}}}:{phase}"


def upgrade_op_lock(op_id: str) -> str:
    """String: the manager instance advancing the operation (one at a time)."""
    return f"{PREFIX}:upg:op:{{{op_id}}}:lock"


UPGRADE_OP_LOCK_TTL_S = 15
