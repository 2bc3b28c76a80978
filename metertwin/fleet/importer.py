"""Bulk topology from CSV, the shape utilities export from GIS/CIS.

One header row, then one row per meter. Columns: ``meter_id`` (required) and any of ``region,
substation, feeder, transformer, phase, lat, lon, tariff, customer_class, groups, tags``;
``groups`` are separated by ``;`` (``north;pilot``), ``tags`` are ``key=value`` pairs separated
by ``;`` (``meter_type=smart2;vendor=acme``). In ``merge`` mode (default) an empty cell leaves the
stored attribute as it is; in ``replace`` mode the row is the meter's whole topology and empty
or absent attributes are removed. Every row is checked and applied on its own: a bad row gets an
error naming its line, column and value, and the good rows are still applied.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from metertwin.core.errors import InvalidInput, MeterTwinError, UnknownMeter, VersionMismatch
from metertwin.core.http import METER_ID_RE
from metertwin.fleet.topology import (
    NAME_RE,
    NAME_RULE,
    PHASES,
    TAG_KEY_RE,
    TAG_KEY_RULE,
    TopologyFields,
    TopologyStore,
)

MAX_IMPORT_ROWS = 10_000
MAX_IMPORT_BYTES = 4 * 1024 * 1024
NAME_COLUMNS = ("region", "substation", "feeder", "transformer", "tariff", "customer_class")
COLUMNS = ("meter_id", *NAME_COLUMNS, "phase", "lat", "lon", "groups", "tags")


class RowError(Exception):
    """One cell of one row is bad."""

    def __init__(self, column: str, value: str, message: str) -> None:
        super().__init__(message)
        self.column, self.value, self.message = column, value, message


@dataclass
class ImportReport:
    rows: int = 0
    applied: int = 0
    unchanged: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "applied": self.applied, "unchanged": self.unchanged,
                "failed": len(self.errors), "errors": self.errors}


def import_csv(store: TopologyStore, text: bytes, *, actor: str, mode: str = "merge") -> ImportReport:
    """Parse and apply a topology CSV; see the module docstring."""
    if mode not in ("merge", "replace"):
        raise InvalidInput(f"mode {mode!r} is not 'merge' or 'replace'", field="mode")
    if len(text) > MAX_IMPORT_BYTES:
        raise InvalidInput(f"CSV of {len(text)} bytes exceeds the limit of {MAX_IMPORT_BYTES} bytes")
    try:
        reader = csv.reader(io.StringIO(text.decode("utf-8-sig")))
        header = [h.strip() for h in next(reader, [])]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InvalidInput(f"body is not UTF-8 CSV: {exc}") from None
    unknown = [h for h in header if h not in COLUMNS]
    if unknown:
        raise InvalidInput(f"column {unknown[0]!r} is not one of {', '.join(COLUMNS)}", field=unknown[0])
    if "meter_id" not in header:
        raise InvalidInput("the header has no meter_id column", field="meter_id")
    report, seen = ImportReport(), set()
    for line, row in enumerate(reader, start=2):
        if not any(cell.strip() for cell in row):
            continue
        report.rows += 1
        if report.rows > MAX_IMPORT_ROWS:
            raise InvalidInput(f"more than {MAX_IMPORT_ROWS} rows: split the file", field="rows")
        cells = {name: (row[i].strip() if i < len(row) else "") for i, name in enumerate(header)}
        meter_id = cells.get("meter_id", "")
        try:
            if len(row) > len(header):
                raise RowError("", ",".join(row[len(header):])[:80], f"{len(row)} cells for {len(header)} columns")
            if not METER_ID_RE.match(meter_id):
                raise RowError("meter_id", meter_id, "not a meter id")
            if meter_id in seen:
                raise RowError("meter_id", meter_id, "appears on an earlier row of this file")
            seen.add(meter_id)
            changes = row_changes(cells)
            before = store.get(meter_id)
            after = store.patch(meter_id, changes, actor=actor, replace=mode == "replace")
        except RowError as exc:
            report.errors.append({"line": line, "meter_id": meter_id, "column": exc.column, "value": exc.value,
                                  "error": exc.message})
            continue
        except MeterTwinError as exc:
            report.errors.append(_twin_error(line, meter_id, cells, exc))
            continue
        if before is not None and after.get("v") == before.get("v"):
            report.unchanged += 1
        else:
            report.applied += 1
    return report


def row_changes(cells: dict[str, str]) -> dict[str, Any]:
    """The merge patch of one row: its non-empty cells."""
    out: dict[str, Any] = {}
    for name in NAME_COLUMNS:
        value = cells.get(name, "")
        if value:
            if not NAME_RE.match(value):
                raise RowError(name, value, f"not valid: {NAME_RULE}")
            out[name] = value
    if phase := cells.get("phase", ""):
        if phase not in PHASES:
            raise RowError("phase", phase, f"not one of {', '.join(PHASES)}")
        out["phase"] = phase
    lat, lon = cells.get("lat", ""), cells.get("lon", "")
    if lat or lon:
        out["location"] = {"lat": _coordinate("lat", lat, 90), "lon": _coordinate("lon", lon, 180)}
    if groups := cells.get("groups", ""):
        names = [g.strip() for g in groups.split(";") if g.strip()]
        for g in names:
            if not NAME_RE.match(g):
                raise RowError("groups", g, f"group not valid: {NAME_RULE}")
        out["groups"] = names
    if tags := cells.get("tags", ""):
        out["tags"] = dict(_tag(pair.strip()) for pair in tags.split(";") if pair.strip())
    try:
        return TopologyFields.model_validate(out).changes()
    except ValidationError as exc:  # the checks above should catch everything; name what is left
        err = exc.errors()[0]
        column = str(err["loc"][0]) if err["loc"] else ""
        raise RowError(column, str(cells.get(column, ""))[:80], err["msg"]) from None


def _coordinate(column: str, raw: str, bound: float) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise RowError(column, raw, "not a number (lat and lon go together)") from None
    if not -bound <= value <= bound:
        raise RowError(column, raw, f"outside [-{bound}, {bound}]")
    return value


def _tag(pair: str) -> tuple[str, str]:
    key, sep, value = pair.partition("=")
    if not sep or not TAG_KEY_RE.match(key.strip()):
        raise RowError("tags", pair, f"not key=value with the key {TAG_KEY_RULE}")
    if not NAME_RE.match(value.strip()):
        raise RowError("tags", pair, f"tag value not valid: {NAME_RULE}")
    return key.strip(), value.strip()


def _twin_error(line: int, meter_id: str, cells: dict[str, str], exc: MeterTwinError) -> dict[str, Any]:
    # a tree clash names the parent column (the feeder a transformer is said to hang from)
    column = "meter_id" if isinstance(exc, UnknownMeter | VersionMismatch) else str(exc.details.get("field", ""))
    return {"line": line, "meter_id": meter_id, "column": column, "value": cells.get(column, ""),
            "error": exc.message}
