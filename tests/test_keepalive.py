"""Keepalive: the WebSocket side's one sweeper task pings every connection (web/server.py).

Real gateway on loopback, real clients. A peer that does or does not answer pings is a raw
TCP client that performs the opening handshake by hand and then reads frames itself, so the
test decides whether a ping gets its pong. Intervals are a fraction of a second; every wait
is on a frame or an event, bounded by `WAIT`.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
import time
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.protocol import State

from translator.config import config_from_mapping
from translator.gateway import Gateway
from translator.web import server as ws_side

from .conftest import WAIT, handshake_request

PING, PONG, CLOSE, TEXT = 0x9, 0xA, 0x8, 0x1


def config(ping_interval: float, ping_timeout: float) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "linger": 0},
        "policy": {"allow": ["coap://127.0.0.1/*"]},
        "limits": {"ping_interval": ping_interval, "ping_timeout": ping_timeout},
    }


class RawPeer:
    """A WebSocket client over a bare TCP stream: answers pings only if told to, and
    after `pong_delay` seconds (a peer far away, or busy)."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        answer_pings: bool,
        pong_delay: float = 0.0,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.answer_pings = answer_pings
        self.pong_delay = pong_delay
        self.pings = 0

    @classmethod
    async def open(cls, gateway: Gateway, answer_pings: bool, pong_delay: float = 0.0) -> RawPeer:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.ws.port)
        writer.write(handshake_request(gateway.ws.port))
        async with asyncio.timeout(WAIT):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        return cls(reader, writer, answer_pings, pong_delay)

    def send(self, opcode: int, payload: bytes) -> None:
        """One masked, unfragmented frame (clients must mask, RFC 6455 §5.3)."""
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        assert len(payload) < 126
        self.writer.write(bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked)

    async def frame(self) -> tuple[int, bytes]:
        """The next frame from the gateway (unmasked); pings are counted and maybe answered."""
        first, second = await self.reader.readexactly(2)
        length = second & 0x7F
        if length == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif length == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        payload = await self.reader.readexactly(length)
        opcode = first & 0x0F
        if opcode == PING:
            self.pings += 1
            if self.answer_pings and self.pong_delay:
                asyncio.get_running_loop().call_later(self.pong_delay, self.send, PONG, payload)
            elif self.answer_pings:
                self.send(PONG, payload)
        return opcode, payload

    async def until(self, opcode: int, timeout: float = WAIT) -> bytes:
        async with asyncio.timeout(timeout):
            while True:
                got, payload = await self.frame()
                if got == opcode:
                    return payload

    async def round_trip(self) -> list[int]:
        """Send the protocol's own `ping` frame and read up to its `pong` reply: the opcodes
        of every frame the gateway sent before it (frames arrive in order)."""
        self.send(TEXT, json.dumps({"type": "ping", "id": 1}).encode())
        seen = []
        async with asyncio.timeout(WAIT):
            while True:
                opcode, payload = await self.frame()
                if opcode == TEXT and json.loads(payload).get("type") == "pong":
                    return seen
                seen.append(opcode)

    def close(self) -> None:
        self.writer.close()


def keepalive_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "ws keepalive"]


@pytest.mark.parametrize(
    ("interval", "timeout"),
    [(0.2, 0.1), (0.1, 0.3)],
    ids=["timeout-shorter-than-interval", "timeout-longer-than-interval"],
)
async def test_a_peer_that_stops_answering_pings_is_closed_with_1011(
    make_gateway: Any, interval: float, timeout: float
) -> None:
    gateway: Gateway = await make_gateway(config(interval, timeout))
    peer = await RawPeer.open(gateway, answer_pings=False)
    try:
        await peer.until(PING)
        pinged = time.monotonic()
        payload = await peer.until(CLOSE)
        elapsed = time.monotonic() - pinged
        code, reason = struct.unpack("!H", payload[:2])[0], payload[2:].decode()
        assert (code, reason) == (1011, "keepalive ping timeout")
        # Unanswered for at least the timeout; closed within a round or two after it.
        assert timeout * 0.9 <= elapsed <= timeout + 2 * interval + 1.0
        # Nobody answers the closing handshake either: the gateway drops the TCP connection.
        async with asyncio.timeout(ws_side.CLOSE_TIMEOUT + WAIT):
            assert await peer.reader.read() == b""
        assert not gateway.ws.connections
    finally:
        peer.close()


