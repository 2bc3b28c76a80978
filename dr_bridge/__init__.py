"""The VEN bridge: one OpenADR 2.0b VEN (openleadr ``OpenADRClient``) per twin, many per asyncio process.

A FaaS function cannot poll a VTN, so this long-running service does the OpenADR side
for a shard of the zone's twins and hands every event delivery to the stateless
``dr-event`` function (``POST {gateway}/function/edge-dr-event/events``), which decides
and schedules. See ``docs/dr.md``.

This is a separate deployable service, not part of the shared ``metertwin`` package and not a
function: the VTN-facing VEN processes (one openleadr VEN per twin, a shard of the zone's twins
per process; ``python -m dr_bridge``, ``dr_bridge/Dockerfile``, ``deploy/k8s/dr-bridge/``). It
never imports :mod:`metertwin.dr`: it calls the ``dr-event`` function through the zone's gateway
(:class:`dr_bridge.invoke.HttpInvoker`; :func:`~dr_bridge.invoke.handler_invoker` calls the same handler
in-process, for tests and the demo), and that function holds the decisions, event state and execution.
"""

from dr_bridge.bridge import Bridge, BridgeConfig
from dr_bridge.invoke import HttpInvoker, Invoke, handler_invoker
from dr_bridge.shard import in_shard, shard_of
from dr_bridge.ven import TwinVen

__all__ = ["Bridge", "BridgeConfig", "HttpInvoker", "Invoke", "TwinVen", "handler_invoker", "in_shard", "shard_of"]
