"""Redis keys of the stream capability (prefix ``mt:ev:``).

One stream per zone, not per meter: a client following the fleet reads one key with one
``XREAD``, and a stream id orders every event of the zone (what ``Last-Event-ID`` resumes
from). It is never touched by a Lua script, so on Redis Cluster it simply lives in its own slot.
"""

from __future__ import annotations

from metertwin.core.keys import PREFIX


def zone_events(zone: str) -> str:
    """Stream: the zone's twin events (fields ``t`` type, ``m`` meter, ``s`` sub-topic, ``d`` JSON data).

    Trimmed on append by length (``XADD MAXLEN ~``, :attr:`StreamSettings.maxlen`) and, at most
    once a second per process, by age (``XTRIM MINID ~``, :attr:`StreamSettings.retention_s`).
    """
    return f"{PREFIX}:ev:{zone}"
