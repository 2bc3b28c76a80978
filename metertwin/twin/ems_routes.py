"""Where a meter's messages to its home EMS may go: the checks behind ``PUT /meters/{id}/ems/route``.

A consumer (or the meter's EMS) chooses the route, and the platform's own accounts then
deliver to it, so a route is a request made with the platform's privileges (issue 10,
items 3 and 4):

* an **MQTT** target is published by the service account, which may publish anywhere:
  it must lie in the meter's own EMS namespace, ``ems/<meter_id>`` or below
  (:func:`metertwin.core.topics.ems_inbox` is the default), or be one of the operator's
  ``ems_mqtt_approved_topics`` (exact topics, or ``prefix/#``). Otherwise meter A's
  consumer could have A's messages published on meter B's EMS topic.
* a **webhook** is POSTed by the edge: it must pass the outbound destination policy
  (:mod:`metertwin.core.destinations`), when the route is set and again at every send
  (a route stored before a policy change, or a name that now resolves elsewhere).
"""

from __future__ import annotations

import json
import threading

import httpx

from metertwin.core import destinations, topics
from metertwin.core.destinations import DestinationPolicy, DestinationRefused, split_list
from metertwin.core.errors import InvalidInput
from metertwin.core.settings import Settings, get_settings

_lock = threading.Lock()
_shared: tuple[Settings, DestinationPolicy, httpx.Client] | None = None


def ems_namespace(meter_id: str) -> str:
    """The topic subtree a meter's EMS messages may be published in: ``ems/<meter_id>``."""
    return topics.ems_inbox(meter_id).rsplit("/", 1)[0]


def _unpublishable(topic: str) -> str | None:
    """The first character the broker refuses in a topic name, or None.

    Mosquitto disconnects a client that publishes a topic holding U+0000, another control
    character or a Unicode noncharacter ("malformed packet"). The service account's session
    then re-sends that QoS1 message at every reconnect and is disconnected again: every read,
    command and EMS message of the process fails. So such a target is refused outright.
    """
    for ch in topic:
        code = ord(ch)
        if (code < 0x20 or 0x7F <= code <= 0x9F or 0xD800 <= code <= 0xDFFF or 0xFDD0 <= code <= 0xFDEF
                or code & 0xFFFE == 0xFFFE):
            return f"U+{code:04X}"
    return None


def _approved(topic: str, approved: list[str]) -> bool:
    return any(topic == a or (a.endswith("/#") and topic.startswith(a[:-1])) for a in approved)


def mqtt_target_refusal(meter_id: str, target: str, settings: Settings | None = None) -> str | None:
    """Why ``target`` may not carry ``meter_id``'s EMS messages, or None when it may."""
    bad = _unpublishable(target)
    if bad is not None:
        return f"MQTT target {target!r} holds {bad}, which MQTT brokers refuse in a topic name"
    namespace = ems_namespace(meter_id)
    if target == namespace or target.startswith(namespace + "/"):
        return None
    if _approved(target, split_list((settings or get_settings()).ems_mqtt_approved_topics)):
        return None
    return (f"MQTT target {target!r} is outside meter {meter_id!r}'s EMS namespace {namespace}/ "
            "and not in ems_mqtt_approved_topics")


def check_route(meter_id: str, kind: str, target: str | None) -> str:
    """The target to store for ``meter_id``'s route; raises a 400 naming a refused one."""
    if kind == "mqtt":
        topic = target or topics.ems_inbox(meter_id)
        reason = mqtt_target_refusal(meter_id, topic)
        if reason is not None:
            raise InvalidInput(reason, field="target")
        return topic
    if not target:
        raise InvalidInput("a webhook route needs a target URL", field="target")
    _client()[0].check_url(target, "webhook target")
    return target


def _client() -> tuple[DestinationPolicy, httpx.Client]:
    """The process's guarded webhook client, rebuilt when the settings were reset (tests)."""
    global _shared
    settings = get_settings()
    with _lock:
        if _shared is None or _shared[0] is not settings:
            if _shared is not None:
                _shared[2].close()
            policy = destinations.policy_from_settings(settings)
            _shared = (settings, policy, destinations.guarded_client(policy))
        return _shared[1], _shared[2]


def send_webhook(meter_id: str, url: str, data: dict[str, object]) -> str | None:
    """POST ``data`` to ``url`` through the destination policy; the problem, or None when delivered."""
    policy, client = _client()
    try:
        policy.check_url(url, "webhook target")
        status, _ = destinations.post(client, policy, url, content=json.dumps(data).encode(),
                                      headers={"Content-Type": "application/json", "X-Meter-Id": meter_id})
    except DestinationRefused as exc:
        return exc.message
    except httpx.HTTPError as exc:
        return f"webhook {url}: {exc!r}"
    if status >= 300:
        return f"webhook {url} answered {status}"
    return None