@pytest.mark.parametrize(
    ("interval", "timeout", "pong_delay"),
    [(0.3, 0.15, 0.0), (0.05, 0.2, 0.0), (0.05, 0.3, 0.1)],
    ids=["timeout-shorter-than-interval", "timeout-longer-than-interval", "slow-pongs"],
)
async def test_peers_that_answer_stay_open(
    make_gateway: Any, interval: float, timeout: float, pong_delay: float
) -> None:
    """With slow pongs, a round's deadline passes while a later round's ping is out: only
    the ping of that round counts."""
    gateway: Gateway = await make_gateway(config(interval, timeout))
    library = await connect(gateway.url, compression=None, ping_interval=None)
    peer = await RawPeer.open(gateway, answer_pings=True, pong_delay=pong_delay)
    try:
        # Enough pings that several rounds' deadlines have passed since the first one.
        rounds = int(timeout / interval) + 4
        async with asyncio.timeout(WAIT):
            while peer.pings < rounds:
                await peer.frame()
        assert CLOSE not in await peer.round_trip()
        # websockets' client answers pings by itself; it was pinged too, and is still open.
        assert library.state is State.OPEN
        await library.send(json.dumps({"type": "ping", "id": 2}))
        async with asyncio.timeout(WAIT):
            assert json.loads(await library.recv())["type"] == "pong"
        assert len(gateway.ws.connections) == 2
        assert all(conn.ws.latency > 0 for conn in gateway.ws.connections)
    finally:
        peer.close()
        await library.close()


async def test_without_timeout_an_unanswered_ping_is_waited_for_and_not_repeated(
    make_gateway: Any,
) -> None:
    gateway: Gateway = await make_gateway(config(0.05, 0))
    silent = await RawPeer.open(gateway, answer_pings=False)
    clock = await RawPeer.open(gateway, answer_pings=True)
    try:
        await silent.until(PING)
        async with asyncio.timeout(WAIT):
            while clock.pings < 5:
                await clock.frame()
        # Many rounds later: no second ping while the first is unanswered, and no close.
        assert await silent.round_trip() == []
        assert len(gateway.ws.connections) == 2
    finally:
        silent.close()
        clock.close()


async def test_pings_go_out_a_slice_at_a_time(
    make_gateway: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ws_side, "KEEPALIVE_SLICE", 3)
    gateway: Gateway = await make_gateway(config(0.05, 1.0))
    peers = [await RawPeer.open(gateway, answer_pings=True) for _ in range(8)]
    try:
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(peer.until(PING) for peer in peers))
    finally:
        for peer in peers:
            peer.close()


async def test_disabled_keepalive_runs_no_sweeper_and_no_websockets_keepalive(
    make_gateway: Any,
) -> None:
    gateway: Gateway = await make_gateway(config(0, 20))
    peer = await RawPeer.open(gateway, answer_pings=False)
    try:
        assert await peer.round_trip() == []  # the gateway has taken the connection in
        assert keepalive_tasks() == []
        assert [conn.ws.keepalive_task for conn in gateway.ws.connections] == [None]
    finally:
        peer.close()


async def test_one_sweeper_per_server_cancelled_on_shutdown() -> None:
    gateway = Gateway(config_from_mapping(config(20, 20)))
    await gateway.start()
    peers = [await RawPeer.open(gateway, answer_pings=True) for _ in range(3)]
    try:
        for peer in peers:
            await peer.round_trip()
        [sweeper] = keepalive_tasks()
        # websockets' own per-connection keepalive is off: the sweeper does its work.
        assert {conn.ws.keepalive_task for conn in gateway.ws.connections} == {None}
    finally:
        await gateway.stop()
        for peer in peers:
            peer.close()
    assert sweeper.cancelled()
    assert keepalive_tasks() == []
