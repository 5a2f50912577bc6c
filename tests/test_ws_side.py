"""What the WebSocket side keeps per open connection (ws_side.py).

Memory per idle connection is one of the gateway's measured figures; these tests pin the
choices that keep it low. Real gateway or real websockets server on loopback, real clients.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from translator.auth import Principal
from translator.gateway import Gateway
from translator.ws_side import _ServerConnection

from .conftest import WAIT

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
            *(connect(f"ws://127.0.0.1:{port}/", compression=None) for _ in range(burst))
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
