"""The stack.yml entries of versioned twins, and a stack file with them for local runs.

``ENTRIES`` is exactly what docs/upgrade.md asks to append under ``functions:`` of stack.yml
(plus ``GATEWAY_URL`` in the edge environment). :func:`write_stack` writes a copy of
stack.yml with them (handlers as absolute paths), which is what the tests and the
benchmark serve, so the documented entries are the tested ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
STACK = ROOT / "stack.yml"

#: Added to the environment of every edge function: forwards (read) and nudges (ingest) go here.
GATEWAY_URL = "${EDGE_GATEWAY_URL:-http://gateway.openfaas:8080}"

ENTRIES = """\
  # ---------------------------------------------------------------- versioned twins (docs/upgrade.md)
  edge-read-v2:
    lang: python3-http
    handler: ./functions/read-v2
    image: ${REGISTRY:-ghcr.io/metertwin}/read-v2:${TAG:-0.1.0}
    environment: *edge_env
    secrets: [token-signing-key, mqtt-password]
    labels:
      com.openfaas.scale.min: "1"
      com.openfaas.scale.max: "20"
      metertwin.zone: edge
      metertwin.capability: read
      metertwin.release: v2

  edge-ingest-v2:
    lang: python3-http
    handler: ./functions/ingest-v2
    image: ${REGISTRY:-ghcr.io/metertwin}/ingest-v2:${TAG:-0.1.0}
    environment: *edge_env
    secrets: [token-signing-key, mqtt-password]
    labels:
      com.openfaas.scale.min: "1"
      com.openfaas.scale.max: "20"
      metertwin.zone: edge
      metertwin.capability: ingest
      metertwin.release: v2
    # No topic annotation: edge-ingest (the front) parks v2 meters' readings and nudges this
    # function through /async-function. Move `topic` here when every twin is on v2.

  edge-upgrade-manager:
    lang: python3-http
    handler: ./functions/upgrade-manager
    image: ${REGISTRY:-ghcr.io/metertwin}/upgrade-manager:${TAG:-0.1.0}
    environment: *edge_env
    secrets: [token-signing-key, mqtt-password]
    labels:
      com.openfaas.scale.min: "1"
      com.openfaas.scale.max: "1"
      metertwin.zone: edge
    annotations:
      # The meters' rebind acks; the cron advances operations and drains inboxes whose nudge was lost.
      topic: meters/+/up/ack
      schedule: "*/1 * * * *"
"""


def stack_text(base: Path = STACK) -> str:
    """stack.yml with the entries appended (the edge env gets GATEWAY_URL), as text."""
    text = base.read_text()
    anchor = "    environment: &edge_env\n"
    if anchor not in text:
        raise ValueError(f"{base} has no '&edge_env' environment anchor to add GATEWAY_URL to")
    text = text.replace(anchor, anchor + f"      GATEWAY_URL: {GATEWAY_URL}\n", 1)
    head, sep, tail = text.partition("\n  # ---------------------------------------------------------------- zone-2")
    return head.rstrip("\n") + "\n\n" + ENTRIES + sep + tail


def write_stack(dst: Path, *, base: Path = STACK, schedule: str | None = None, zones: tuple[str, ...] = ("edge",),
                functions: tuple[str, ...] | None = None) -> Path:
    """Write the stack with the entries to ``dst`` (handlers made absolute so it may live anywhere).

    ``schedule`` replaces the manager's cron (e.g. ``*/1 * * * * *`` locally); ``zones`` and
    ``functions`` keep only those functions (a lighter gateway for tests).
    """
    doc: dict[str, Any] = yaml.safe_load(stack_text(base))
    kept = {}
    for name, fn in doc["functions"].items():
        if not any(name.startswith(f"{z}-") for z in zones):
            continue
        if functions is not None and name not in functions:
            continue
        fn["handler"] = str((base.parent / fn["handler"]).resolve())
        kept[name] = fn
    if schedule is not None and "edge-upgrade-manager" in kept:
        kept["edge-upgrade-manager"]["annotations"]["schedule"] = schedule
    doc["functions"] = kept
    dst.write_text(yaml.safe_dump(doc, sort_keys=False))
    return dst
