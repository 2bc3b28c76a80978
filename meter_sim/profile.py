"""What a simulated meter measures, and how its link delays messages.

Power is a pure function of simulated time per meter, so a meter's readings do
not depend on when they are taken: a household load with a daily shape (morning
and evening peaks, a daytime plateau, standby at night) and smooth noise, minus
a PV bell curve for prosumers (net power negative when exporting). Parameters
are drawn once from ``random.Random`` seeded with ``(seed, meter id)``; the
noise is a hash of (meter, minute), interpolated, so it is deterministic too.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

_MASK = (1 << 64) - 1
#: Knot spacing of the smooth noise (simulated seconds).
_NOISE_STEP_S = 120.0


def _mix64(x: int) -> int:
    """splitmix64 finaliser: a fast, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _hash01(key: int, k: int) -> float:
    return _mix64(key ^ ((k * 0xD1B54A32D192ED03) & _MASK)) / 2.0**64


def _smooth_noise(key: int, t: float) -> float:
    """Noise in [0, 1), linear between knots every ``_NOISE_STEP_S`` simulated seconds."""
    x = t / _NOISE_STEP_S
    k = math.floor(x)
    frac = x - k
    a = _hash01(key, k)
    return a + (_hash01(key, k + 1) - a) * frac


def _bump(hour: float, centre: float, width: float) -> float:
    d = (hour - centre + 12.0) % 24.0 - 12.0  # wraps around midnight
    return math.exp(-0.5 * (d / width) ** 2)


def household_shape(hour: float, shift_h: float = 0.0) -> float:
    """Relative household load at local ``hour`` (mean over a day close to 1)."""
    h = hour - shift_h
    plateau = 0.25 if 8.5 <= h % 24.0 <= 16.5 else 0.0
    return 0.42 + 0.95 * _bump(h, 7.5, 1.1) + 1.7 * _bump(h, 19.0, 1.9) + plateau


def solar_shape(hour: float, sunrise_h: float = 6.0, sunset_h: float = 20.0) -> float:
    """Clear-sky PV output relative to peak at local ``hour``: a bell between sunrise and sunset."""
    if not sunrise_h < hour < sunset_h:
        return 0.0
    return float(math.sin(math.pi * (hour - sunrise_h) / (sunset_h - sunrise_h)) ** 1.5)


@dataclass(frozen=True, slots=True)
class LoadModel:
    """One meter's physics: power (W, net, negative when exporting) at a simulated epoch time."""

    key: int
    mean_load_w: float
    shift_h: float
    noise: float
    pv_peak_w: float
    tz_offset_s: float

    @classmethod
    def draw(cls, rng: random.Random, *, prosumer: bool, tz_offset_h: float = 0.0) -> LoadModel:
        annual_kwh = rng.uniform(1800.0, 6000.0)
        return cls(
            key=rng.getrandbits(64),
            mean_load_w=annual_kwh * 1000.0 / 8760.0,
            shift_h=rng.uniform(-0.75, 0.75),
            noise=rng.uniform(0.15, 0.35),
            pv_peak_w=rng.uniform(2500.0, 8000.0) * 0.8 if prosumer else 0.0,
            tz_offset_s=tz_offset_h * 3600.0,
        )

    @property
    def prosumer(self) -> bool:
        return self.pv_peak_w > 0

    def power_w(self, t: float) -> float:
        hour = ((t + self.tz_offset_s) % 86400.0) / 3600.0
        n = _smooth_noise(self.key, t) * 2.0 - 1.0
        load = self.mean_load_w * household_shape(hour, self.shift_h) * (1.0 + self.noise * n)
        load = max(load, 25.0)  # standby never switches off
        if self.pv_peak_w:
            # Passing clouds: a second noise stream, slower, never below 35 % of clear sky.
            cloud = 0.35 + 0.65 * _smooth_noise(self.key ^ 0x5A5A5A5A5A5A5A5A, t / 4.0)
            load -= self.pv_peak_w * solar_shape(hour) * cloud
        return load

    def voltage_v(self, t: float, power_w: float) -> float:
        # Exporting lifts the local voltage a little, heavy import sags it.
        return 230.0 + 4.0 * (_smooth_noise(self.key ^ 0x0F0F0F0F, t) - 0.5) - power_w / 2000.0


@dataclass(frozen=True, slots=True)
class LinkProfile:
    """Latency added to every message in both directions, uniform in ``[lo_s, hi_s]``."""

    lo_s: float
    hi_s: float
    name: str = "custom"

    def __post_init__(self) -> None:
        if not (0.0 <= self.lo_s <= self.hi_s < 3600.0):
            raise ValueError(f"link latency range [{self.lo_s}, {self.hi_s}] s is not 0 <= lo <= hi < 3600")

    def sample(self, rng: random.Random) -> float:
        if self.hi_s == 0.0:
            return 0.0
        return rng.uniform(self.lo_s, self.hi_s)

    @classmethod
    def parse(cls, spec: str | tuple[float, float] | LinkProfile) -> LinkProfile:
        """``"nbiot"``, ``"wifi"``, ``"lan"``, ``"0.1-0.3"`` (seconds), ``(lo, hi)`` or a profile."""
        if isinstance(spec, LinkProfile):
            return spec
        if isinstance(spec, tuple):
            return cls(float(spec[0]), float(spec[1]))
        named = LINKS.get(spec.strip().lower())
        if named is not None:
            return named
        lo, sep, hi = spec.partition("-")
        try:
            return cls(float(lo), float(hi if sep else lo))
        except ValueError:
            raise ValueError(
                f"link profile {spec!r} is not one of {sorted(LINKS)} nor a range like '0.1-0.3'"
            ) from None


#: The link profiles of seed 000 (NB-IoT-like and WiFi-like), plus no delay.
LINKS: dict[str, LinkProfile] = {
    "nbiot": LinkProfile(0.4, 0.8, "nbiot"),
    "wifi": LinkProfile(0.06, 0.14, "wifi"),
    "lan": LinkProfile(0.0, 0.0, "lan"),
}
