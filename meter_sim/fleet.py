"""Many simulated meters in one asyncio process, and a thread runner for synchronous callers.

:class:`MeterFleet` owns the meters of one process and bounds how many connect at
once (so 10,000 meters do not stampede the broker). :class:`FleetThread` runs a
fleet on its own event loop in a background thread, for pytest and the demo.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import resource
import threading
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import Any, Self, TypeVar

from meter_sim.config import FleetConfig
from meter_sim.meter import MeterStats, SimMeter
from meter_sim.profile import LinkProfile
from metertwin.core.paho_fast import speed_up_paho

T = TypeVar("T")
LinkSpec = str | tuple[float, float] | LinkProfile


def tune_gc() -> None:
    """For a process that hosts a big fleet: keep the collector off the long-lived objects.

    Thousands of meters are a few million long-lived objects; full collections
    walking them stall the loop (seconds at 10,000 meters). Freeze what exists now
    (call after the fleet is built and connected) and collect the young
    generation less often. For processes that own their fleet (CLI, scale check).
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def raise_nofile_limit() -> int:
    """Raise this process's open-file soft limit to the hard limit; return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


@dataclass
class FleetStats:
    """Fleet-wide totals at one instant."""

    meters: int
    connected: int
    offline: int
    readings_generated: int
    readings_sent: int
    buffered: int
    dropped: int
    commands_applied: int
    commands_rejected: int
    reads_answered: int
    ems_received: int
    ems_sent: int
    malformed: int
    messages_in: int
    messages_out: int
    connects: int
    connect_failures: int
    disconnects: int
    ts: float

    @property
    def messages_total(self) -> int:
        return self.messages_in + self.messages_out


class MeterFleet:
    """A fleet of simulated meters sharing one event loop.

    ``credentials`` maps meter id to MQTT password (username and client id are
    the meter id). ``link`` is the default link profile (``"nbiot"``, ``"wifi"``,
    ``"lan"``, ``(lo_s, hi_s)``); ``links`` overrides it per meter. ``time_scale``
    speeds up the meters' physical clock (load shape and registers) — message
    timestamps and the reporting interval stay in wall-clock seconds.
    ``sim_start`` is the simulated epoch time at start (default: now). ``prosumers``, when given,
    names exactly the meters with PV (a grid topology's PV share per feeder,
    :mod:`meter_sim.topology`) instead of drawing ``prosumer_share`` of them.
    """

    def __init__(
        self,
        broker_host: str,
        broker_port: int,
        credentials: dict[str, str],
        *,
        seed: int = 1,
        reporting_interval_s: float = 15.0,
        prosumer_share: float = 0.3,
        link: LinkSpec = "lan",
        links: dict[str, LinkSpec] | None = None,
        time_scale: float = 1.0,
        sim_start: float | None = None,
        tz_offset_h: float = 0.0,
        ems_interval_s: float | None = None,
        on_ems: Callable[[str, bytes], None] | None = None,
        connect_concurrency: int = 100,
        keepalive_s: int = 60,
        session_expiry_s: int = 86400,
        max_buffer: int = 10_000,
        prosumers: Collection[str] | None = None,
    ) -> None:
        if not 0.0 <= prosumer_share <= 1.0:
            raise ValueError(f"prosumer_share {prosumer_share!r} is outside [0, 1]")
        if not 1.0 <= reporting_interval_s <= 86400.0:
            raise ValueError(f"reporting_interval_s {reporting_interval_s!r} is outside [1, 86400]")
        if not 0.0 < time_scale <= 1e6:
            raise ValueError(f"time_scale {time_scale!r} is outside (0, 1e6]")
        if connect_concurrency < 1:
            raise ValueError(f"connect_concurrency {connect_concurrency!r} must be at least 1")
        wall = time.time()
        self.config = FleetConfig(
            broker_host=broker_host, broker_port=broker_port, time_scale=time_scale,
            sim_start=wall if sim_start is None else sim_start, wall_start=wall,
            keepalive_s=keepalive_s, session_expiry_s=session_expiry_s, max_buffer=max_buffer,
        )
        self.connect_concurrency = connect_concurrency
        default_link = LinkProfile.parse(link)
        per_meter = {m: LinkProfile.parse(spec) for m, spec in (links or {}).items()}
        self._gate: asyncio.Semaphore | None = None
        self._kwargs: dict[str, Any] = {
            "seed": seed, "reporting_interval_s": reporting_interval_s, "prosumer_share": prosumer_share,
            "tz_offset_h": tz_offset_h, "ems_interval_s": ems_interval_s, "on_ems": on_ems,
        }
        pv = None if prosumers is None else frozenset(prosumers)
        self.meters: dict[str, SimMeter] = {
            meter_id: SimMeter(meter_id, password, self.config, link=per_meter.get(meter_id, default_link),
                               prosumer=None if pv is None else meter_id in pv, **self._kwargs)
            for meter_id, password in credentials.items()
        }
        self.started = False

    # ---------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start every meter; connections ramp up ``connect_concurrency`` at a time (not awaited)."""
        raise_nofile_limit()
        speed_up_paho()
        self._gate = asyncio.Semaphore(self.connect_concurrency)
        for meter in self.meters.values():
            meter._gate = self._gate
            meter.start()
        self.started = True

    async def wait_connected(self, timeout_s: float = 60.0, count: int | None = None) -> bool:
        """Wait until ``count`` (default all) meters are connected; False on timeout."""
        want = len(self.meters) if count is None else count
        deadline = time.monotonic() + timeout_s
        while self.connected_count() < want:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    async def stop(self, flush_timeout_s: float = 2.0) -> None:
        """Stop every meter: each sends what it has queued (up to ``flush_timeout_s``), then
        disconnects leaving its retained ``offline``."""
        await asyncio.gather(*(m.stop(flush_timeout_s) for m in self.meters.values()), return_exceptions=True)
        self.started = False

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ---------------------------------------------------------------- control
    def meter(self, meter_id: str) -> SimMeter:
        """The live meter object (read its counters on the fleet's loop, or use :meth:`stats`)."""
        try:
            return self.meters[meter_id]
        except KeyError:
            raise KeyError(f"meter {meter_id!r} is not in this fleet") from None

    def go_offline(self, meter_id: str, seconds: float | None = None) -> None:
        """Take a meter off the air for ``seconds`` (None: until :meth:`go_online`)."""
        self.meter(meter_id).go_offline(seconds)

    def go_online(self, meter_id: str) -> None:
        self.meter(meter_id).go_online()

    def set_link(self, meter_id: str, link: LinkSpec) -> None:
        self.meter(meter_id).link = LinkProfile.parse(link)

    def send_ems(self, meter_id: str, payload: dict[str, Any]) -> str:
        """Have the meter's local EMS send ``payload`` up; returns the EMS message id."""
        return self.meter(meter_id).send_ems(payload)

    def report_now(self, meter_id: str) -> int:
        """Take and queue a reading now; returns its seq."""
        return self.meter(meter_id).report_now().seq

    def add_load(self, meter_id: str, watts: float) -> None:
        """Switch on ``watts`` of load beside the household's (0 switches it off again); the meter's
        settings in force (relay, load limit) still apply to the total."""
        if not 0.0 <= watts <= 1e6:
            raise ValueError(f"extra load {watts!r} W is outside [0, 1e6]")
        self.meter(meter_id).extra_load_w = float(watts)

    # ---------------------------------------------------------------- numbers
    def connected_count(self) -> int:
        return sum(1 for m in self.meters.values() if m.connected)

    def stats(self) -> FleetStats:
        ms = self.meters.values()
        return FleetStats(
            meters=len(self.meters),
            connected=sum(m.connected for m in ms),
            offline=sum(m.offline for m in ms),
            readings_generated=sum(m.readings_generated for m in ms),
            readings_sent=sum(m.readings_sent for m in ms),
            buffered=sum(len(m.outbox) for m in ms),
            dropped=sum(m.dropped for m in ms),
            commands_applied=sum(m.commands_applied for m in ms),
            commands_rejected=sum(m.commands_rejected for m in ms),
            reads_answered=sum(m.reads_answered for m in ms),
            ems_received=sum(m.ems_received for m in ms),
            ems_sent=sum(m.ems_sent for m in ms),
            malformed=sum(m.malformed for m in ms),
            messages_in=sum(m.messages_in for m in ms),
            messages_out=sum(m.messages_out for m in ms),
            connects=sum(m.connects for m in ms),
            connect_failures=sum(m.connect_failures for m in ms),
            disconnects=sum(m.disconnects for m in ms),
            ts=time.time(),
        )


