"""The gateway's access log: one structured line per function call (logger ``gateway.access``).

Each line names the time (UTC, ms), zone, function, method, the route template the
function's router matched (``/meters/{meter_id}/reading``; ``-`` when none did), the raw
path, status, duration, the call id and how the call came in (``http``, or ``internal`` for
async calls and connectors), and the caller's subject and scopes as the function's
:func:`metertwin.core.auth.authenticate` verified them (read from
:data:`metertwin.core.auth.CALLER`: the token is neither parsed again nor ever logged). A call
whose token was missing or bad has no subject.

Format ``json`` (default, one object per line) or ``text`` (``key=value`` pairs). Lines are
at level ``info`` (answers below 400), ``warning`` (4xx) or ``error`` (5xx); the configured
level is the threshold: ``info`` (default) writes every call, ``warning`` only failures,
``off`` nothing. The line is built after the response is sent, from values the fast path
already holds.

In ``python -m gateway`` (:func:`configure`) lines bypass :mod:`logging` and go to stderr
through a 64 KB buffer flushed every :data:`FLUSH_S` and at exit: a ``logging`` record and a
write syscall per call cost about a fifth of the cached-read throughput, the buffer ~3 %
(``python -m loadtest.bench --only cached``). A process killed with SIGKILL loses at most
the last :data:`FLUSH_S` of lines. In-process (tests), lines go to the ``gateway.access`` logger.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import json
import logging
import re
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, Literal

from gateway.openapi import route_template
from metertwin.core.http import Router

if TYPE_CHECKING:
    from gateway.functions import LoadedFunction
    from metertwin.core.auth import Principal

log = logging.getLogger("gateway.access")

Format = Literal["json", "text"]
FORMATS: tuple[str, ...] = ("json", "text")
LEVELS: tuple[str, ...] = ("debug", "info", "warning", "error", "off")
_OFF = logging.CRITICAL + 10
_NAMES = {logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error"}
_str = json.dumps  # a JSON string, or null for None
#: Seconds between flushes of the buffered access-log stream (see :func:`configure`).
FLUSH_S = 0.2


class BufferedLines:
    """Lines appended to a buffered text stream, flushed by a daemon thread every :data:`FLUSH_S` and at exit."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._lock = threading.Lock()
        threading.Thread(target=self._flush_forever, name="access-log-flush", daemon=True).start()
        atexit.register(self.flush)

    def write(self, line: str) -> None:
        with self._lock:
            self._stream.write(line + "\n")

    def flush(self) -> None:
        # stderr closed or gone: nothing left to write to.
        with self._lock, contextlib.suppress(OSError, ValueError):
            self._stream.flush()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(FLUSH_S)
            self.flush()


#: Set by :func:`configure`; ``None``: lines go to the ``gateway.access`` logger.
_sink: BufferedLines | None = None


@dataclass(frozen=True, slots=True)
class _Route:
    method: str
    regex: re.Pattern[str]
    template: str


def _routes(fn: LoadedFunction) -> tuple[_Route, ...]:
    # The router's own patterns in its own order: the template logged is the one dispatch matched.
    router = getattr(fn.module, "router", None)
    if not isinstance(router, Router):
        return ()
    return tuple(_Route(r.method, r.regex, route_template(r.regex.pattern)) for r in getattr(router, "_routes", []))


def _level(name: str) -> int:
    if name not in LEVELS:
        raise ValueError(f"access log level {name!r} is not one of {list(LEVELS)}")
    return _OFF if name == "off" else int(logging.getLevelName(name.upper()))


class AccessLog:
    """Writes the access line of each call; ``level="off"`` disables it."""

    def __init__(self, zone: str, functions: dict[str, LoadedFunction], *, fmt: str = "json",
                 level: str = "info") -> None:
        if fmt not in FORMATS:
            raise ValueError(f"access log format {fmt!r} is not one of {list(FORMATS)}")
        self.zone = zone
        self.fmt = fmt
        self.threshold = _level(level)
        self._routes = {name: _routes(fn) for name, fn in functions.items()}
        self._zone = _str(zone)
        self._second = 0
        self._stamp = ""

    def route(self, function: str, method: str, path: str) -> str:
        """The route template of ``method path`` in ``function`` (``-`` when no route matches)."""
        for route in self._routes.get(function, ()):
            if route.method == method and route.regex.match(path) is not None:
                return route.template
        return "-"

    def record(self, function: str, method: str, path: str, status: int, duration_s: float,
               call_id: bytes | str, caller: Principal | None, via: str = "http") -> None:
        """Log one call (cheap when the level is disabled)."""
        level = logging.INFO if status < 400 else logging.WARNING if status < 500 else logging.ERROR
        if level < self.threshold:
            return
        sink = _sink
        if sink is None and not log.isEnabledFor(level):
            return
        now = time.time()
        second = int(now)
        if second != self._second:  # strftime once a second, not per call
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        stamp = f"{self._stamp}.{int((now - second) * 1000):03d}Z"
        route = self.route(function, method, path)
        cid = call_id.decode("latin-1") if isinstance(call_id, bytes) else call_id
        subject = caller.subject if caller is not None else None
        scope = " ".join(sorted(caller.scopes)) if caller is not None else None
        if self.fmt == "json":
            # Built by hand: a dict through json's encoder costs twice as much; names, methods and
            # templates come from stack.yml and the routers, the rest is escaped.
            line = (f'{{"time":"{stamp}","level":"{_NAMES[level]}","zone":{self._zone},"function":{_str(function)},'
                    f'"method":{_str(method)},"route":{_str(route)},"path":{_str(path)},"status":{status},'
                    f'"duration_ms":{duration_s * 1000:.3f},"subject":{_str(subject)},"scope":{_str(scope)},'
                    f'"call_id":{_str(cid)},"via":"{via}"}}')
        else:
            fields = {"time": stamp, "level": _NAMES[level], "zone": self.zone, "function": function,
                      "method": method, "route": route, "path": path, "status": status,
                      "duration_ms": f"{duration_s * 1000:.3f}", "subject": subject, "scope": scope,
                      "call_id": cid, "via": via}
            line = " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        if sink is not None:
            sink.write(line)
        else:
            log.log(level, line)


def _text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str) and (not value or " " in value or '"' in value or "=" in value):
        return json.dumps(value)  # quoted, so a subject with spaces stays one field
    return str(value)


def configure(stream: IO[str] | None = None) -> None:
    """Write access lines alone (no log prefix) to ``stream``, default a 64 KB-buffered stderr.

    What ``python -m gateway`` (and each of its workers) does once per process.
    """
    global _sink
    if _sink is not None:
        return
    if stream is None:
        sys.stderr.flush()
        try:
            fd = sys.stderr.fileno()
        except (OSError, ValueError):  # stderr replaced (captured): write to it as it is
            _sink = BufferedLines(sys.stderr)
            return
        stream = io.TextIOWrapper(io.BufferedWriter(io.FileIO(fd, "w", closefd=False),
                                                    buffer_size=65_536), encoding="utf-8", errors="replace")
    _sink = BufferedLines(stream)
