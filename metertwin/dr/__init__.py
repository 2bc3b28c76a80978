"""The demand-response capability: the twin as its meter's OpenADR 2.0b VEN (decide, remember,
schedule, execute). The VTN-facing VEN processes are the separate ``dr_bridge`` service.

Modules, in the order an event passes them:

* :mod:`~metertwin.dr.wire` — what the bridge posts (:class:`~metertwin.dr.wire.Delivery`, events);
* :mod:`~metertwin.dr.decisions` — optIn/optOut, OpenADR response codes, consumer preferences, the plan;
* :mod:`~metertwin.dr.schedule` — answering a delivery, randomization, plan times, due actions, cancels;
* :mod:`~metertwin.dr.execution` — sending load limits through the write capability's commands, restoring;
* :mod:`~metertwin.dr.store` — the event records, preferences, load-control state and due set in Redis;
* :mod:`~metertwin.dr.views` — telemetry for the VTN's reports and the operator's views;
* :mod:`~metertwin.dr.settings` and :mod:`~metertwin.dr.keys` — tunables, Redis keys and TTLs.
"""