class FleetThread:
    """Run a :class:`MeterFleet` on its own event loop in a daemon thread.

    Takes :class:`MeterFleet`'s arguments. Every method is safe to call from any
    thread; they run on the fleet's loop and return its answer.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.fleet = MeterFleet(*args, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self, *, wait_connected: bool = True, timeout_s: float = 60.0) -> Self:
        """Start the loop and the fleet; by default wait until every meter is connected."""
        if self._thread is not None:
            raise RuntimeError("fleet thread already started")
        self._thread = threading.Thread(target=self._main, name="meter-sim", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"meter fleet loop did not start within {timeout_s} s")
        self.call(self.fleet.start, timeout_s=timeout_s)
        if wait_connected and not self.call(self.fleet.wait_connected, timeout_s, timeout_s=timeout_s + 5):
            stats = self.stats()
            self.stop()
            raise TimeoutError(
                f"only {stats.connected} of {stats.meters} meters connected within {timeout_s} s "
                f"({stats.connect_failures} failed attempts)"
            )
        return self

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        loop.call_soon(self._ready.set)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def call(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 30.0) -> Any:
        """Run ``fn(*args)`` on the fleet's loop (awaited if it is a coroutine function); return its result."""
        if self._loop is None:
            raise RuntimeError("fleet thread is not running")

        async def run() -> Any:
            result = fn(*args)
            if asyncio.iscoroutine(result):
                result = await result
            return result

        fut = asyncio.run_coroutine_threadsafe(run(), self._loop)
        try:
            return fut.result(timeout_s)
        except concurrent.futures.TimeoutError:
            fut.cancel()
            raise TimeoutError(f"{getattr(fn, '__name__', fn)!r} did not finish within {timeout_s} s") from None

    def stop(self, timeout_s: float = 30.0) -> None:
        """Stop the fleet (each meter says ``offline``) and the loop; idempotent."""
        if self._loop is None or self._thread is None:
            return
        with contextlib.suppress(TimeoutError, RuntimeError):
            self.call(self.fleet.stop, timeout_s=timeout_s)
        loop = self._loop
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._cancel_all_and_stop)
        self._thread.join(timeout_s)
        self._thread = None
        self._loop = None

    def _cancel_all_and_stop(self) -> None:
        assert self._loop is not None
        for task in asyncio.all_tasks(self._loop):
            task.cancel()
        self._loop.call_later(0.1, self._loop.stop)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- thread-safe shortcuts
    def meter(self, meter_id: str) -> MeterStats:
        """A snapshot of one meter (counters, registers, settings)."""
        return self.call(lambda: self.fleet.meter(meter_id).stats())  # type: ignore[no-any-return]

    def stats(self) -> FleetStats:
        return self.call(self.fleet.stats)  # type: ignore[no-any-return]

    def ems_inbox(self, meter_id: str) -> list[bytes]:
        """What the meter's local EMS has received, oldest first."""
        return self.call(lambda: list(self.fleet.meter(meter_id).ems_inbox))  # type: ignore[no-any-return]

    def go_offline(self, meter_id: str, seconds: float | None = None) -> None:
        self.call(self.fleet.go_offline, meter_id, seconds)

    def go_online(self, meter_id: str) -> None:
        self.call(self.fleet.go_online, meter_id)

    def set_link(self, meter_id: str, link: LinkSpec) -> None:
        self.call(self.fleet.set_link, meter_id, link)

    def send_ems(self, meter_id: str, payload: dict[str, Any]) -> str:
        return self.call(self.fleet.send_ems, meter_id, payload)  # type: ignore[no-any-return]

    def report_now(self, meter_id: str) -> int:
        return self.call(self.fleet.report_now, meter_id)  # type: ignore[no-any-return]

    def add_load(self, meter_id: str, watts: float) -> None:
        self.call(self.fleet.add_load, meter_id, watts)

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
        """Poll ``predicate`` on the fleet's loop until true or the deadline; returns the last value."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.call(predicate):
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(interval_s)

    @property
    def meter_ids(self) -> Iterable[str]:
        return self.fleet.meters.keys()
