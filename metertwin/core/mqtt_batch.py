"""The MQTT connector's batch call: many messages to one function in one invocation.

A function opts in with the stack.yml annotation ``mqtt-batch: "<max messages>/<max wait ms>"``
(e.g. ``"100/20"``); the connector then calls ``POST /mqtt-batch`` (header ``X-Connector:
mqtt-batch``) with ``{"messages": [{"topic": ..., "payload": ...}]}``, the payload bytes as a
Latin-1 string (lossless for any bytes, and JSON-escaped). The function answers 200 with
``{"results": [{"status": <HTTP status of that message>, "body": {...}}]}``, one per message
in order. The connector acknowledges each message whose status is final (not 429/502/503/504)
and invokes again with the rest; any other answer to the whole call (a 503, a crash) leaves
every message of the batch unacknowledged, to be delivered again.
"""

from __future__ import annotations

import json
from typing import Any

from metertwin.core import json_limits
from metertwin.core.errors import InvalidInput

PATH = "/mqtt-batch"
CONNECTOR = "mqtt-batch"
ANNOTATION = "mqtt-batch"


def encode(messages: list[tuple[str, bytes]]) -> bytes:
    """The request body of a batch call."""
    return json.dumps({"messages": [{"topic": t, "payload": p.decode("latin-1")} for t, p in messages]},
                      separators=(",", ":")).encode()


def decode(body: bytes) -> list[tuple[str, bytes]]:
    """``[(topic, payload bytes)]`` of a batch call; a malformed call is a 400 naming what is wrong."""
    try:
        data = json_limits.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInput(f"mqtt-batch body is not valid JSON: {exc}") from None
    messages = data.get("messages") if isinstance(data, dict) else None
    if not isinstance(messages, list):
        raise InvalidInput("mqtt-batch body has no 'messages' list", field="messages")
    out: list[tuple[str, bytes]] = []
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("topic"), str) and isinstance(m.get("payload"), str)):
            raise InvalidInput(f"messages[{i}] is not {{topic: str, payload: str}}", field=f"messages[{i}]")
        try:
            out.append((m["topic"], m["payload"].encode("latin-1")))
        except UnicodeEncodeError:
            raise InvalidInput(f"messages[{i}].payload is not Latin-1 encoded bytes", field=f"messages[{i}]") from None
    return out


def answer(results: list[tuple[int, dict[str, Any]]]) -> dict[str, Any]:
    """The 200 body of a batch call from ``[(status, body)]`` per message."""
    return {"results": [{"status": s, "body": b} for s, b in results]}


def parse_settings(value: str) -> tuple[int, float]:
    """``"<max messages>/<max wait ms>"`` -> (max messages, max wait in seconds)."""
    size, _, wait = value.partition("/")
    try:
        n, ms = int(size), float(wait or "20")
    except ValueError:
        raise ValueError(f"mqtt-batch {value!r} is not '<max messages>/<max wait ms>'") from None
    if not (1 <= n <= 10_000 and 0 <= ms <= 10_000):
        raise ValueError(f"mqtt-batch {value!r}: messages must be in [1, 10000], wait in [0, 10000] ms")
    return n, ms / 1000
