"""Live event streams: every twin change as an event in the zone's Redis Stream, served over SSE.

* :mod:`~metertwin.stream.events` — the event model and :func:`~metertwin.stream.events.emit`, the
  one call the twin makes on a change (this capability's named interface);
* :mod:`~metertwin.stream.keys` — the per-zone stream key (prefix ``mt:ev:``) and its trimming;
* :mod:`~metertwin.stream.settings` — retention, queue sizes, heartbeats (``STREAM_`` variables);
* :mod:`~metertwin.stream.access` — what a token may see (scopes, meter binding) and the filters;
* :mod:`~metertwin.stream.hub` — one XREAD loop fanning entries out to every client's bounded queue;
* :mod:`~metertwin.stream.service` — the ASGI app (``/events`` as Server-Sent Events, ``/healthz``);
  ``python -m metertwin.stream`` runs it under uvicorn.
"""
