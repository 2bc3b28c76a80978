"""The delay-line proxy adds the configured delay, keeps order, counts bytes exactly and shapes bandwidth."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from collections.abc import AsyncIterator

import pytest

from loadtest.proxy import DelayProxy, LinkSpec, Route, load_config


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def _sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    total = 0
    while data := await reader.read(65536):
        total += len(data)
    writer.write(str(total).encode())
    await writer.drain()
    writer.close()


@pytest.fixture
async def echo_port() -> AsyncIterator[int]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    yield int(server.sockets[0].getsockname()[1])
    server.close()


async def _rtts(port: int, n: int, payload: bytes) -> list[float]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            writer.write(payload)
            await writer.drain()
            await asyncio.wait_for(reader.readexactly(len(payload)), 5)
            out.append(time.perf_counter() - t0)
    finally:
        writer.close()
    return out


def _proxy(target: int, **link: object) -> DelayProxy:
    spec = LinkSpec(name="a-b", **link)  # type: ignore[arg-type]
    return DelayProxy([spec], [Route("r", "a-b", "a", "b", "127.0.0.1", target)], max_duration_s=60, seed=1)


async def test_adds_configured_delay_within_tolerance(echo_port: int) -> None:
    direct = statistics.median(await _rtts(echo_port, 20, b"x" * 100))
    async with _proxy(echo_port, latency_ms=20.0) as proxy:
        proxied = statistics.median(await _rtts(proxy.port("r"), 20, b"x" * 100))
    added_ms = (proxied - direct) * 1000
    # 20 ms each way; the event loop adds a little (field notes: ~0.2 ms per round trip).
    assert 40.0 <= added_ms <= 46.0, added_ms


async def test_jitter_stays_in_bounds_and_keeps_order(echo_port: int) -> None:
    async with _proxy(echo_port, latency_ms=10.0, jitter_ms=5.0) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port("r"))
        sent = b"".join(i.to_bytes(4, "big") for i in range(500))
        for i in range(0, len(sent), 40):  # many small chunks, each with its own jitter
            writer.write(sent[i:i + 40])
            await writer.drain()
            await asyncio.sleep(0)
        got = await asyncio.wait_for(reader.readexactly(len(sent)), 10)
        writer.close()
        rtts = await _rtts(proxy.port("r"), 15, b"y" * 10)
    assert got == sent
    # A new connection first waits one round trip (the handshake over the link): 20 ms + 2 x (10 +- 5).
    assert rtts[0] >= 0.029, rtts
    # Then 2 x (10 +- 5) ms per exchange, plus event-loop overhead on a busy machine.
    assert all(0.009 <= r <= 0.045 for r in rtts[1:]), rtts


async def test_counts_bytes_exactly_per_link_and_direction(echo_port: int) -> None:
    async with _proxy(echo_port, latency_ms=1.0) as proxy:
        await _rtts(proxy.port("r"), 7, b"z" * 1234)
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port("r"))
        writer.write(b"q" * 100_000)
        await writer.drain()
        await asyncio.wait_for(reader.readexactly(100_000), 5)
        writer.close()
        stats = proxy.stats()
    expected = 7 * 1234 + 100_000
    assert stats["links"]["a-b"] == {"a->b": expected, "b->a": expected}
    assert stats["routes"]["r"] == {"a->b": expected, "b->a": expected}
    assert stats["connections"]["r"] == 2


async def test_shapes_bandwidth_approximately() -> None:
    server = await asyncio.start_server(_sink, "127.0.0.1", 0)
    port = int(server.sockets[0].getsockname()[1])
    size = 1_000_000  # 8 Mbit at 16 Mbit/s: 0.5 s
    try:
        proxy = DelayProxy(
            [LinkSpec("a-b", latency_ms=0.0, bandwidth_mbps={"a->b": 16.0})],
            [Route("r", "a-b", "a", "b", "127.0.0.1", port)], max_duration_s=60,
        )
        async with proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port("r"))
            t0 = time.perf_counter()
            writer.write(b"b" * size)
            await writer.drain()
            writer.write_eof()
            reply = await asyncio.wait_for(reader.read(), 10)
            elapsed = time.perf_counter() - t0
            writer.close()
    finally:
        server.close()
    assert int(reply) == size
    assert 0.4 <= elapsed <= 0.75, elapsed


async def test_routes_chain_by_name(echo_port: int) -> None:
    """A route may relay to another route's port: each hop adds its link's delay and counts its bytes."""
    proxy = DelayProxy(
        [LinkSpec("a-b", latency_ms=5.0), LinkSpec("b-c", latency_ms=10.0)],
        [Route("far", "b-c", "b", "c", "127.0.0.1", echo_port),
         Route("near", "a-b", "a", "b", "127.0.0.1", target_route="far")],
        max_duration_s=60,
    )
    async with proxy:
        rtts = await _rtts(proxy.port("near"), 10, b"abcd")
        stats = proxy.stats()
    assert 0.029 <= statistics.median(rtts) <= 0.040, rtts  # 2 x (5 + 10) ms
    assert stats["links"]["a-b"]["a->b"] == 40
    assert stats["links"]["b-c"]["c->b"] == 40
    with pytest.raises(ValueError, match="unknown target_route 'nope'"):
        DelayProxy([LinkSpec("a-b")], [Route("r", "a-b", "a", "b", "127.0.0.1", target_route="nope")])


async def test_stats_endpoint_and_file(echo_port: int, tmp_path) -> None:
    stats_file = tmp_path / "stats.json"
    proxy = DelayProxy(
        [LinkSpec("a-b")], [Route("r", "a-b", "a", "b", "127.0.0.1", echo_port)],
        max_duration_s=60, stats_port=0, stats_file=stats_file,
    )
    async with proxy:
        await _rtts(proxy.port("r"), 3, b"abc")
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.stats_port)
        writer.write(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
    body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert body["links"]["a-b"]["a->b"] == 9
    assert json.loads(stats_file.read_text())["routes"]["r"]["b->a"] == 9


async def test_stops_itself_after_max_duration(echo_port: int) -> None:
    proxy = DelayProxy([LinkSpec("a-b")], [Route("r", "a-b", "a", "b", "127.0.0.1", echo_port)], max_duration_s=0.3)
    await proxy.start()
    port = proxy.port("r")
    await asyncio.wait_for(proxy.run_until_stopped(), 5)
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


def test_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match=r"target_host .10\.0\.0\.1. is not loopback"):
        Route("r", "a-b", "a", "b", "10.0.0.1", 80)
    with pytest.raises(ValueError, match=r"latency_ms -1\.0"):
        LinkSpec("a-b", latency_ms=-1.0)
    with pytest.raises(ValueError, match="unknown link 'x-y'"):
        DelayProxy([LinkSpec("a-b")], [Route("r", "x-y", "x", "y", "127.0.0.1", 1)])
    links, routes = load_config({"links": {"a-b": {"latency_ms": 3, "bandwidth_mbps": {"a->b": 10}}},
                                 "routes": [{"name": "r", "link": "a-b", "src": "a", "dst": "b", "target_port": 9}]})
    assert links[0].bandwidth_mbps == {"a->b": 10.0}
    assert routes[0].target_port == 9
