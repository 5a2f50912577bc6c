"""What the WebSocket side keeps per open connection (translator/web/server.py).

Memory per idle connection is one of the gateway's measured figures; these tests pin the
choices that keep it low. Real gateway or real websockets server on loopback, real clients.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import struct
import sys
from typing import Any

import trustme
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from translator.auth import Principal
from translator.gateway import Gateway
from translator.web.server import (
    Connection,
    ServerSettings,
    WebSocketServer,
    _ServerConnection,
    fan_out,
)

from .conftest import WAIT, handshake_request

SECRET = "a-token-of-32-characters-or-more-0123456789"


async def test_headers_of_the_handshake_are_not_kept_once_open(make_gateway: Any) -> None:
    gateway: Gateway = await make_gateway({
        "server": {"host": "127.0.0.1", "port": 0, "linger": 0},
        "policy": {"allow": ["coap://127.0.0.1/*"]},
        "auth": {"tokens": [{"token": SECRET, "name": "dash", "scopes": ["read"]}]},
    })
    async with connect(
        gateway.url, compression=None, additional_headers={"Authorization": f"Bearer {SECRET}"}
    ) as ws:
        await ws.send(json.dumps({"type": "ping", "id": 1}))
        async with asyncio.timeout(WAIT):
            assert json.loads(await ws.recv())["type"] == "pong"
        [conn] = gateway.ws.connections
        # The gatekeeper read the headers at the handshake: the grant is what stays.
        assert isinstance(conn.grant, Principal)
        assert conn.grant.name == "dash"
        assert conn.ws.request is not None and conn.ws.response is not None
        assert conn.ws.request.path == "/ws"
        assert len(conn.ws.request.headers) == 0
        assert len(conn.ws.response.headers) == 0
        assert conn.ws.response.status_code == 101


async def test_a_burst_of_connections_shares_one_attribute_table() -> None:
    """The first instances of the class come in one burst, as from a load generator or
    clients reconnecting after a restart; none may end up with a private __dict__."""

    # A fresh subclass has a fresh table, whatever other tests created before.
    fresh: type[ServerConnection] = type("Fresh", (_ServerConnection,), {})
    opened: list[ServerConnection] = []
    all_open = asyncio.Event()
    burst = 20

    async def handler(ws: ServerConnection) -> None:
        opened.append(ws)
        if len(opened) == burst:
            all_open.set()
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", 0, create_connection=fresh) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        clients = await asyncio.gather(
            *(connect(f"ws://127.0.0.1:{port}/ws", compression=None) for _ in range(burst))
        )
        try:
            async with asyncio.timeout(WAIT):
                await all_open.wait()
            # A dict that shares its class's key table is a fraction of a private one's
            # size (288 bytes against 1584 for websockets' 27 attributes on CPython 3.11).
            sizes = {sys.getsizeof(vars(ws)) for ws in opened}
            private = sys.getsizeof(dict(vars(opened[0])))
            assert max(sizes) < private / 2, (sizes, private)
        finally:
            for client in clients:
                await client.close()


class _Quiet:
    """A message handler that ignores everything (the test drives the connections)."""

    def connected(self, conn: Connection) -> None:
        pass

    def received(self, conn: Connection, message: str | bytes) -> None:
        pass

    def disconnected(self, conn: Connection) -> None:
        pass


def _reset_on_close(sock: socket.socket) -> None:
    """Make `close()` send RST instead of FIN (SO_LINGER on, zero seconds)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def _raw_client(port: int) -> socket.socket:
    """A plain non-blocking socket that completed the WebSocket opening handshake."""
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setblocking(False)
    await loop.sock_connect(sock, ("127.0.0.1", port))
    await loop.sock_sendall(sock, handshake_request(port))
    answer = b""
    async with asyncio.timeout(WAIT):
        while b"\r\n\r\n" not in answer:
            answer += await loop.sock_recv(sock, 4096)
    assert answer.startswith(b"HTTP/1.1 101"), answer
    return sock


