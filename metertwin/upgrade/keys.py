"""Redis keys and TTLs of the upgrade capability. One meter's keys share the hash tag ``{meter_id}`` (Redis Cluster)."""

from __future__ import annotations

from metertwin.core.keys import PREFIX


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
