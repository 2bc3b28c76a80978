"""Reading and shaping OpenADR 2.0b XML where openleadr 0.5.36 falls short for a VEN.

Incoming (:func:`read_message`):

* one schema-invalid event makes openleadr drop the whole ``oadrDistributeEvent`` (and the
  VTN resend it forever, blocking every later event). Here the message is validated event by
  event: the valid events are parsed and answered as usual, each invalid one is returned in
  ``payload["rejected_events"]`` with an OpenADR response code (460 for an unknown signal
  name, else 454) and the schema's own description, so the VEN can answer it;
* openleadr's parser turns every all-digit text into an int (``0042001234`` -> 42001234):
  identifiers (event, VEN, VTN, resource, group, party, request, report ids) stay strings.

Outgoing (:func:`shape_signed_object`), applied before signing:

* ``oadrCreatePartyRegistration`` without a transport address leaves the optional
  ``oadrTransportAddress`` out instead of sending the literal text ``None``;
* the TELEMETRY_STATUS data points (r_id ending in ``-status``) carry an
  ``oadrPayloadResourceStatus`` (online, manual override, load control state), which
  openleadr's templates cannot render, instead of a float.
"""

from __future__ import annotations

import copy
from typing import Any

import xmltodict
from lxml import etree
from openleadr import messaging, utils

OADR = "http://openadr.org/oadr-2.0b/2012/07"
EI = "http://docs.oasis-open.org/ns/energyinterop/201110"
EMIX = "http://docs.oasis-open.org/ns/emix/2011/06"
_SCHEMA = messaging.XML_SCHEMA
# No DTDs, entities or network: the VTN is a remote party.
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=False, remove_blank_text=False)

#: XML element names whose text is an identifier: kept as strings, never turned into numbers.
ID_ELEMENTS = frozenset((
    "eventID", "venID", "vtnID", "requestID", "registrationID", "resourceID", "groupID", "groupName",
    "partyID", "optID", "reportRequestID", "reportSpecifierID", "rID", "signalID", "marketContext",
    "eiReportID", "reportID",
))

#: OpenADR response codes the VEN gives events it cannot read.
INVALID_DATA = 454
SIGNAL_NOT_SUPPORTED = 460

STATUS_SUFFIX = "-status"


class _Keep:
    """An identifier's text, opaque to openleadr's normaliser (which would make ``"0421"`` the int 421)."""

    __slots__ = ("text",)

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        # openleadr's normaliser str()s some ids itself (oadrPendingReports' reportRequestIDs)
        return self.text


def _wrap_ids(node: Any) -> Any:
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            local = key.rsplit(":", 1)[-1]
            if local in ID_ELEMENTS:
                if isinstance(value, str):
                    value = _Keep(value)
                elif isinstance(value, list):
                    value = [_Keep(v) if isinstance(v, str) else _wrap_ids(v) for v in value]
                else:
                    value = _wrap_ids(value)
            else:
                value = _wrap_ids(value)
            out[key] = value
        return out
    if isinstance(node, list):
        return [_wrap_ids(v) for v in node]
    return node