async def _wait_connections(server: WebSocketServer, count: int) -> list[Connection]:
    """The server's connections once there are `count` (a client's handshake completes
    before the server's handler registers its connection; nothing signals that)."""
    async with asyncio.timeout(WAIT):
        while len(server.connections) < count:  # noqa: ASYNC110 (no event to wait on)
            await asyncio.sleep(0.01)
    return list(server.connections)


async def test_fan_out_keeps_frames_whole_and_in_order_through_a_full_socket(
    make_gateway: Any,
) -> None:
    """A client that stops reading fills its socket: the frames the socket takes only in
    part, and those after them, go through the transport and the outbox, never cut or
    reordered."""
    gateway: Gateway = await make_gateway(
        {"server": {"port": 0}, "policy": {"allow": ["coap://127.0.0.1/*"]}}
    )
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect(("127.0.0.1", gateway.ws.port))
    # max_queue=1: the client stops reading TCP until recv() is called.
    async with connect(gateway.url, sock=sock, compression=None, max_queue=1) as ws:
        [conn] = await _wait_connections(gateway.ws, 1)
        # A small send buffer on the gateway's side too, so that the socket fills at once.
        server_socket = conn.ws.transport.get_extra_info("socket")
        server_socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        count, filler = 300, "x" * 1000
        for number in range(count):
            fan_out([conn], json.dumps({"type": "test", "n": number, "fill": filler}))
        # The socket did fill up: frames wait in the transport's buffer and in the outbox.
        assert conn.ws.transport.get_write_buffer_size() > 0
        assert conn.outbox.frames > 0
        async with asyncio.timeout(WAIT):
            for number in range(count):
                frame = json.loads(await ws.recv())
                assert (frame["n"], frame["fill"]) == (number, filler)


async def test_fan_out_to_a_reset_peer_closes_it_and_still_serves_the_others(
    make_gateway: Any, make_client: Any
) -> None:
    gateway: Gateway = await make_gateway(
        {"server": {"port": 0}, "policy": {"allow": ["coap://127.0.0.1/*"]}}
    )
    healthy = await make_client(gateway.url)
    raw = await _raw_client(gateway.ws.port)
    connections = await _wait_connections(gateway.ws, 2)
    # Reset the raw peer, then fan out before the loop could notice it: the direct write
    # meets the error, and the transport must close the connection at once.
    _reset_on_close(raw)
    raw.close()
    # A real gateway frame (a pong): the test client checks every frame it receives
    # against docs/asyncapi.yaml.
    fan_out(connections, json.dumps({"type": "pong", "id": "fan-out"}))
    dead = [c for c in connections if c.ws.transport.is_closing()]
    assert len(dead) == 1
    assert (await healthy.recv())["id"] == "fan-out"
    async with asyncio.timeout(WAIT):
        await dead[0].finished
    assert len(gateway.ws.connections) == 1


async def test_fan_out_over_tls_goes_through_the_transport(make_gateway: Any) -> None:
    """No raw socket writes under TLS: the bytes must be encrypted by the transport."""
    gateway: Gateway = await make_gateway(
        {"server": {"port": 0}, "policy": {"allow": ["coap://127.0.0.1/*"]}}
    )
    async with connect(gateway.url, compression=None):
        [conn] = await _wait_connections(gateway.ws, 1)
        assert conn._fd == conn.ws.transport.get_extra_info("socket").fileno()
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    secure = WebSocketServer(_Quiet(), ServerSettings(ssl_context=server_context))
    await secure.start()
    try:
        async with connect(
            f"wss://127.0.0.1:{secure.port}/ws", ssl=client_context, compression=None
        ) as ws:
            [conn] = await _wait_connections(secure, 1)
            assert conn._fd == -1
            fan_out([conn], json.dumps({"type": "test", "n": 7}))
            async with asyncio.timeout(WAIT):
                assert json.loads(await ws.recv())["n"] == 7
    finally:
        await secure.stop()
