"""The WebSocket side: the websockets server, one reader and one bounded writer per client.

It owns I/O toward web clients and nothing else: the handshake (only the `/ws` path is a
WebSocket endpoint; a small HTML page that shows live values is served at `/`), reading
messages and handing them to the `MessageHandler`, and writing queued text frames. It knows
nothing of CoAP, the hub or the frames' meaning.

Outgoing frames go through `Connection.send()`, which never blocks: each connection has a
bounded queue drained by its own writer task. A queue that overflows means the client does
not keep up; it is closed with 1008 "slow consumer" so that one slow client can neither
grow the gateway's memory nor delay the others.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import http
import itertools
import logging
import ssl
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Final, Protocol

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

log = logging.getLogger(__name__)

WS_PATH: Final = "/ws"
SLOW_CONSUMER: Final = (1008, "slow consumer")
CLOSE_TIMEOUT: Final = 2.0
"""Seconds to wait for a closing handshake before the TCP connection is dropped."""


class MessageHandler(Protocol):
    def connected(self, conn: Connection) -> None: ...

    def received(self, conn: Connection, message: str | bytes) -> None: ...

    def disconnected(self, conn: Connection) -> None: ...


class Connection:
    """One WebSocket client: its bounded outgoing queue and the writer that drains it."""

    _ids = itertools.count(1)

    def __init__(
        self, ws: ServerConnection, max_queue: int, on_overflow: Callable[[], None]
    ) -> None:
        self.id = next(self._ids)
        self._on_overflow = on_overflow
        self.ws = ws
        self.max_queue = max_queue
        self.closing = False
        self._queue: collections.deque[str] = collections.deque()
        self._wakeup = asyncio.Event()
        self._closer: asyncio.Task[None] | None = None
        self.finished = asyncio.Event()
        """Set once the connection is gone and the gateway has forgotten it."""
        self.writer = asyncio.create_task(self._write(), name=f"ws writer #{self.id}")

    def __repr__(self) -> str:
        return f"<Connection #{self.id} {self.remote}>"

    @property
    def remote(self) -> str:
        address = self.ws.remote_address
        return f"{address[0]}:{address[1]}" if address else "?"

    @property
    def queued(self) -> int:
        return len(self._queue)

    def send(self, text: str) -> None:
        """Queue a text frame; never blocks. Overflow closes the connection (slow consumer)."""
        if self.closing:
            return
        if len(self._queue) >= self.max_queue:
            log.warning("%r: outgoing queue full (%d frames), closing", self, self.max_queue)
            self._on_overflow()
            self.close(*SLOW_CONSUMER)
            return
        self._queue.append(text)
        self._wakeup.set()

    def close(self, code: int, reason: str) -> None:
        """Start closing the connection; queued frames are dropped."""
        if self.closing:
            return
        self.closing = True
        self._queue.clear()
        self.writer.cancel()
        self._closer = asyncio.create_task(self._close(code, reason), name=f"ws close #{self.id}")

    async def _close(self, code: int, reason: str) -> None:
        # websockets' close() waits for its write buffer to drain without a deadline, and a
        # client that stopped reading never drains it: bound the handshake, then drop TCP.
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await self.ws.close(code, reason)
        except TimeoutError:
            log.info("%r: no closing handshake within %g s, dropping TCP", self, CLOSE_TIMEOUT)
            self.ws.transport.abort()

    async def _write(self) -> None:
        queue, wakeup, ws = self._queue, self._wakeup, self.ws
        try:
            while True:
                while not queue:
                    wakeup.clear()
                    await wakeup.wait()
                await ws.send(queue.popleft())
        except ConnectionClosed:
            pass

    async def finish(self) -> None:
        """Stop the writer once the connection is gone."""
        self.closing = True
        self.writer.cancel()
        tasks = [t for t in (self.writer, self._closer) if t is not None]
        await asyncio.gather(*tasks, return_exceptions=True)


def _html_page() -> bytes:
    return resources.files("translator").joinpath("static/index.html").read_bytes()


class WebSocketServer:
    """The websockets server and its connections."""

    def __init__(
        self,
        handler: MessageHandler,
        *,
        host: str,
        port: int,
        max_frame_bytes: int = 65536,
        max_queue: int = 1024,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.handler = handler
        self.host = host
        self.port = port
        self.max_frame_bytes = max_frame_bytes
        self.max_queue = max_queue
        self.ssl_context = ssl_context
        self._server: Server | None = None
        self.connections: set[Connection] = set()
        self.slow_consumers_closed = 0
        """Connections closed because their outgoing queue overflowed."""

    async def start(self) -> None:
        self._server = await serve(
            self._serve_connection,
            self.host,
            self.port,
            process_request=self._process_request,
            max_size=self.max_frame_bytes,
            # permessage-deflate costs more CPU per frame than it saves on loopback-sized
            # JSON, and halves fan-out throughput.
            compression=None,
            close_timeout=CLOSE_TIMEOUT,
            ssl=self.ssl_context,
            server_header="coap-ws-gateway",
        )
        sockets = list(self._server.sockets)
        if sockets:
            self.port = sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        scheme = "wss" if self.ssl_context else "ws"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}{WS_PATH}"

    async def stop(self) -> None:
        """Close every connection with 1001 (going away) and stop listening."""
        if self._server is None:
            return
        self._server.close(close_connections=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT + 1):
                await self._server.wait_closed()
        self._server = None

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if path == WS_PATH:
            return None
        if path in ("/", "/index.html"):
            return _http_response(http.HTTPStatus.OK, _html_page(), "text/html; charset=utf-8")
        return ws.respond(http.HTTPStatus.NOT_FOUND, f"no such path; WebSocket is at {WS_PATH}\n")

    def _count_slow_consumer(self) -> None:
        self.slow_consumers_closed += 1

    async def _serve_connection(self, ws: ServerConnection) -> None:
        conn = Connection(ws, self.max_queue, self._count_slow_consumer)
        self.connections.add(conn)
        log.info("%r connected", conn)
        try:
            self.handler.connected(conn)
            async for message in ws:
                self.handler.received(conn, message)
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(conn)
            self.handler.disconnected(conn)
            await conn.finish()
            conn.finished.set()
            log.info("%r disconnected (%s)", conn, ws.close_code)


def _http_response(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


def broadcast_text(connections: Iterable[Connection], text: str) -> None:
    for conn in connections:
        conn.send(text)
