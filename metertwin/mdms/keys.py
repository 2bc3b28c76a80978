"""Redis keys and TTLs of the mdms capability. One meter's keys share the hash tag ``{meter_id}`` (Redis Cluster)."""

from __future__ import annotations

from metertwin.core.keys import PREFIX


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
