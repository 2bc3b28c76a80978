"""The VEN bridge: one OpenADR 2.0b VEN (openleadr ``OpenADRClient``) per twin, many per asyncio process.

A FaaS function cannot poll a VTN, so this long-running service does the OpenADR side
for a shard of the zone's twins and hands every event delivery to the stateless
``dr-event`` function (``POST {gateway}/function/edge-dr-event/events``), which decides
and schedules. See ``docs/dr.md``.
"""

from dr_bridge.bridge import Bridge, BridgeConfig, TwinVen
from dr_bridge.invoke import HttpInvoker, Invoke, handler_invoker
from dr_bridge.shard import in_shard, shard_of

__all__ = ["Bridge", "BridgeConfig", "HttpInvoker", "Invoke", "TwinVen", "handler_invoker", "in_shard", "shard_of"]
