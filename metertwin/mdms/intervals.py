"""The MDMS interval row: one register read of one meter at one instant, with its quality flag.

A row is what VEE accepted (a meter reading), what estimation filled in (a register
value interpolated at an interval boundary inside a gap) or what an operator edited.
Energy over any period is the difference of the cumulative registers at its ends
(see :mod:`metertwin.mdms.tou`). In the hot tier a row is a sorted-set member
``ts_ms|seq|import_kwh|export_kwh|power_w|voltage_v|Q`` scored by ``ts_ms``; in the
cold tier it is a Parquet row (see :mod:`metertwin.mdms.cold_store`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

Quality = Literal["valid", "estimated", "edited", "suspect"]
Tier = Literal["hot", "cold"]

#: One-letter codes of the quality flags in the hot tier (the Lua scripts use them too).
QUALITY_CODES: Final[dict[Quality, str]] = {"valid": "V", "estimated": "E", "edited": "M", "suspect": "S"}
QUALITY_OF_CODE: Final[dict[str, Quality]] = {v: k for k, v in QUALITY_CODES.items()}
#: Worst first: the quality of a derived interval is the worst of the rows it used.
QUALITY_RANK: Final[dict[str, int]] = {"suspect": 0, "estimated": 1, "edited": 2, "valid": 3}
DAY_MS: Final = 86_400_000


@dataclass(frozen=True, slots=True)
class Row:
    """One register read. ``seq`` and ``voltage_v`` are ``None`` for estimated rows."""

    ts_ms: int
    seq: int | None
    import_kwh: float
    export_kwh: float
    power_w: float | None
    voltage_v: float | None
    quality: Quality

    def encode(self) -> str:
        """The hot-tier sorted-set member (floats as ``repr`` so they round-trip exactly)."""
        return "|".join((
            str(self.ts_ms),
            "" if self.seq is None else str(self.seq),
            repr(self.import_kwh),
            repr(self.export_kwh),
            "" if self.power_w is None else repr(self.power_w),
            "" if self.voltage_v is None else repr(self.voltage_v),
            QUALITY_CODES[self.quality],
        ))

    @classmethod
    def decode(cls, member: str) -> Row:
        ts, seq, imp, exp, pw, volt, q = member.split("|")
        return cls(
            ts_ms=int(ts),
            seq=int(seq) if seq else None,
            import_kwh=float(imp),
            export_kwh=float(exp),
            power_w=float(pw) if pw else None,
            voltage_v=float(volt) if volt else None,
            quality=QUALITY_OF_CODE[q],
        )

    def canonical(self, meter_id: str) -> str:
        """Text the cold-tier checksum is computed over (tier independent)."""
        return f"{meter_id}|{self.encode()}"

    def to_dict(self) -> dict[str, object]:
        return {
            "ts": iso_ms(self.ts_ms),
            "ts_ms": self.ts_ms,
            "seq": self.seq,
            "import_kwh": self.import_kwh,
            "export_kwh": self.export_kwh,
            "power_w": self.power_w,
            "voltage_v": self.voltage_v,
            "quality": self.quality,
        }


def checksum(rows: Iterable[tuple[str, Row]]) -> str:
    """SHA-256 over the canonical text of ``(meter_id, row)`` pairs, in (meter, ts) order."""
    h = hashlib.sha256()
    for meter_id, row in sorted(rows, key=lambda mr: (mr[0], mr[1].ts_ms)):
        h.update(row.canonical(meter_id).encode())
        h.update(b"\n")
    return h.hexdigest()


def iso_ms(ts_ms: int) -> str:
    return datetime.fromtimestamp(ts_ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def day_of(ts_ms: int) -> str:
    """The UTC day (``yyyymmdd``) a timestamp falls in: the unit of tiering."""
    return datetime.fromtimestamp(ts_ms / 1000, UTC).strftime("%Y%m%d")


def day_start_ms(day: str) -> int:
    return int(datetime.strptime(day, "%Y%m%d").replace(tzinfo=UTC).timestamp() * 1000)


def days_between(from_ms: int, to_ms: int) -> list[str]:
    """Every UTC day touched by ``[from_ms, to_ms]``, in order."""
    first = datetime.fromtimestamp(from_ms / 1000, UTC).date()
    last = datetime.fromtimestamp(to_ms / 1000, UTC).date()
    out = []
    while first <= last:
        out.append(first.strftime("%Y%m%d"))
        first += timedelta(days=1)
    return out


def iso_day(day: str) -> str:
    """``yyyymmdd`` -> ``yyyy-mm-dd`` (the Parquet partition value)."""
    return f"{day[:4]}-{day[4:6]}-{day[6:]}"
