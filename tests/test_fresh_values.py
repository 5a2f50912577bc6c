"""Fresh values for slow readers (issue 12): what waits for a client outside its outbox is
bounded (`[limits] max_inflight_bytes`, TCP_NOTSENT_LOWAT), so a client that reads more
slowly than updates come gets the newest value with `seq` jumping, never a backlog.

A real gateway and simulated sensor on loopback; the slow clients are plain sockets with a
small receive buffer set before connecting (as behind a slow link, the backlog then waits on
the gateway's side) that read exactly one frame when the test says so, so that no client
library buffers frames ahead of them.
"""

from __future__ import annotations

import array
import asyncio
import base64
import fcntl
import itertools
import json
import os
import socket
import termios
from typing import Any

from bench.loadgen import client_frame
from bench.slow_reader import SlowClient
from translator.gateway import Gateway
from translator.sim import SimulatedSensors
from translator.web.server import (
    TCP_NOTSENT_LOWAT,
    Connection,
    SendLimits,
    _PingRound,
    text_frame,
)

from .conftest import WAIT, gateway_config

CLIENT_RCVBUF = 4096
"""The slow clients' receive buffer (the kernel doubles it), set before connecting."""
QUEUED_BOUND = 24 * 1024
"""What may wait toward a slow client with the default bound: max_inflight_bytes (1 KiB)
unsent (a write that starts below the bound may pass it by a buffer's room), what is in
flight within the client's receive window (its buffer is 8 KiB after the kernel's
doubling), a frame in the transport and one per subscription in the outbox. Without the
bound the kernel alone takes the whole backlog (~130 KB here)."""
UPDATES = 1000


def number(frame: dict[str, Any]) -> int:
    """The update number a /blob notify carries (see `publish`)."""
    return int.from_bytes(base64.b64decode(frame["payload_b64"]), "big")


async def publish(sensors: SimulatedSensors, normal: Any, sub: str, value: int) -> None:
    """Make /blob's value `value` (4 bytes), and wait until `normal`, which reads every
    frame, has it: the gateway has then fanned it out to every subscriber."""
    sensors.set_blob(value.to_bytes(4, "big"))
    while number(await normal.next_notify(sub)) < value:
        pass


class SlowReader(SlowClient):
    """bench's slow client (a WebSocket client on a plain socket with a small receive
    buffer), here reading one frame at a time when the test says, and counting its bytes."""

    bytes_read = 0

    @classmethod
    async def connect(cls, port: int) -> SlowReader:
        async with asyncio.timeout(WAIT):
            client = await cls.open(f"ws://127.0.0.1:{port}/ws", rate=1.0, rcvbuf=CLIENT_RCVBUF)
        assert isinstance(client, SlowReader)
        return client

    async def _exactly(self, size: int) -> bytes:
        data = await super()._exactly(size)
        self.bytes_read += size
        return data

    async def frame(self) -> tuple[int, bytes]:
        """The next frame: its opcode and payload."""
        async with asyncio.timeout(WAIT):
            return await super().frame()

    async def json_frame(self) -> dict[str, Any]:
        return await self.message()

    def take_waiting(self, limit: int) -> None:
        """Take up to `limit` bytes the kernel holds for this client, without waiting (a
        slow link delivering a burst): its window opens; the frames are read later."""
        try:
            chunk = self.sock.recv(limit)
        except BlockingIOError:
            return
        self.buffer += chunk

    async def subscribe(self, uri: str) -> str:  # type: ignore[override]
        await self.loop.sock_sendall(self.sock, client_frame(
            json.dumps({"type": "subscribe", "id": 1, "uri": uri}).encode()))
        while (frame := await self.json_frame())["type"] != "subscribed":
            pass
        sub: str = frame["sub"]
        return sub

    def close(self) -> None:
        self.sock.close()


def queued_toward(conn: Connection) -> int:
    """Bytes the gateway holds for `conn`: in its socket's send queue (unsent and unacked),
    in the transport's buffer and in the outbox."""
    transport = conn.ws.transport
    fd = transport.get_extra_info("socket").fileno()
    out = array.array("i", [0])
    fcntl.ioctl(fd, termios.TIOCOUTQ, out)  # SIOCOUTQ for a TCP socket
    return out[0] + transport.get_write_buffer_size() + conn.outbox.pending_bytes


async def _gateway_with(sensors: SimulatedSensors, make_gateway: Any, **limits: Any) -> Gateway:
    config = gateway_config(sensors)
    config["limits"] = limits
    gateway: Gateway = await make_gateway(config)
    return gateway


async def _connection_of(gateway: Gateway, known: set[Connection]) -> Connection:
    """The gateway's connection that is not in `known` (a handshake completes at the client
    before the gateway's handler registers the connection; nothing signals that)."""
    async with asyncio.timeout(WAIT):
        while not (new := gateway.ws.connections - known):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
    (conn,) = new
    return conn


