"""openleadr's parsed events (datetimes, timedeltas, nested dicts) -> the plain JSON ``dr-event`` takes."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any


def event_ids(event: Any) -> tuple[str, int] | None:
    """(event id, modification number) of a parsed event, or None if it has none."""
    try:
        descriptor = event["event_descriptor"]
        return str(descriptor["event_id"]), int(descriptor.get("modification_number") or 0)
    except (KeyError, TypeError, ValueError):
        return None


def _seconds(value: Any) -> float | None:
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, int | float):
        return float(value)
    return None


def _epoch(value: Any) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    return None


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _targets(targets: Any) -> list[dict[str, Any]]:
    """Target values as strings: openleadr turns an all-digit id ("0421", a meter number) into an int."""
    out = []
    for target in targets if isinstance(targets, list) else [targets]:
        if isinstance(target, dict):
            out.append({str(k): [str(x) for x in v] if isinstance(v, list) else str(v) for k, v in target.items()
                        if v is not None})
    return out


def normalize_event(event: Any) -> dict[str, Any]:
    """Best effort: what cannot be read is left out, and the function answers 454 (invalid data)."""
    if not isinstance(event, dict):
        return {"malformed": f"event is a {type(event).__name__}, not an object"}
    ids = event_ids(event)
    out: dict[str, Any] = {}
    if ids is not None:
        out["event_id"], out["modification_number"] = ids
    descriptor = event.get("event_descriptor") or {}
    out["status"] = descriptor.get("event_status", "far")
    out["market_context"] = descriptor.get("market_context")
    out["priority"] = descriptor.get("priority") or 0
    out["test_event"] = bool(descriptor.get("test_event") or False)
    out["response_required"] = event.get("response_required", "always")
    period = event.get("active_period") or {}
    start, duration = _epoch(period.get("dtstart")), _seconds(period.get("duration"))
    if start is not None:
        out["start"] = start
    if duration is not None:
        out["duration_s"] = duration
    tolerance = period.get("tolerance") or {}
    startafter = (tolerance.get("tolerate") or {}).get("startafter", tolerance.get("startafter"))
    out["startafter_s"] = _seconds(startafter) or 0.0
    out["recovery_s"] = max(0.0, _seconds(period.get("recovery") or period.get("recovery_period")) or 0.0)
    signals = event.get("event_signals") or []
    if isinstance(signals, dict):
        signals = signals.get("event_signals", [])
    out["signals"] = []
    for signal in signals if isinstance(signals, list) else []:
        if not isinstance(signal, dict):
            continue
        intervals = []
        cursor = start
        for interval in signal.get("intervals") or []:
            begin = _epoch(interval.get("dtstart")) if interval.get("dtstart") is not None else cursor
            length = _seconds(interval.get("duration"))
            payload = interval.get("signal_payload")
            if begin is None or length is None:
                intervals.append({"payload": payload})  # incomplete: the function rejects it
                continue
            intervals.append({"start": begin, "duration_s": length, "payload": payload})
            cursor = begin + length
        signal_id = signal.get("signal_id")
        measurement = signal.get("measurement") or {}
        out["signals"].append({"name": signal.get("signal_name"), "type": signal.get("signal_type"),
                               "id": None if signal_id is None else str(signal_id), "intervals": intervals,
                               # itemBase, itemUnits, siScaleCode: dr-event honours them, or rejects the signal
                               "item_base": _text(measurement.get("name")), "units": _text(measurement.get("unit")),
                               "scale": _text(measurement.get("scale"))})
    out["targets"] = _targets(event.get("targets") or [])
    return out
