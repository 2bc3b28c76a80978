"""A simulated meter's behaviour, without any MQTT: what the physical device measures and obeys.

:class:`MeterDevice` draws its household (or prosumer) load from the meter's seed,
integrates the import/export registers, keeps the settings in force and applies the
effect of each command kind (:meth:`MeterDevice.apply`, all or nothing, raising
:class:`Rejected` with the reason the ack carries). It also is where messages for the
local EMS end up and where the EMS's own telemetry comes from. The wire side (topics,
acks, request/response) is :mod:`meter_sim.protocol`.
"""

from __future__ import annotations

import collections
import logging
import math
import random
import time
from collections.abc import Callable
from typing import Any

from meter_sim.config import FleetConfig
from meter_sim.profile import LoadModel

RELAY_STATES = ("open", "closed")
#: Settings a ``desired`` command may set, and the names ``reported`` uses for them.
SETTING_NAMES = ("relay", "reporting_interval_s", "load_limit_w", "tariff_id")
MIN_INTERVAL_S, MAX_INTERVAL_S = 1.0, 86400.0

log = logging.getLogger("meter_sim")


class Rejected(Exception):
    """A command the meter refuses; the message is the ack's reason."""


class MeterDevice:
    """Registers, load model, settings and command effects of one meter (the seed fixes all of it)."""

    def __init__(
        self,
        meter_id: str,
        config: FleetConfig,
        *,
        seed: int,
        reporting_interval_s: float,
        prosumer_share: float,
        tz_offset_h: float = 0.0,
        on_ems: Callable[[str, bytes], None] | None = None,
        prosumer: bool | None = None,
    ) -> None:
        self.meter_id = meter_id
        self.config = config
        # The order of the draws below is the meter's identity: same seed and id, same meter.
        self.rng = random.Random(f"{seed}:{meter_id}")
        drawn = self.rng.random() < prosumer_share  # always drawn: the draws after it stay the same
        prosumer = drawn if prosumer is None else prosumer  # a topology decides PV per feeder
        self.model = LoadModel.draw(self.rng, prosumer=prosumer, tz_offset_h=tz_offset_h)
        self.on_ems = on_ems

        # Registers (Wh internally) and the instant they were last integrated to.
        self.import_wh = self.rng.uniform(1_000.0, 20_000.0) * 1000.0
        self.export_wh = self.rng.uniform(0.0, 3_000.0) * 1000.0 if prosumer else 0.0
        self._integrated_to: float | None = None

        # Settings in force.
        self.relay = "closed"
        self.reporting_interval_s = float(reporting_interval_s)
        self.load_limit_w: float | None = None
        #: Load switched on beside the household's (an EV charger, a heat pump): drives a transformer
        #: over its rating in the demo (``MeterFleet.add_load``).
        self.extra_load_w = 0.0
        self.tariff_id: str | None = None
        self.tariff: dict[str, Any] | None = None
        self.last_trade: dict[str, Any] | None = None
        self.last_dr: dict[str, Any] | None = None
        self.binding: Any = None
        self.ems_inbox: collections.deque[bytes] = collections.deque(maxlen=config.ems_inbox_size)

    # ---------------------------------------------------------------- measuring
    def _now_sim(self, wall: float) -> float:
        return self.config.sim_time(wall)

    def _apply_settings(self, power: float) -> float:
        if self.relay == "open":
            return 0.0
        if self.load_limit_w is not None and power > self.load_limit_w:
            return self.load_limit_w
        return power

    def power_at(self, sim_t: float) -> float:
        """Net power (W) at simulated time ``sim_t`` with the settings in force."""
        return self._apply_settings(self.model.power_w(sim_t) + self.extra_load_w)

    def _integrate(self, sim_t: float) -> None:
        """Advance the registers to ``sim_t`` (never backwards)."""
        start = self._integrated_to
        if start is None or sim_t <= start:
            self._integrated_to = sim_t if start is None else max(start, sim_t)
            return
        dt = sim_t - start
        steps = min(48, max(1, math.ceil(dt / 60.0)))
        h = dt / steps
        imp = exp = 0.0
        for i in range(steps):
            p = self.power_at(start + (i + 0.5) * h)  # midpoint rule
            if p >= 0:
                imp += p * h
            else:
                exp -= p * h
        self.import_wh += imp / 3600.0
        self.export_wh += exp / 3600.0
        self._integrated_to = sim_t

    def measure(self, wall: float | None = None) -> dict[str, float]:
        """The meter's measurement now: registers integrated up to this instant."""
        wall = time.time() if wall is None else wall
        sim_t = self._now_sim(wall)
        self._integrate(sim_t)
        power = self.power_at(sim_t)
        return {
            "ts": round(wall, 3),
            "import_kwh": round(self.import_wh / 1000.0, 4),
            "export_kwh": round(self.export_wh / 1000.0, 4),
            "power_w": round(power, 1),
            "voltage_v": round(min(max(self.model.voltage_v(sim_t, power), 0.0), 1000.0), 1),
        }

    def settings(self) -> dict[str, Any]:
        """The settings in force, under the names ``reported`` uses."""
        return {
            "relay": self.relay,
            "reporting_interval_s": _num(self.reporting_interval_s),
            "load_limit_w": self.load_limit_w,
            "tariff_id": self.tariff_id,
        }

    # ---------------------------------------------------------------- command effects
    def apply(self, kind: str, params: dict[str, Any]) -> dict[str, Any]:
        """Apply a command; return extra ``reported`` fields; raise :class:`Rejected` with a reason."""
        if kind == "relay":
            self._set_settings({"relay": _param(params, "state", kind)})
        elif kind == "reporting_interval":
            self._set_settings({"reporting_interval_s": _param(params, "seconds", kind)})
        elif kind == "load_limit":
            self._set_settings({"load_limit_w": _param(params, "watts", kind)})
        elif kind == "tariff":
            self._set_settings({"tariff_id": _param(params, "tariff_id", kind)})
            self.tariff = dict(params)
        elif kind == "desired":
            fields = params.get("fields")
            if not isinstance(fields, dict) or not fields:
                raise Rejected("desired needs params.fields, a non-empty object of settings")
            self._set_settings(fields)
        elif kind == "trade":
            self.last_trade = dict(params)
            return {"last_trade": self.last_trade}
        elif kind == "dr":
            self.last_dr = dict(params)
            return {"last_dr": self.last_dr}
        else:
            raise Rejected(f"unknown command kind {kind!r}")
        return {}

    def _set_settings(self, fields: dict[str, Any]) -> None:
        """Validate every field first, then apply all of them (all or nothing)."""
        clean = {name: _validate_setting(name, value) for name, value in fields.items()}
        self.measure()  # energy so far was used under the old settings
        old_interval = self.reporting_interval_s
        for name, value in clean.items():
            setattr(self, name, value)
        if self.reporting_interval_s != old_interval:
            self._interval_changed()

    def _interval_changed(self) -> None:
        """The reporting interval changed (the connected meter reschedules its reports)."""

    # ---------------------------------------------------------------- the local EMS
    def to_ems(self, payload: bytes) -> None:
        """Hand a message for the local EMS over untouched (kept in ``ems_inbox``, passed to ``on_ems``)."""
        self.ems_inbox.append(payload)
        if self.on_ems is not None:
            try:
                self.on_ems(self.meter_id, payload)
            except Exception:
                log.exception("meter %s: EMS callback failed", self.meter_id)

    def ems_telemetry(self) -> dict[str, Any]:
        """What the local EMS reports up on its own cadence."""
        m = self.measure()
        return {"type": "telemetry", "power_w": m["power_w"], "import_kwh": m["import_kwh"]}


def _num(x: float) -> float | int:
    return int(x) if float(x).is_integer() else x


def _param(params: dict[str, Any], name: str, kind: str) -> Any:
    if name not in params:
        raise Rejected(f"{kind} needs params.{name}")
    return params[name]


def _validate_setting(name: str, value: Any) -> Any:
    if name == "relay":
        if value not in RELAY_STATES:
            raise Rejected(f"relay {value!r} is not 'open' or 'closed'")
        return value
    if name == "reporting_interval_s":
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise Rejected(f"reporting_interval_s {value!r} is not a number of seconds")
        if not MIN_INTERVAL_S <= value <= MAX_INTERVAL_S:
            raise Rejected(f"reporting_interval_s {value!r} is outside [{MIN_INTERVAL_S:g}, {MAX_INTERVAL_S:g}]")
        return float(value)
    if name == "load_limit_w":
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise Rejected(f"load_limit_w {value!r} is not null or a number of watts >= 0")
        return float(value)
    if name == "tariff_id":
        if not isinstance(value, str) or not 0 < len(value) <= 64:
            raise Rejected(f"tariff_id {value!r} is not a string of 1..64 characters")
        return value
    raise Rejected(f"unknown setting {name!r} (known: {', '.join(SETTING_NAMES)})")
