"""A process-wide speed-up for paho-mqtt 2.1's reason codes (pure optimisation, same behaviour)."""

from __future__ import annotations

from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode


def speed_up_paho() -> None:
    """Make paho's ``ReasonCode()`` cheap: one shared name table instead of a new one per instance.

    paho 2.1 rebuilds a 40-entry dict of dicts in every ``ReasonCode.__init__``
    (~0.2 ms), and creates one per PUBACK, SUBACK entry and CONNACK: with 10,000
    simulated meters that was most of the simulator's CPU, and in a gateway's MQTT
    connector it is paid for every message acknowledged. The table is only ever read,
    so sharing it changes no behaviour. Idempotent; affects the whole process.
    """
    if getattr(ReasonCode, "_metertwin_fast", False):
        return
    names = ReasonCode(PacketTypes.PUBACK).names

    def fast_init(self: ReasonCode, packetType: int, aName: str = "Success", identifier: int = -1) -> None:  # noqa: N803
        self.packetType = packetType
        self.names = names
        if identifier == -1:
            if packetType == PacketTypes.DISCONNECT and aName == "Success":
                aName = "Normal disconnection"  # noqa: N806
            self.set(aName)  # type: ignore[no-untyped-call]
        else:
            self.value = identifier
            self.getName()  # type: ignore[no-untyped-call]

    ReasonCode.__init__ = fast_init  # type: ignore[method-assign]
    ReasonCode._metertwin_fast = True  # type: ignore[attr-defined]