async def test_a_slow_reader_gets_the_newest_values_and_its_queue_stays_bounded(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any
) -> None:
    """The sensor's value advances 1000 times while one client reads one frame in ten: the
    bytes waiting for it stay within a few KiB, the frames it reads have `seq` jumping
    forward, and once updates stop it reaches the newest value after a few frames."""
    gateway = await _gateway_with(sensors, make_gateway)
    uri = f"{sensors.base_uri}/blob"
    normal = await make_client(gateway.url)
    sub = (await normal.subscribe(uri=uri))["sub"]
    known = set(gateway.ws.connections)
    slow = await SlowReader.connect(gateway.ws.port)
    conn = await _connection_of(gateway, known)
    try:
        await slow.subscribe(uri)
        seqs: list[int] = []
        most_queued = 0
        for value in range(1, UPDATES + 1):
            await publish(sensors, normal, sub, value)
            most_queued = max(most_queued, queued_toward(conn))
            if value % 10 == 0:
                seqs.append((await slow.json_frame())["seq"])
        assert most_queued <= QUEUED_BOUND, most_queued
        # Values were skipped (seq jumps), never repeated or reordered.
        assert all(b > a for a, b in itertools.pairwise(seqs)), seqs
        assert any(b - a > 1 for a, b in itertools.pairwise(seqs)), seqs
        assert conn.outbox.replaced > 0
        # No backlog: after the last update, a few frames lead to the newest value.
        read_before = slow.bytes_read
        while number(frame := await slow.json_frame()) != UPDATES:
            pass
        assert slow.bytes_read - read_before <= QUEUED_BOUND
        assert frame["seq"] > seqs[-1]
        assert not conn.closing
    finally:
        slow.close()


async def test_max_lag_closes_a_stalled_client_but_never_a_slow_one(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any
) -> None:
    """Two resources update ten times as fast as one client reads, and another client reads
    nothing. Both are behind all along; only the client that takes no frame for max_lag is
    closed, the slow one is served on, for many times max_lag. (Without the bound, the
    slow one's backlog grows in the kernel and the outbox behind it until it is closed.)"""
    max_lag = 0.5
    gateway = await _gateway_with(sensors, make_gateway, max_lag=max_lag)
    uri = f"{sensors.base_uri}/blob"
    normal = await make_client(gateway.url)
    sub = (await normal.subscribe(uri=uri))["sub"]
    known = set(gateway.ws.connections)
    slow = await SlowReader.connect(gateway.ws.port)
    slow_conn = await _connection_of(gateway, known)
    stalled = await SlowReader.connect(gateway.ws.port)
    stalled_conn = await _connection_of(gateway, known | {slow_conn})
    try:
        await slow.subscribe(uri)
        await slow.subscribe(f"{sensors.base_uri}/temperature")
        await stalled.subscribe(uri)
        loop = asyncio.get_running_loop()
        slow_since: float | None = None
        deadline = loop.time() + 4 * WAIT
        value = 0
        last_read = loop.time()
        # Until the stalled client is closed, then for 6 x max_lag more.
        while slow_since is None or loop.time() - slow_since < 6 * max_lag:
            assert loop.time() < deadline, "the stalled client was never closed"
            value += 1
            sensors.set_temperature(value)
            await publish(sensors, normal, sub, value)
            if value % 10 == 0:
                await slow.json_frame()
            # And whatever the pace of updates on a loaded machine, a burst of 2 KiB at least
            # every max_lag / 5 (one frame may not open the TCP window): slow, never stalled.
            if loop.time() - last_read >= max_lag / 5:
                slow.take_waiting(2048)
                last_read = loop.time()
            if slow_since is None and stalled_conn.closing:
                slow_since = loop.time()
        assert not slow_conn.closing
        assert slow_conn.outbox.replaced > 0  # it was behind all along, values skipped
        assert gateway.ws.slow_consumers_closed == 1
        sent = stalled_conn.ws.protocol.close_sent
        assert sent is not None and (sent.code, sent.reason) == (1008, "slow consumer")
    finally:
        slow.close()
        stalled.close()


async def test_a_keepalive_ping_never_waits_for_a_socket_past_its_bound(
    sensors: SimulatedSensors, make_gateway: Any
) -> None:
    """A socket past its unsent bound with nothing in the transport: the kernel may refuse
    a ping written now, which would then stay in the transport while websockets' ping()
    waits for the client to read, holding up the sweeper's round. It is skipped (and not
    written at all); once the client has read, it goes out."""
    gateway = await _gateway_with(sensors, make_gateway)
    reader = await SlowReader.connect(gateway.ws.port)
    conn = await _connection_of(gateway, set())
    try:
        # Fill the socket the way the fan-out's direct writes do, until it takes a frame
        # only in part; the rest goes in with the bound lifted for a moment, so that the
        # socket holds whole frames, more unsent bytes than the bound, and the transport none.
        sock = conn.ws.transport.get_extra_info("socket")
        frame = text_frame(json.dumps({"type": "test", "fill": "x" * 100}))
        written = 0
        while (sent := os.write(sock.fileno(), frame)) == len(frame):
            written += 1
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, 1 << 20)
        assert os.write(sock.fileno(), frame[sent:]) == len(frame) - sent
        written += 1
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, SendLimits().max_inflight_bytes)
        assert conn.ws.transport.get_write_buffer_size() == 0 and not conn.ws.paused
        async with asyncio.timeout(WAIT):
            assert not await conn.keepalive_ping(_PingRound())
        assert conn.ws.transport.get_write_buffer_size() == 0
        for _ in range(written):
            assert (await reader.json_frame())["type"] == "test"
        async with asyncio.timeout(WAIT):
            assert await conn.keepalive_ping(_PingRound())
        opcode, _ = await reader.frame()
        assert opcode == 0x9  # the ping
    finally:
        reader.close()
