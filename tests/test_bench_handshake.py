"""bench.loadgen's lean opening handshake against a real websockets server, and its checks."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import AsyncIterator, Callable

import pytest
from websockets.asyncio.server import ServerConnection, serve

from bench.loadgen import WS_GUID, HandshakeFailed, Upgrade, client_frame, open_lean


async def test_a_lean_handshake_opens_a_connection_a_websockets_server_talks_on() -> None:
    async def echo(ws: ServerConnection) -> None:
        async for message in ws:
            await ws.send(message)

    async with serve(echo, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        transport, rest = await open_lean(f"ws://127.0.0.1:{port}/any/path?x=1", 5)
        received: asyncio.Queue[bytes] = asyncio.Queue()

        class Collect(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                received.put_nowait(data)

        transport.set_protocol(Collect())
        transport.write(client_frame(b"hello"))
        echoed = rest
        while len(echoed) < 7:
            echoed += await asyncio.wait_for(received.get(), 5)
        assert echoed == b"\x81\x05hello"  # an unmasked text frame, as the server sends it
        transport.abort()


async def fake_server(answer: Callable[[bytes], bytes]) -> AsyncIterator[int]:
    """A TCP server that reads one request head and writes `answer(key)`."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        key = next(line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
                   if line.lower().startswith(b"sec-websocket-key:"))
        writer.write(answer(key))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    async with server:
        yield server.sockets[0].getsockname()[1]


def switching(accept: bytes) -> bytes:
    return (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n")


@pytest.mark.parametrize(("answer", "message"), [
    (lambda key: b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n", "404"),
    (lambda key: switching(base64.b64encode(hashlib.sha1(key + b"x").digest())),
     "Sec-WebSocket-Accept"),
    (lambda key: b"HTTP/1.1 101 Switching Protocols\r\n", "closed during the handshake"),
])
async def test_a_lean_handshake_refuses_what_is_not_a_websocket_switch(
    answer: Callable[[bytes], bytes], message: str
) -> None:
    async for port in fake_server(answer):
        with pytest.raises(HandshakeFailed, match=message):
            await open_lean(f"ws://127.0.0.1:{port}/", 5)


async def test_a_correct_accept_from_a_fake_server_is_taken() -> None:
    def accept(key: bytes) -> bytes:
        return switching(base64.b64encode(hashlib.sha1(key + WS_GUID).digest())) + b"\x81\x01x"

    async for port in fake_server(accept):
        transport, rest = await open_lean(f"ws://127.0.0.1:{port}/", 5)
        assert rest == b"\x81\x01x"  # a frame sent right behind the response head is kept
        transport.abort()


async def test_bytes_that_arrive_after_the_switch_are_kept_for_the_next_protocol() -> None:
    # Between the response head and the moment the waiting coroutine hands the transport
    # on, the loop can deliver more data to the handshake protocol: it must not be lost.
    upgrade = Upgrade("127.0.0.1:1", "/ws")
    key = upgrade.request.split(b"Sec-WebSocket-Key: ")[1].split(b"\r\n")[0]
    upgrade.data_received(switching(base64.b64encode(hashlib.sha1(key + WS_GUID).digest()))
                          + b"\x81\x01a")
    upgrade.data_received(b"\x81\x01b")
    await upgrade.done
    assert bytes(upgrade.rest) == b"\x81\x01a\x81\x01b"
