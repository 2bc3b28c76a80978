"""Redis keys and TTLs of the dr capability. One meter's keys share the hash tag ``{meter_id}`` (Redis Cluster)."""

from __future__ import annotations

from metertwin.core.keys import PREFIX

# --- demand response ------------------------------------------------------------------
# Per-meter keys share the hash tag {meter_id}; see metertwin/dr/.
#: Demand-response records (event hashes, per-event indexes) are kept this long after the event, its
#: recovery and its randomization window are over (and at least this long after their last change).
DR_RETENTION_S = 7 * 24 * 3600


def dr_events(meter_id: str) -> str:
    """Hash: event id -> the twin's record of one OpenADR event (JSON: decision, plan, execution)."""
    return f"{PREFIX}:dr:ev:{{{meter_id}}}"


def dr_preferences(meter_id: str) -> str:
    """String: the consumer's demand-response preferences (JSON, metertwin.dr.decisions.Preferences)."""
    return f"{PREFIX}:dr:pref:{{{meter_id}}}"


def dr_load_control(meter_id: str) -> str:
    """String: the load limit the twin last sent the meter for DR (JSON: watts, events, command id, acked)."""
    return f"{PREFIX}:dr:lc:{{{meter_id}}}"


def dr_event_meters(event_id: str) -> str:
    """Hash: meter id -> that twin's answer to one event (JSON), for the operator's view."""
    return f"{PREFIX}:dr:evm:{{{event_id}}}"


def dr_opts(meter_id: str) -> str:
    """List: opt-outs (JSON) the twin's VEN is to send its VTN as ``oadrCreateOpt``."""
    return f"{PREFIX}:dr:opts:{{{meter_id}}}"


#: Set of the zone's meter ids with queued opt-outs (:func:`dr_opts`).
DR_OPTS_PENDING = f"{PREFIX}:dr:opts-pending"
#: Sorted set of the zone's event ids, scored by event start (epoch s).
DR_EVENT_INDEX = f"{PREFIX}:dr:events"
#: Sorted set of due DR actions (JSON members), scored by when they are due (epoch s).
DR_DUE = f"{PREFIX}:dr:due"
