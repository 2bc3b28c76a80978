"""MQTT topics between a meter and its twin, in one place.

Each meter owns the subtree ``meters/<meter_id>/``; the broker ACL confines the
meter's credentials to it (pattern ``meters/%u/#``), so the MQTT username of a
meter is its meter id. Twin services use a privileged account.

Direction is in the name: ``up`` is meter -> twin, ``down`` is twin -> meter.
"""

from __future__ import annotations

ROOT = "meters"

#: Broker ACL pattern granting a meter its own subtree only.
METER_ACL_PATTERN = f"{ROOT}/%u/#"


def meter_root(meter_id: str) -> str:
    return f"{ROOT}/{meter_id}"


# meter -> twin
def readings(meter_id: str) -> str:
    """Periodic readings, QoS1, with a sequence number."""
    return f"{ROOT}/{meter_id}/up/reading"


def command_acks(meter_id: str) -> str:
    """The meter's answer to a command: applied or rejected."""
    return f"{ROOT}/{meter_id}/up/ack"


def ems_up(meter_id: str) -> str:
    """Messages the meter forwards to its home EMS."""
    return f"{ROOT}/{meter_id}/up/ems"


def status(meter_id: str) -> str:
    """Retained ``online``/``offline`` (the meter's will message)."""
    return f"{ROOT}/{meter_id}/up/status"


def responses(meter_id: str, requester: str) -> str:
    """MQTT v5 response topic for one requesting twin process."""
    return f"{ROOT}/{meter_id}/up/resp/{requester}"


# twin -> meter
def read_requests(meter_id: str) -> str:
    """On-demand read requests (MQTT v5 request/response with correlation data)."""
    return f"{ROOT}/{meter_id}/down/read"


def commands(meter_id: str) -> str:
    """Write commands; the meter acks each on :func:`command_acks`."""
    return f"{ROOT}/{meter_id}/down/cmd"


def ems_down(meter_id: str) -> str:
    """Messages from the home EMS passed to the meter."""
    return f"{ROOT}/{meter_id}/down/ems"


def control(meter_id: str) -> str:
    """Control channel (rebind and other platform messages)."""
    return f"{ROOT}/{meter_id}/down/control"


# Wildcards the twin side subscribes to.
ALL_READINGS = f"{ROOT}/+/up/reading"
ALL_ACKS = f"{ROOT}/+/up/ack"
ALL_EMS_UP = f"{ROOT}/+/up/ems"
ALL_STATUS = f"{ROOT}/+/up/status"


def all_responses(requester: str) -> str:
    return f"{ROOT}/+/up/resp/{requester}"


def meter_id_of(topic: str) -> str:
    """Return the meter id in a ``meters/<id>/...`` topic."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != ROOT:
        raise ValueError(f"topic {topic!r} is not under {ROOT}/<meter_id>/")
    return parts[1]


# --- concentrators (data concentrator units, DCUs) -----------------------------------------
#: A concentrator owns ``dcu/<concentrator_id>/``; its account may also publish on the ``up``
#: topics (and receive the ``down`` topics) of the meters assigned to it, and nothing else.
CONCENTRATOR_ROOT = "dcu"


def concentrator_root(concentrator_id: str) -> str:
    return f"{CONCENTRATOR_ROOT}/{concentrator_id}"


def concentrator_readings(concentrator_id: str) -> str:
    """A batch of readings of the concentrator's meters (QoS1): ``{"readings": [{meter_id, seq, ts, ...}]}``."""
    return f"{CONCENTRATOR_ROOT}/{concentrator_id}/up/readings"


def concentrator_read_requests(concentrator_id: str) -> str:
    """On-demand reads of a meter behind the concentrator (``{"meter_id": ...}``, MQTT v5 request/response;
    the answer goes to the meter's own response topic, :func:`responses`)."""
    return f"{CONCENTRATOR_ROOT}/{concentrator_id}/down/read"


def concentrator_commands(concentrator_id: str) -> str:
    """Commands for a meter behind the concentrator (the command plus ``meter_id``); the concentrator
    publishes the meter's ack on the meter's own :func:`command_acks` topic."""
    return f"{CONCENTRATOR_ROOT}/{concentrator_id}/down/cmd"


ALL_CONCENTRATOR_READINGS = f"{CONCENTRATOR_ROOT}/+/up/readings"


def concentrator_id_of(topic: str) -> str:
    """Return the concentrator id in a ``dcu/<id>/...`` topic."""
    parts = topic.split("/")
    if len(parts) < 3 or parts[0] != CONCENTRATOR_ROOT:
        raise ValueError(f"topic {topic!r} is not under {CONCENTRATOR_ROOT}/<concentrator_id>/")
    return parts[1]


#: EMS-side topic for MQTT-routed EMS endpoints (configured per meter).
def ems_inbox(meter_id: str) -> str:
    return f"ems/{meter_id}/inbox"
