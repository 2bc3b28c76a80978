"""Simulated smart meters: many meters in one asyncio process, each with its own MQTT v5 session.

Public API: :class:`MeterFleet` (asyncio), :class:`FleetThread` (runs a fleet in a
background thread for synchronous code), :class:`ConcentratorFleet` (N concentrators x M meters,
batched uplink), :class:`LinkProfile` and the named
``LINKS``, and :mod:`meter_sim.accounts` for provisioning meter accounts. The CLI is
``python -m meter_sim run ...``; see docs/meter_sim.md.
"""

from meter_sim.concentrator import ConcentratorFleet, ConcentratorStats
from meter_sim.config import FleetConfig
from meter_sim.fleet import FleetStats, FleetThread, MeterFleet, raise_nofile_limit
from meter_sim.meter import MeterStats, SimMeter
from meter_sim.profile import LINKS, LinkProfile, LoadModel

__all__ = [
    "LINKS",
    "ConcentratorFleet",
    "ConcentratorStats",
    "FleetConfig",
    "FleetStats",
    "FleetThread",
    "LinkProfile",
    "LoadModel",
    "MeterFleet",
    "MeterStats",
    "SimMeter",
    "raise_nofile_limit",
]
