"""What every simulated meter of a fleet shares: broker address, MQTT timing, the simulated clock."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FleetConfig:
    """What every meter of a fleet shares: broker, timing, clock."""

    broker_host: str
    broker_port: int
    time_scale: float = 1.0
    #: Simulated epoch time at ``wall_start`` (defaults to the wall clock: real time of day).
    sim_start: float = 0.0
    wall_start: float = 0.0
    keepalive_s: int = 60
    session_expiry_s: int = 86400
    connect_timeout_s: float = 10.0
    publish_timeout_s: float = 30.0
    backoff_min_s: float = 0.5
    backoff_max_s: float = 30.0
    #: Messages a meter keeps while it cannot send; the oldest readings go first beyond this.
    max_buffer: int = 10_000
    ems_inbox_size: int = 100

    def sim_time(self, wall: float) -> float:
        """The meter's physical clock (drives the load shape and the registers)."""
        return self.sim_start + (wall - self.wall_start) * self.time_scale
