"""VEE: validation, estimation and editing of meter readings on their way into the hot tier.

Validation rules (each rejection names its ``rule`` and goes to the dead-letter store):

* ``json`` / ``depth`` / ``schema`` / ``range`` / ``units`` / ``oversized``: the payload is a
  :class:`metertwin.twin.messages.Reading` (kWh, W, V) within the model's value ranges, nested at
  most :data:`metertwin.core.json_limits.MAX_DEPTH` deep; ``seq`` a JSON integer in
  ``[0, MAX_SEQ]`` (``"3"`` is rejected, as at the edge);
* ``future``: ``ts`` is no more than ``MDMS_CLOCK_SKEW_S`` ahead of the MDMS clock;
* ``too_old``: ``ts`` is no older than ``MDMS_HORIZON_S`` (both: the edge's rule too,
  :class:`metertwin.twin.messages.TimestampRule`);
* ``unknown_meter``: the meter is registered or already known to the MDMS;
* ``sequence_reused``: a sequence number already accepted for another timestamp;
  the same (seq, ts) again is a QoS1 redelivery: answered ``duplicate``, counted once;
* ``timestamp_taken``: another reading already has this timestamp;
* ``register_backwards``: cumulative registers never decrease in time order.

Suspect (accepted, flagged): voltage outside the nominal band, or an average demand
since the previous read, or until the next one (a back-load on another register baseline),
above ``MDMS_MAX_DEMAND_KW``. Estimation (in the ingest Lua script,
:mod:`metertwin.mdms.hot_store`): a gap of more than 1.5 intervals between two reads gets one
``estimated`` row per interval boundary, registers linear between the reads, unless the gap's
average demand is above ``MDMS_MAX_DEMAND_KW`` (a register discontinuity stays missing, never
smoothed over); a later actual read inside the gap replaces the estimates. A verdict's
``estimated`` counts rows added net of those it replaced, so a batch's sum is what it left
estimated. Editing: :func:`edit`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, cast

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from metertwin.core import json_limits, topics
from metertwin.core.errors import Conflict, InvalidInput, NotFound, PayloadTooLarge
from metertwin.core.http import METER_ID_RE, describe_validation_error
from metertwin.mdms import dead_letters, hot_store, keys
from metertwin.mdms.intervals import Row, iso_ms
from metertwin.mdms.settings import MdmsSettings, get_mdms_settings
from metertwin.twin.messages import MAX_SEQ, Reading, TimestampRejected, TimestampRule

Finite = Annotated[float, Field(allow_inf_nan=False)]
_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}


class ReadingRejected(InvalidInput):
    """A reading broke a VEE rule; it is in the dead-letter store."""

    code = "reading_rejected"


class Rejection(Exception):
    """Internal: a VEE rule failed (``rule`` is machine-readable, ``reason`` names the value)."""

    def __init__(self, rule: str, reason: str) -> None:
        super().__init__(reason)
        self.rule = rule
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Verdict:
    """What became of one reading."""

    status: Literal["accepted", "duplicate", "rejected"]
    meter_id: str
    seq: int | None = None
    ts_ms: int | None = None
    quality: str | None = None
    estimated: int = 0
    rule: str | None = None
    reason: str | None = None
    dead_letter_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in {
            "status": self.status, "meter_id": self.meter_id, "seq": self.seq,
            "ts": iso_ms(self.ts_ms) if self.ts_ms is not None else None, "quality": self.quality,
            "estimated": max(0, self.estimated) or None, "rule": self.rule, "reason": self.reason,
            "dead_letter_id": self.dead_letter_id,
        }.items() if v is not None}


_QUALITY_WORD = {"V": "valid", "S": "suspect", "E": "estimated", "M": "edited"}


def parse_reading(payload: bytes | str | dict[str, Any]) -> Reading:
    """Decode and validate one reading (schema and value ranges)."""
    if isinstance(payload, dict):
        data: Any = payload
    else:
        s = get_mdms_settings()
        if len(payload) > s.max_reading_bytes:
            raise Rejection("oversized", f"reading of {len(payload)} bytes exceeds {s.max_reading_bytes} bytes")
        try:
            data = json_limits.loads(payload)
        except json_limits.JsonTooDeep as exc:
            raise Rejection("depth", exc.message) from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise Rejection("json", f"payload is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise Rejection("schema", f"payload is a JSON {type(data).__name__}, expected an object")
    try:
        return Reading.model_validate(data)
    except ValidationError as exc:
        rule = "range" if all(e["type"] in _RANGE_ERRORS for e in exc.errors()) else "schema"
        raise Rejection(rule, describe_validation_error(exc)) from None


def check_reading(reading: Reading, now_s: float, s: MdmsSettings) -> Row:
    """The stateless rules (clock skew, horizon, suspect voltage); returns the row to store.

    The timestamp rule is the edge's too (:class:`metertwin.twin.messages.TimestampRule`).
    """
    try:
        TimestampRule(s.clock_skew_s, s.horizon_s).check(reading.ts, now_s)
    except TimestampRejected as exc:
        raise Rejection(exc.rule, exc.message) from None
    lo, hi = s.nominal_voltage_v * (1 - s.voltage_tolerance), s.nominal_voltage_v * (1 + s.voltage_tolerance)
    suspect = not lo <= reading.voltage_v <= hi
    return Row(
        ts_ms=round(reading.ts * 1000), seq=reading.seq, import_kwh=float(reading.import_kwh),
        export_kwh=float(reading.export_kwh), power_w=float(reading.power_w), voltage_v=float(reading.voltage_v),
        quality="suspect" if suspect else "valid",
    )


def _verdict(meter_id: str, row: Row, out: hot_store.IngestOutcome) -> Verdict:
    if out.status == "rejected":
        return Verdict("rejected", meter_id, row.seq, row.ts_ms, rule=out.rule, reason=out.reason)
    quality = _QUALITY_WORD.get(out.quality or "")
    return Verdict(out.status, meter_id, row.seq, row.ts_ms, quality=quality, estimated=out.estimated)  # type: ignore[arg-type]


@dataclass(slots=True)
class Candidate:
    """One reading on its way in, with what to dead-letter if it is rejected."""

    meter_id: str
    payload: bytes | str | dict[str, Any]
    source: str
    topic: str = ""
    attempts: int = 1


def ingest(candidates: Sequence[Candidate], *, now_s: float | None = None, dead_letter: bool = True) -> list[Verdict]:
    """Validate and store readings (in the order given; batches are sorted by the caller)."""
    s = get_mdms_settings()
    now = time.time() if now_s is None else now_s
    verdicts: list[Verdict | None] = [None] * len(candidates)
    todo: list[tuple[int, str, Row]] = []
    for i, c in enumerate(candidates):
        try:
            if not METER_ID_RE.match(c.meter_id):
                raise Rejection("schema", f"meter id {c.meter_id!r} is not valid")
            row = check_reading(parse_reading(c.payload), now, s)
        except Rejection as rej:
            verdicts[i] = Verdict("rejected", c.meter_id, rule=rej.rule, reason=rej.reason)
            continue
        todo.append((i, c.meter_id, row))
    if len(todo) == 1:  # the MQTT path: one EVALSHA, one round trip
        outcomes = [hot_store.ingest_one(todo[0][1], todo[0][2], now_s=now)]
    else:
        outcomes = hot_store.ingest_many([(m, r) for _, m, r in todo], now_s=now)
    for (i, meter_id, row), out in zip(todo, outcomes, strict=True):
        verdicts[i] = _verdict(meter_id, row, out)
    final = [v for v in verdicts if v is not None]
    _count_rejections([v.meter_id for v in final if v.status == "rejected" and v.rule in _STATELESS])
    if dead_letter and any(v.status == "rejected" for v in final):
        final = _dead_letter(candidates, final)
    return final


async def ingest_one_async(meter_id: str, payload: bytes, *, source: str, topic: str = "") -> Verdict:
    """:func:`ingest` of one reading on the running event loop (the MQTT path's async lane)."""
    s = get_mdms_settings()
    now = time.time()
    try:
        if not METER_ID_RE.match(meter_id):
            raise Rejection("schema", f"meter id {meter_id!r} is not valid")
        row = check_reading(parse_reading(payload), now, s)
    except Rejection as rej:
        verdict = Verdict("rejected", meter_id, rule=rej.rule, reason=rej.reason)
    else:
        verdict = _verdict(meter_id, row, await hot_store.ingest_one_async(meter_id, row, now_s=now))
    if verdict.status != "rejected":
        return verdict
    if verdict.rule in _STATELESS and METER_ID_RE.match(meter_id):
        await hot_store.get_hot_redis_async().hincrby(keys.mdms_counters(meter_id), "rejected", 1)
    entry = await dead_letters.add_async(
        meter_id=meter_id if METER_ID_RE.match(meter_id) else "", source=source, payload=payload,
        rule=verdict.rule or "unknown", reason=verdict.reason or "", topic=topic,
    )
    return Verdict("rejected", meter_id, verdict.seq, verdict.ts_ms, rule=verdict.rule, reason=verdict.reason,
                   dead_letter_id=entry)


def reading_meter(topic: str, payload: bytes) -> str:
    """The meter id of a ``meters/<id>/up/reading`` topic. Any other topic, or an invalid meter id,
    is dead-lettered (rule ``topic``; a rare path, so a blocking call even on the async lane) and
    raised as :class:`ReadingRejected`: no message is acknowledged unrecorded."""
    try:
        meter_id = topics.meter_id_of(topic)
        reason = "" if topic == topics.readings(meter_id) else "is not a readings topic (meters/<id>/up/reading)"
    except ValueError:
        meter_id, reason = "", "is not meters/<meter_id>/up/reading"
    if not reason and METER_ID_RE.match(meter_id):
        return meter_id
    reason = f"X-Topic {topic[:200]!r} {reason or 'names no valid meter id'}"
    entry = dead_letters.add(meter_id="", source="mqtt", payload=payload, rule="topic", reason=reason,
                             topic=topic[:200])
    verdict = Verdict("rejected", "", rule="topic", reason=reason, dead_letter_id=entry)
    raise ReadingRejected(f"reading rejected (topic): {reason}", **verdict.to_dict())


#: Rules judged before the Lua script (which counts its own rejections).
_STATELESS = frozenset({"json", "depth", "schema", "range", "units", "oversized", "future", "too_old"})


def _count_rejections(meter_ids: Sequence[str]) -> None:
    valid = [m for m in meter_ids if METER_ID_RE.match(m)]
    if not valid:
        return
    pipe = hot_store.get_hot_redis().pipeline(transaction=False)
    for m in valid:
        pipe.hincrby(keys.mdms_counters(m), "rejected", 1)
    pipe.execute()


def _dead_letter(candidates: Sequence[Candidate], verdicts: list[Verdict]) -> list[Verdict]:
    out = []
    for c, v in zip(candidates, verdicts, strict=True):
        if v.status != "rejected":
            out.append(v)
            continue
        payload = c.payload if not isinstance(c.payload, dict) else json.dumps(c.payload, separators=(",", ":"))
        entry = dead_letters.add(
            meter_id=c.meter_id if METER_ID_RE.match(c.meter_id) else "", source=c.source, payload=payload,
            rule=v.rule or "unknown", reason=v.reason or "", topic=c.topic, attempts=c.attempts,
        )
        out.append(Verdict(v.status, v.meter_id, v.seq, v.ts_ms, rule=v.rule, reason=v.reason, dead_letter_id=entry))
    return out


# --- batch upload from head-end systems ---------------------------------------------------
_ENERGY = {"Wh": 0.001, "kWh": 1.0, "MWh": 1000.0}
_POWER = {"W": 1.0, "kW": 1000.0, "MW": 1_000_000.0}
_VOLTAGE = {"V": 1.0, "kV": 1000.0}


class Units(BaseModel):
    model_config = ConfigDict(extra="forbid")

    energy: Literal["Wh", "kWh", "MWh"] = "kWh"
    power: Literal["W", "kW", "MW"] = "W"
    voltage: Literal["V", "kV"] = "V"


class BatchItem(BaseModel):
    """A head-end reading: register values in the batch's ``units``; ``ts`` epoch seconds or ISO 8601."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    meter_id: str = Field(min_length=1, max_length=64)
    seq: int = Field(ge=0, le=MAX_SEQ, strict=True)  # the same rule as Reading.seq
    ts: Finite | str
    import_: Finite = Field(alias="import")
    export: Finite = 0.0
    power: Finite
    voltage: Finite = 230.0

    @field_validator("ts")
    @classmethod
    def _ts(cls, v: float | str) -> float | str:
        if isinstance(v, str):
            try:
                dt = datetime.fromisoformat(v)
            except ValueError:
                raise ValueError(f"ts {v!r} is neither epoch seconds nor an ISO 8601 timestamp") from None
            return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()
        return v


class Batch(BaseModel):
    """``POST /readings/batch`` body. Items are validated one by one (bad ones are dead-lettered)."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(default="head-end", min_length=1, max_length=64)
    units: Units = Field(default_factory=Units)
    readings: list[dict[str, Any]] = Field(min_length=1)


def batch_candidates(batch: Batch) -> list[Candidate]:
    """Convert items to :class:`Reading` payloads in kWh/W/V, sorted by (meter, ts) for estimation."""
    s = get_mdms_settings()
    if len(batch.readings) > s.max_batch_readings:
        raise PayloadTooLarge(
            f"batch of {len(batch.readings)} readings exceeds the limit of {s.max_batch_readings}"
        )
    e, p, v = _ENERGY[batch.units.energy], _POWER[batch.units.power], _VOLTAGE[batch.units.voltage]
    keyed: list[tuple[str, float, Candidate]] = []
    for raw in batch.readings:
        meter = str(raw.get("meter_id", "")) if isinstance(raw, dict) else ""
        source = f"batch:{batch.source}"
        try:
            item = BatchItem.model_validate(raw)
        except ValidationError as exc:
            rule = "range" if all(x["type"] in _RANGE_ERRORS for x in exc.errors()) else "schema"
            invalid = _Invalid(rule, describe_validation_error(exc), raw)
            keyed.append((meter, -math.inf, Candidate(meter, invalid, source)))
            continue
        ts = float(item.ts)
        reading = {
            "ts": ts, "seq": item.seq, "import_kwh": item.import_ * e, "export_kwh": item.export * e,
            "power_w": item.power * p, "voltage_v": item.voltage * v,
        }
        keyed.append((item.meter_id, ts, Candidate(item.meter_id, reading, source)))
    keyed.sort(key=lambda k: (k[0], k[1]))
    return [c for _, _, c in keyed]


class _Invalid(dict[str, Any]):
    """A batch item that failed its schema: carries the rejection to :func:`ingest`."""

    def __init__(self, rule: str, reason: str, raw: Any) -> None:
        super().__init__(raw if isinstance(raw, dict) else {"item": raw})
        self.rule, self.reason = rule, reason


def ingest_batch(batch: Batch, *, now_s: float | None = None) -> list[Verdict]:
    candidates = batch_candidates(batch)
    verdicts: list[Verdict] = []
    valid: list[Candidate] = []
    slots: list[int] = []
    for c in candidates:
        if isinstance(c.payload, _Invalid):
            verdicts.append(Verdict("rejected", c.meter_id, rule=c.payload.rule, reason=c.payload.reason))
        else:
            verdicts.append(Verdict("accepted", c.meter_id))  # placeholder
            valid.append(c)
            slots.append(len(verdicts) - 1)
    _count_rejections([c.meter_id for c in candidates if isinstance(c.payload, _Invalid)])
    for slot, v in zip(slots, ingest(valid, now_s=now_s, dead_letter=False), strict=True):
        verdicts[slot] = v
    if any(v.status == "rejected" for v in verdicts):
        verdicts = _dead_letter(candidates, verdicts)
    return verdicts


# --- replay --------------------------------------------------------------------------------
def replay_dead_letter(entry_id: str, *, payload: dict[str, Any] | None = None, meter_id: str | None = None) -> Verdict:
    """Run a dead letter through VEE again (optionally corrected). Accepted or duplicate: the
    entry is removed. Rejected again: it is replaced by an entry with the new reason."""
    entry = dead_letters.get(entry_id)
    meter = meter_id or entry.meter_id
    if not meter:
        raise InvalidInput(f"dead letter {entry_id} names no meter; pass meter_id to replay it", field="meter_id")
    if entry.truncated and payload is None:
        raise InvalidInput(f"dead letter {entry_id} holds a truncated payload; pass a corrected reading")
    body: bytes | str | dict[str, Any] = payload if payload is not None else entry.payload
    verdict = ingest([Candidate(meter, body, "replay", entry.topic, entry.attempts + 1)], dead_letter=False)[0]
    if verdict.status == "rejected":
        new_id = dead_letters.add(
            meter_id=meter, source=entry.source, payload=body if not isinstance(body, dict) else json.dumps(body),
            rule=verdict.rule or "unknown", reason=verdict.reason or "", topic=entry.topic, attempts=entry.attempts + 1,
        )
        dead_letters.delete(entry_id)
        return Verdict("rejected", meter, verdict.seq, verdict.ts_ms, rule=verdict.rule, reason=verdict.reason,
                       dead_letter_id=new_id)
    dead_letters.delete(entry_id)
    return verdict


# --- editing ---------------------------------------------------------------------------------
class EditRequest(BaseModel):
    """``POST /meters/{meter_id}/edits``: a manual correction of the registers at ``ts``."""

    model_config = ConfigDict(extra="forbid")

    ts: Finite | str
    import_kwh: Finite | None = Field(default=None, ge=0, le=1e9)
    export_kwh: Finite | None = Field(default=None, ge=0, le=1e9)
    reason: str = Field(min_length=3, max_length=500)

    @field_validator("ts")
    @classmethod
    def _ts(cls, v: float | str) -> float | str:
        return BatchItem._ts(v)


def edit(meter_id: str, req: EditRequest, *, who: str, now_s: float | None = None) -> dict[str, Any]:
    """Correct the row at ``req.ts`` (hot or cold); the edited row is hot until archived again.

    The audit trail (who, when, old, new, reason) is written by the same Lua script as the row.
    """
    from metertwin.mdms import interval_reader  # the reader needs the cold store; import when editing

    if req.import_kwh is None and req.export_kwh is None:
        raise InvalidInput("an edit needs import_kwh and/or export_kwh", field="import_kwh")
    ts_ms = round(float(req.ts) * 1000)
    now = time.time() if now_s is None else now_s
    for _attempt in range(5):
        hot = hot_store.rows(meter_id, ts_ms, ts_ms)
        expected = hot[0][0] if hot else ""
        if hot:
            old = hot[0][1]
        else:
            merged = interval_reader.read_rows(meter_id, ts_ms, ts_ms, note=False)
            found = [r for r, _tier in merged if r.ts_ms == ts_ms]
            if not found:
                raise NotFound(f"meter {meter_id!r} has no interval row at ts {req.ts!r} ({iso_ms(ts_ms)})")
            old = found[0]
        new = Row(
            ts_ms=ts_ms, seq=old.seq,
            import_kwh=float(req.import_kwh) if req.import_kwh is not None else old.import_kwh,
            export_kwh=float(req.export_kwh) if req.export_kwh is not None else old.export_kwh,
            power_w=old.power_w, voltage_v=old.voltage_v, quality="edited",
        )
        res = hot_store.edit(meter_id, new, expected_old=expected, old_text=old.encode(), who=who,
                             reason=req.reason, now_s=now)
        if res[0] == "conflict":
            continue
        if res[0] == "rejected":
            raise InvalidInput(f"edit of {meter_id} at {iso_ms(ts_ms)} refused: {res[1]}", field="import_kwh")
        return {"audit_id": str(res[1]), "meter_id": meter_id, "ts": iso_ms(ts_ms), "old": old.to_dict(),
                "new": new.to_dict(), "who": who, "reason": req.reason, "estimated": int(res[2])}
    raise Conflict(f"row of {meter_id} at {iso_ms(ts_ms)} kept changing; retry the edit")


def audit_trail(meter_id: str, *, limit: int = 100) -> list[dict[str, Any]]:
    """The meter's edits, newest first."""
    entries = cast(list[tuple[str, dict[str, str]]],
                   hot_store.get_hot_redis().xrevrange(keys.mdms_audit(meter_id), "+", "-", count=limit))
    out = []
    for entry_id, f in entries:
        out.append({
            "id": entry_id, "ts": iso_ms(int(f["ts_ms"])), "ts_ms": int(f["ts_ms"]), "who": f["who"],
            "at": float(f["at"]), "old": Row.decode(f["old"]).to_dict(), "new": Row.decode(f["new"]).to_dict(),
            "reason": f["reason"],
        })
    return out
