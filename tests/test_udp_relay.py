"""The fault-injection relay itself: each fault does what it says, and nothing else.

A tiny UDP echo server stands in for the sensor and a plain UDP socket for the gateway.
"Nothing arrived" is never checked by sleeping: a marker datagram sent after the faults are
switched off must arrive, and whatever should have been lost did not arrive before it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from .conftest import WAIT
from .udp_relay import UdpRelay


class Endpoint(asyncio.DatagramProtocol):
    """A UDP socket that queues what it receives; the server flavour echoes it back."""

    def __init__(self, echo: bool = False) -> None:
        self.echo = echo
        self.received: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a datagram transport

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait(data)
        if self.echo and self.transport is not None:
            self.transport.sendto(data, addr)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data)

    async def next(self) -> bytes:
        async with asyncio.timeout(WAIT):
            return await self.received.get()

    async def until(self, marker: bytes) -> list[bytes]:
        """Everything received up to and including `marker`."""
        got = []
        while True:
            data = await self.next()
            got.append(data)
            if data == marker:
                return got


async def endpoint(**kwargs: Any) -> Endpoint:
    loop = asyncio.get_running_loop()
    proto = Endpoint()
    await loop.create_datagram_endpoint(lambda: proto, **kwargs)
    return proto


@pytest_asyncio.fixture
async def echo() -> AsyncIterator[Endpoint]:
    loop = asyncio.get_running_loop()
    server = Endpoint(echo=True)
    transport, _ = await loop.create_datagram_endpoint(
        lambda: server, local_addr=("127.0.0.1", 0)
    )
    yield server
    transport.close()


@pytest_asyncio.fixture
async def relay(echo: Endpoint) -> AsyncIterator[UdpRelay]:
    assert echo.transport is not None
    async with UdpRelay(echo.transport.get_extra_info("sockname"), seed=7) as r:
        yield r


@pytest_asyncio.fixture
async def client(relay: UdpRelay) -> AsyncIterator[Endpoint]:
    proto = await endpoint(remote_addr=("127.0.0.1", relay.port))
    yield proto
    assert proto.transport is not None
    proto.transport.close()


async def test_passes_both_ways_unchanged(
    relay: UdpRelay, echo: Endpoint, client: Endpoint
) -> None:
    for data in (b"one", b"two", b"\x00" * 1200):
        client.send(data)
        assert await echo.next() == data
        assert await client.next() == data
    assert (relay.up.counters.received, relay.up.counters.sent) == (3, 3)
    assert (relay.down.counters.received, relay.down.counters.sent) == (3, 3)


async def test_drop_all_up_then_nothing_lost_after(
    relay: UdpRelay, echo: Endpoint, client: Endpoint
) -> None:
    relay.up.faults.drop = 1.0
    for number in range(10):
        client.send(b"lost %d" % number)
    await relay.wait_for(lambda: relay.up.counters.received == 10)
    relay.up.faults.drop = 0.0
    client.send(b"marker")
    assert await echo.until(b"marker") == [b"marker"]
    assert relay.up.counters.dropped == 10


async def test_drop_share_is_about_right_and_repeatable(echo: Endpoint) -> None:
    assert echo.transport is not None
    target = echo.transport.get_extra_info("sockname")
    patterns = []
    for _ in range(2):
        async with UdpRelay(target, seed=3) as relay:
            relay.down.faults.drop = 0.3  # the echoes come back through the lossy direction
            client = await endpoint(remote_addr=("127.0.0.1", relay.port))
            for number in range(1000):  # in batches, so that no socket buffer overflows
                client.send(b"%d" % number)
                if number % 50 == 49:
                    await relay.wait_for(lambda r=relay, n=number: r.down.counters.received > n)
            relay.down.faults.drop = 0.0
            client.send(b"marker")
            got = await client.until(b"marker")
            assert client.transport is not None
            client.transport.close()
            while not echo.received.empty():
                echo.received.get_nowait()
        assert 250 <= relay.down.counters.dropped <= 350
        assert relay.up.counters.dropped == 0
        patterns.append(got)
    assert patterns[0] == patterns[1]  # the same seed drops the same datagrams


async def test_duplicate(relay: UdpRelay, echo: Endpoint, client: Endpoint) -> None:
    relay.down.faults.duplicate = 1.0
    client.send(b"x")
    assert await echo.next() == b"x"
    assert [await client.next(), await client.next()] == [b"x", b"x"]
    assert relay.down.counters.duplicated == 1 and relay.down.counters.sent == 2


async def test_reorder_holds_one_until_the_next(
    relay: UdpRelay, echo: Endpoint, client: Endpoint
) -> None:
    relay.up.faults.reorder = 1.0
    for data in (b"a", b"b", b"c", b"d"):
        client.send(data)
    assert [await echo.next() for _ in range(4)] == [b"b", b"a", b"d", b"c"]
    assert relay.up.counters.reordered == 2


async def test_reorder_releases_a_lone_datagram_after_the_hold_timeout(
    echo: Endpoint,
) -> None:
    assert echo.transport is not None
    async with UdpRelay(echo.transport.get_extra_info("sockname"), hold_timeout=0.05) as relay:
        relay.up.faults.reorder = 1.0
        client = await endpoint(remote_addr=("127.0.0.1", relay.port))
        client.send(b"alone")
        assert await echo.next() == b"alone"


async def test_delay_keeps_order(relay: UdpRelay, echo: Endpoint, client: Endpoint) -> None:
    relay.up.faults.delay = 0.2
    loop = asyncio.get_running_loop()
    started = loop.time()
    for number in range(5):
        client.send(b"%d" % number)
    assert [await echo.next() for _ in range(5)] == [b"0", b"1", b"2", b"3", b"4"]
    assert loop.time() - started >= 0.2


async def test_blackhole_both_ways_until_lifted(
    relay: UdpRelay, echo: Endpoint, client: Endpoint
) -> None:
    relay.blackhole()
    client.send(b"lost")
    await relay.wait_for(lambda: relay.up.counters.received == 1)
    relay.lift()
    client.send(b"marker")
    assert await echo.until(b"marker") == [b"marker"]
    assert await client.until(b"marker") == [b"marker"]
    assert relay.up.counters.blackholed == 1


async def test_blackhole_for_a_while_lifts_itself(
    relay: UdpRelay, echo: Endpoint, client: Endpoint
) -> None:
    relay.blackhole(seconds=0.1)
    assert relay.blackholed
    await relay.wait_for(lambda: not relay.blackholed)
    client.send(b"through")
    assert await client.next() == b"through"


async def test_answers_go_to_the_client_heard_from_last(
    relay: UdpRelay, echo: Endpoint, client: Endpoint
) -> None:
    client.send(b"first")
    assert await client.next() == b"first"
    other = await endpoint(remote_addr=("127.0.0.1", relay.port))
    other.send(b"second")
    assert await other.next() == b"second"
    assert client.received.empty()