def _unwrap(node: Any) -> Any:
    if isinstance(node, _Keep):
        return node.text
    if isinstance(node, dict):
        return {k: _unwrap(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_unwrap(v) for v in node]
    return node


def parse_tree(tree: etree._Element) -> tuple[str, dict[str, Any]]:
    """openleadr's ``parse_message`` on a parsed tree, with identifiers kept as strings."""
    raw = xmltodict.parse(etree.tostring(tree), process_namespaces=True, namespaces=messaging.NAMESPACES)
    message_type, payload = raw["oadrPayload"]["oadrSignedObject"].popitem()
    return message_type, _unwrap(utils.normalize_dict(_wrap_ids(payload)))


def _text(element: etree._Element, local: str) -> str | None:
    found = element.find(f".//{{{EI}}}{local}")
    return None if found is None or found.text is None else found.text.strip()


def _events(tree: etree._Element) -> list[etree._Element]:
    return list(tree.iter(f"{{{OADR}}}oadrEvent"))


def _rejection(event: etree._Element, code: int, description: str) -> dict[str, Any]:
    rr = event.find(f"{{{OADR}}}oadrResponseRequired")
    mod = _text(event, "modificationNumber")
    return {"event_id": _text(event, "eventID"),
            "modification_number": int(mod) if mod and mod.lstrip("-").isdigit() else 0,
            "response_required": (rr.text or "always").strip() if rr is not None else "always",
            "response_code": code, "description": description[:500]}


def _only_event(tree: etree._Element, index: int) -> etree._Element:
    """A copy of the message holding only its ``index``-th event."""
    clone = copy.deepcopy(tree)
    for i, event in enumerate(_events(clone)):
        if i != index:
            event.getparent().remove(event)
    return clone


def _schema_error() -> tuple[int, str]:
    errors = list(_SCHEMA.error_log)
    text = "; ".join(f"line {e.line}: {e.message}" for e in errors[:3]) or "schema-invalid"
    code = SIGNAL_NOT_SUPPORTED if any("signalName" in e.message for e in errors) else INVALID_DATA
    return code, f"event rejected: {text}"


def read_message(content: bytes, vtn_fingerprint: str | None = None) -> tuple[str, dict[str, Any]]:
    """Validate, check the signature (if a fingerprint is set) and parse one VTN message.

    Raises ``etree.XMLSyntaxError`` or a signature error for a message that is not OpenADR at
    all; an ``oadrDistributeEvent`` with bad events is *not* an error (see the module doc).
    """
    tree = etree.fromstring(content, _PARSER)
    if vtn_fingerprint:
        messaging.validate_xml_signature(tree, cert_fingerprint=vtn_fingerprint)
    if _SCHEMA.validate(tree):
        try:
            return parse_tree(tree)
        except Exception:  # schema-valid yet unreadable: try the events one by one below
            if not _events(tree):
                raise
    events = _events(tree)
    if not events:
        raise etree.XMLSyntaxError(_schema_error()[1], None, 0, 0)
    good: list[int] = []
    rejected: list[dict[str, Any]] = []
    for i, event in enumerate(events):
        single = _only_event(tree, i)
        if not _SCHEMA.validate(single):
            rejected.append(_rejection(event, *_schema_error()))
            continue
        try:
            parse_tree(single)
        except Exception as exc:
            rejected.append(_rejection(event, INVALID_DATA, f"event rejected: unreadable: {exc}"))
            continue
        good.append(i)
    kept = copy.deepcopy(tree)
    for i, event in enumerate(_events(kept)):
        if i not in good:
            event.getparent().remove(event)
    if not _SCHEMA.validate(kept):
        raise etree.XMLSyntaxError(_schema_error()[1], None, 0, 0)
    message_type, payload = parse_tree(kept)
    payload.setdefault("events", [])
    payload["rejected_events"] = rejected
    return message_type, payload


# --- outgoing -------------------------------------------------------------------------
def _status_payload(status: dict[str, Any]) -> etree._Element:
    """``oadrPayloadResourceStatus``: online, manual override and (when a limit is in force) its set point."""
    el = etree.Element(f"{{{OADR}}}oadrPayloadResourceStatus", nsmap={"oadr": OADR})
    etree.SubElement(el, f"{{{OADR}}}oadrOnline").text = "true" if status.get("online") else "false"
    etree.SubElement(el, f"{{{OADR}}}oadrManualOverride").text = "true" if status.get("manual_override") else "false"
    limit = status.get("load_limit_w")
    if limit is not None:
        state = etree.SubElement(el, f"{{{OADR}}}oadrLoadControlState")
        point = etree.SubElement(state, f"{{{OADR}}}oadrSetPoint")
        etree.SubElement(point, f"{{{OADR}}}oadrCurrent").text = repr(float(limit))
        if status.get("baseline_w") is not None:
            etree.SubElement(point, f"{{{OADR}}}oadrNormal").text = repr(float(status["baseline_w"]))
    return el


def shape_signed_object(message_type: str, signed_object: str, statuses: list[dict[str, Any]] | None = None) -> str:
    """Fix what openleadr renders wrongly or cannot render (see the module doc).

    ``statuses``: the status of each ``-status`` data point, whose rendered float value is its
    index in this list (the report machinery carries floats only).
    """
    if message_type == "oadrCreatePartyRegistration" and "<oadr:oadrTransportAddress>None<" in signed_object:
        return signed_object.replace("<oadr:oadrTransportAddress>None</oadr:oadrTransportAddress>", "")
    if message_type != "oadrUpdateReport" or not statuses:
        return signed_object
    tree = etree.fromstring(signed_object.encode())
    changed = False
    for payload in tree.iter(f"{{{OADR}}}oadrReportPayload"):
        r_id = payload.find(f"{{{EI}}}rID")
        number = payload.find(f"{{{EI}}}payloadFloat")
        if r_id is None or number is None or not (r_id.text or "").endswith(STATUS_SUFFIX):
            continue
        value = number.find(f"{{{EI}}}value")
        try:
            status = statuses[int(float((value.text if value is not None else None) or "x"))]
        except (ValueError, IndexError):
            continue
        number.addprevious(_status_payload(status))
        payload.remove(number)
        changed = True
    return etree.tostring(tree).decode() if changed else signed_object
