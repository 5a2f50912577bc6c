"""The WebSocket side: the websockets server, one reader and one bounded writer per client.

It owns I/O toward web clients and nothing else: the handshake (`/ws` is the JSON endpoint;
`/.well-known/coap`, subprotocol `coap`, carries RFC 8323 CoAP messages in binary frames,
which the gateway tells apart by the handshake's grant), reading messages and handing them
to the `MessageHandler`, and writing queued frames. It knows nothing of CoAP, the hub or the
frames' meaning. What a plain HTTP request gets (the page at `/`, 404, 405, ...) is
`web.front`'s decision; this module reads the request head for it and sends its answer
(`_ServerConnection`).

Outgoing frames go through `Connection.send()`, which never blocks: each connection has a
bounded queue drained by its own writer task. A queue that overflows means the client does
not keep up; it is closed with 1008 "slow consumer" so that one slow client can neither
grow the gateway's memory nor delay the others. The bound counts every byte waiting for the
client: its queue, and its transport's buffer, where websockets also writes the pongs and
close frames it answers on its own. A client that sends pings and never reads fills the
latter only; it is checked after each read (`Connection.check_backlog`).

Keepalive is this module's too: one sweeper task pings every open connection each
`ping_interval` and closes one whose ping is still unanswered after `ping_timeout` with 1011
"keepalive ping timeout", as websockets' own keepalive would, but without websockets' task
per connection. An idle connection costs no task of the gateway's: memory per idle client
is a figure the gateway is measured on (`bench --only memory`).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import ipaddress
import itertools
import logging
import os
import select
import socket
import ssl
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from email.utils import formatdate
from typing import Any, Final, Protocol

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, NegotiationError
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.http11 import Request, Response
from websockets.protocol import OPEN
from websockets.typing import Subprotocol

from translator import compat
from translator.compat import check_websockets
from translator.core.hub import NotifyMeta
from translator.core.outbox import OVERFLOW_BYTES, Outbox
from translator.core.ratelimit import ConnectionLimiter
from translator.redaction import install_redaction
from translator.web import front as http_front
from translator.web.encodings import (
    CompactState,
    Outgoing,
    UnsupportedSubprotocol,
    choose_subprotocol,
    is_cbor,
    to_cbor,
    ws_frame,
)
from translator.web.front import (
    COAP_WS_PATH,
    WS_PATH,
    WS_PATHS,
    Answer,
    HeadReader,
    HostNames,
    HttpError,
    Operations,
)

log = logging.getLogger(__name__)

SERVER_HEADER: Final = "coap-ws-gateway"
SLOW_CONSUMER: Final = (1008, "slow consumer")
CLOSE_TIMEOUT: Final = 2.0
"""Seconds to wait for a closing handshake before the TCP connection is dropped."""
KEEPALIVE_TIMEOUT: Final = (1011, "keepalive ping timeout")
"""How a peer that leaves a ping unanswered is closed (the same as websockets' keepalive)."""
KEEPALIVE_SLICE: Final = 50
"""Connections the keepalive sweeper pings or checks before it lets other tasks run. A ping
costs some 20 us, so a slice holds the event loop for about a millisecond; 10 000 connections
with slices of 50 kept the loop's p99 lag at 7 ms during a round, where websockets' task per
connection let it reach 35 ms."""
PING_ROOM: Final = 1024
"""Bytes a transport's write buffer must have free below its high-water mark for a keepalive
ping: a ping frame is 6 bytes (plus a TLS record's overhead), so writing it cannot pause the
transport, and `ServerConnection.ping()` returns without waiting for the buffer to drain."""
TCP_NOTSENT_LOWAT: Final = getattr(socket, "TCP_NOTSENT_LOWAT", 25)
"""Linux's bound on a TCP socket's unsent bytes (include/uapi/linux/tcp.h): past it the socket
is not writable and a non-blocking write fails with EAGAIN."""
BOUNDED_WRITE_LIMIT: Final = 1
"""The transport's high-water mark while the kernel's unsent bytes are bounded: websockets'
send() then waits until the transport's buffer is empty (asyncio resumes at a low-water mark
of 1 // 4 = 0), so at most the frame being written waits there and the rest wait in the
outbox, where they can be replaced. (1, not 0: asyncio's TLS transport pauses at a size >=
its high-water mark, which 0 would make true of an empty buffer.)"""
UNBOUNDED_WRITE_LIMIT: Final = 2**15
"""websockets' default high-water mark, kept when `max_inflight_bytes` is 0."""


@dataclass(frozen=True, slots=True)
class SendLimits:
    """The slow-consumer bounds of every connection (see `outbox.py`)."""

    max_pending_bytes: int = 1_048_576
    max_frames: int = 1024
    max_lag: float = 30.0
    max_inflight_bytes: int = 1024
    """Unsent bytes the kernel may hold for a connection (`TCP_NOTSENT_LOWAT`) before its
    frames wait in the outbox, where a newer notify replaces an older one; 0: no bound (the
    kernel takes megabytes, which then reach a slow client in order, however old)."""


class MessageHandler(Protocol):
    def connected(self, conn: Connection) -> None: ...

    def received(self, conn: Connection, message: str | bytes) -> None: ...

    def disconnected(self, conn: Connection) -> None: ...


class Connection:
    """One WebSocket client: its outbox (bounded, see `outbox.py`) and the writer draining it.

    Most frames go straight to the transport (`send`); a writer task exists only while
    frames wait in the outbox, so an idle connection costs no task.
    """

    __slots__ = (
        "_closer",
        "_fd",
        "_loop",
        "_on_slow",
        "_ping_round",
        "_transport",
        "_writer",
        "_writing",
        "cbor",
        "closing",
        "compact",
        "deaf",
        "deflate",
        "finished",
        "grant",
        "id",
        "outbox",
        "plain",
        "ws",
    )

    _ids = itertools.count(1)

    def __init__(
        self, ws: ServerConnection, limits: SendLimits, on_slow: Callable[[Connection], None]
    ) -> None:
        self.id = next(self._ids)
        self.ws = ws
        self.closing = False
        self.outbox = Outbox(
            max_pending_bytes=limits.max_pending_bytes,
            max_frames=limits.max_frames,
            max_lag=limits.max_lag,
        )
        self._on_slow = on_slow
        self._loop = asyncio.get_running_loop()
        self._transport = ws.transport
        self.cbor = is_cbor(ws.subprotocol)
        """The client speaks CBOR (`web.encodings`): every frame is a CBOR map, binary."""
        self.deflate = bool(ws.protocol.extensions)
        """permessage-deflate was negotiated: every frame goes through websockets'
        extension (a compressor per connection), so none can take shared framed bytes."""
        self.compact: CompactState | None = None
        """The subscriptions that asked for compact notifies (made on first use: most
        connections never ask, and an idle connection's bytes are counted)."""
        self.plain = True
        """JSON, uncompressed, no compact subscription: `fan_out`'s shortest path."""
        self._set_plain()
        self._fd = -1 if self.deflate else _plain_socket_fd(ws.transport)
        """The socket `fan_out` may write to directly, or -1 (TLS, compressed, no socket)."""
        if limits.max_inflight_bytes:
            _bound_unsent(ws.transport, limits.max_inflight_bytes)
        self._writer: asyncio.Task[None] | None = None
        self._writing = False
        self._closer: asyncio.Task[None] | None = None
        self._ping_round: _PingRound | None = None
        """The keepalive round whose ping this connection has not answered yet."""
        self.finished: asyncio.Future[None] = self._loop.create_future()
        """Done once the connection is gone and the gateway has forgotten it."""
        self.grant: object = None
        """What the gatekeeper granted at the handshake (for the gateway: who this is)."""
        self.deaf = False
        """True once nothing more the client sends is read (see `check_backlog`)."""
        if isinstance(ws, _ServerConnection):
            ws.owner = self

    def __repr__(self) -> str:
        return f"<Connection #{self.id} {self.remote}>"

    @property
    def remote(self) -> str:
        return _peer(self.ws)

    @property
    def log_fields(self) -> dict[str, object]:
        """The connection, as fields of a log record (`--log-format json`)."""
        return {"conn": self.id, "remote": self.remote}

    def _set_plain(self) -> None:
        self.plain = not (self.cbor or self.deflate or self.compact)

    def want_compact(self, sub: str) -> None:
        """Notifies of `sub` go compact from the next complete one on (`CompactState`)."""
        if self.compact is None:
            self.compact = CompactState()
        self.compact.want(sub)
        self._set_plain()

    def forget_compact(self, sub: str) -> None:
        if self.compact is not None:
            self.compact.forget(sub)
            if not self.compact:
                self.compact = None
            self._set_plain()

    def pick(self, outgoing: Outgoing, replaces: str | None) -> tuple[str | bytes, bytes]:
        """The form of `outgoing` this connection takes: its encoding, compact or not."""
        compact = self.compact is not None and self.compact.take(
            replaces, outgoing.meta, backlog=bool(self.outbox.frames)
        )
        return outgoing.form(self.cbor, compact)

    def send(
        self, text: str | bytes, replaces: str | None = None, frame: bytes | None = None
    ) -> None:
        """Send a frame now if the socket takes it, else queue it; never blocks.

        `text` is a gateway frame's JSON text, which a CBOR connection gets as CBOR, or a
        message already in the connection's encoding (bytes: a binary frame). `frame` is
        `text` already framed by `ws_frame()`, shared by every recipient of a fan-out.
        `replaces` (a subscription id) lets this frame replace an unsent one with the same
        key. A client too slow for the outbox's bounds is closed (slow consumer).
        """
        if self.closing:
            return
        if self.cbor and isinstance(text, str):
            text, frame = to_cbor(text), None
        if not self.outbox.frames and not self._writing and self._writable():
            # The hot path: nothing waits before this frame and the transport is below its
            # high-water mark, so write the shared bytes straight away, with no task switch.
            if self.deflate:
                self._send_compressed(text)
            else:
                self._transport.write(frame if frame is not None else ws_frame(text))
            return
        outbox = self.outbox
        overflow = outbox.push(text, replaces, self._loop.time())
        if overflow is None and (
            outbox.pending_bytes + self._transport.get_write_buffer_size()
            > outbox.max_pending_bytes
        ):
            overflow = OVERFLOW_BYTES
        if overflow is not None:
            self.drop_slow(overflow)
            return
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name=f"ws writer #{self.id}")

    def _send_compressed(self, message: str | bytes) -> None:
        """Write one message through websockets' protocol, whose permessage-deflate
        extension keeps this connection's compressor (what `ws.send()` does, without its
        task switch; `_writable` checked what its send context checks)."""
        protocol = self.ws.protocol
        if isinstance(message, str):
            protocol.send_text(message.encode())
        else:
            protocol.send_binary(message)
        transport = self._transport
        for data in protocol.data_to_send():
            if data:
                transport.write(data)

    def check_backlog(self) -> None:
        """Close the client as a slow consumer at once, and stop reading from it, when more
        than `max_pending_bytes` wait for it: queued frames plus the transport's buffer.

        Called after every read that leaves bytes in the transport's buffer. websockets
        answers each ping with a pong (and a close frame with its echo) straight into that
        buffer, which asyncio never bounds: a client that sends pings and never reads grew
        it by all it sent. Once over the bound nothing more the client sends is read, so
        nothing more is answered while the close runs its course (`CLOSE_TIMEOUT`).
        """
        waiting = self.outbox.pending_bytes + self._transport.get_write_buffer_size()
        if waiting <= self.outbox.max_pending_bytes:
            return
        if not self.deaf:
            self.deaf = True
            self._transport.pause_reading()
            if not self.closing:
                self.drop_slow(f"{waiting} bytes waiting to be sent")

    def drop_slow(self, why: str) -> None:
        log.warning("%r: slow consumer (%s), closing", self, why, extra=self.log_fields)
        self._on_slow(self)
        self.close(*SLOW_CONSUMER)

    def close(self, code: int, reason: str) -> None:
        """Start closing the connection; queued frames are dropped."""
        if self.closing:
            return
        self.closing = True
        self.outbox.clear()
        if self._writer is not None:
            self._writer.cancel()
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

    def _writable(self) -> bool:
        """Whether a frame may go to the transport now without websockets' send().

        Server frames are not masked, so a frame's bytes are the same for every client; this
        is safe while the connection is OPEN, no fragmented message is being sent, and the
        transport has room (above its high-water mark, the writer applies backpressure).
        """
        ws, transport = self.ws, self._transport
        return (
            ws.protocol.state is OPEN
            and ws.send_in_progress is None
            and not transport.is_closing()
            and transport.get_write_buffer_size() < ws.write_limit_high
        )

    async def _write(self) -> None:
        """Drain the outbox with websockets' send() (which waits while the transport is over
        its high-water mark), then end: `send` starts a new writer when frames wait again.

        Each frame is taken from the outbox only once the transport has room (with the
        kernel's unsent bytes bounded, once its buffer is empty): while the writer waits,
        a newer notify still replaces an older one in the outbox, so the client gets the
        newest value next, not the one queued when it fell behind.
        """
        outbox, ws = self.outbox, self.ws
        loop = self._loop
        try:
            while True:
                if ws.paused:
                    self._writing = True
                    try:
                        await ws.drain()
                    finally:
                        self._writing = False
                text: str | bytes | None = outbox.pop()
                if text is None:
                    break
                self._writing = True
                try:
                    await ws.send(text)
                finally:
                    self._writing = False
                outbox.written(loop.time())
        except (ConnectionClosed, OSError):  # drain() raises what ended the connection
            pass
        finally:
            self._writer = None

    async def keepalive_ping(self, round_: _PingRound) -> bool:
        """Send a keepalive ping as part of `round_`, unless it would have to wait.

        False (no ping) while the connection is closing, or while its transport or its
        socket is too full to take a frame at once: websockets' `ping()` would then wait for
        the buffer to drain, holding up the sweeper's whole round. Such a client is not
        reading; if frames wait for it, the slow-consumer policy deals with it. (With
        `max_inflight_bytes`, the transport's high-water mark is 1 byte: any byte buffered
        is too full, and a socket past its unsent bound would leave the ping buffered.)
        """
        ws, transport = self.ws, self._transport
        if (
            self.closing
            or ws.protocol.state is not OPEN
            or transport.is_closing()
            or ws.paused
            or transport.get_write_buffer_size() + PING_ROOM
            > max(ws.write_limit_high, PING_ROOM)
            or not _socket_writable(transport)
        ):
            return False
        # ensure_future: ping() is typed to return an awaitable; it is the pong's future.
        pong = asyncio.ensure_future(await ws.ping())
        self._ping_round = round_
        # Done when the pong comes (or the connection closes): nothing is kept per
        # connection between a pong and the next ping.
        pong.add_done_callback(self._pong_received)
        return True

    def _pong_received(self, _: asyncio.Future[float]) -> None:
        self._ping_round = None

    @property
    def awaiting_pong(self) -> bool:
        return self._ping_round is not None

    def ping_unanswered(self, round_: _PingRound) -> bool:
        """Whether this connection still owes the pong to `round_`'s ping."""
        return self._ping_round is round_

    async def finish(self) -> None:
        """Stop the writer once the connection is gone."""
        self.closing = True
        if isinstance(self.ws, _ServerConnection):
            self.ws.owner = None  # no reference cycle left behind
        tasks = [t for t in (self._writer, self._closer) if t is not None]
        if self._writer is not None:
            self._writer.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _PingRound:
    """One keepalive round: the pings sent together, and when their pongs are overdue."""

    __slots__ = ("deadline",)

    def __init__(self) -> None:
        self.deadline = 0.0


@dataclass(frozen=True, slots=True)
class ServerSettings:
    """How the WebSocket side listens and treats its clients."""

    host: str = "127.0.0.1"
    port: int = 0
    max_frame_bytes: int = 65536
    send_limits: SendLimits = SendLimits()
    ping_interval: float | None = 20.0
    """Seconds between keepalive pings (None: no pings)."""
    ping_timeout: float | None = 20.0
    """Seconds to wait for a pong before the peer is closed with 1011 (None: forever)."""
    handshake_timeout: float | None = 10.0
    ssl_context: ssl.SSLContext | None = None
    allowed_origins: tuple[str, ...] | None = None
    """Origins allowed to open a WebSocket besides the gateway's own."""
    server_names: tuple[str, ...] = ()
    """Host names the gateway serves besides ``localhost`` and its listen address."""
    max_connections: int = 10_000
    max_connections_per_ip: int = 256
    backlog: int = 100
    """Connections the kernel queues until they are accepted (``listen()``)."""
    deflate: DeflateSettings | None = None
    """permessage-deflate for clients that offer it; None: every client gets plain frames."""


@dataclass(frozen=True, slots=True)
class DeflateSettings:
    """permessage-deflate (RFC 7692) parameters: what each compressed connection costs in
    memory (zlib: 2**(window_bits + 2) + 2**(memory_level + 9) bytes to compress, about
    2**window_bits + 7 KiB to decompress) and how well small repeated frames shrink."""

    context_takeover: bool = True
    """Keep the window between messages: a notify then compresses against the previous ones
    (the whole gain for small repeated frames)."""
    window_bits: int = 12
    memory_level: int = 5

    def factory(self) -> ServerPerMessageDeflateFactory:
        return ServerPerMessageDeflateFactory(
            server_no_context_takeover=not self.context_takeover,
            server_max_window_bits=self.window_bits,
            client_max_window_bits=self.window_bits,
            compress_settings={"memLevel": self.memory_level},
        )


@dataclass(frozen=True, slots=True)
class Refusal:
    """An HTTP answer instead of the WebSocket upgrade."""

    status: http.HTTPStatus
    message: str
    headers: tuple[tuple[str, str], ...] = ()


class Gatekeeper(Protocol):
    def admit(self, path: str, headers: Headers, remote_ip: str) -> Refusal | object:
        """Decide on a WebSocket handshake: a Refusal, or what the connection is granted
        (kept as `Connection.grant`, opaque to this module)."""


class WebSocketServer:
    """The websockets server and its connections."""

    def __init__(
        self,
        handler: MessageHandler,
        settings: ServerSettings,
        gatekeeper: Gatekeeper | None = None,
        operations: Operations | None = None,
    ) -> None:
        self.handler = handler
        self.settings = settings
        self.gatekeeper = gatekeeper
        self.operations = operations
        self.port = settings.port
        self._server: Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self.connections: set[Connection] = set()
        # What the gatekeeper granted a handshake, until its connection handler starts.
        self._grants: weakref.WeakKeyDictionary[ServerConnection, object] = (
            weakref.WeakKeyDictionary()
        )
        self.slow_consumers_closed = 0
        """Connections closed by the slow-consumer policy."""
        self.slow_consumer_frames_dropped = 0
        """Frames that were waiting for those connections when they were closed."""
        self._coalesced_of_closed = 0
        """Notify frames replaced in the outboxes of connections that have since closed."""
        self._limiter = ConnectionLimiter(
            settings.max_connections, settings.max_connections_per_ip
        )
        self.sockets = SocketCount()
        """TCP connections held (see `limit_connections`)."""

    async def start(self) -> None:
        check_websockets()  # the connection internals used below (translator/compat.py)
        settings = self.settings
        # Clients put tokens in request lines and headers, which websockets logs at debug
        # level (and in the exceptions of malformed requests): every record is redacted.
        install_redaction()
        self._server = await serve(
            self._serve_connection,
            settings.host,
            settings.port,
            process_request=self._process_request,
            process_response=_process_response,
            select_subprotocol=_select_subprotocol,
            max_size=settings.max_frame_bytes,
            # permessage-deflate only when configured (`[server] compression`): a compressed
            # connection leaves the shared-bytes fan-out (docs/performance.md).
            compression=None,
            extensions=[settings.deflate.factory()] if settings.deflate else None,
            close_timeout=CLOSE_TIMEOUT,
            create_connection=_ServerConnection.serving(
                self._host_names(), self.operations, self.sockets
            ),
            # With the kernel's unsent bytes bounded (`Connection`), frames that the socket
            # does not take must wait in the outbox, not in the transport's buffer.
            write_limit=BOUNDED_WRITE_LIMIT
            if settings.send_limits.max_inflight_bytes
            else UNBOUNDED_WRITE_LIMIT,
            # The sweeper below pings for every connection: websockets' keepalive would keep
            # a task, a coroutine and a timer per connection (about 1.5 KiB each).
            ping_interval=None,
            open_timeout=settings.handshake_timeout,
            ssl=settings.ssl_context,
            server_header=SERVER_HEADER,
            backlog=settings.backlog,
        )
        sockets = list(self._server.sockets)
        if sockets:
            self.port = sockets[0].getsockname()[1]
        for listening in sockets:
            compat.gate_accepts(listening.fileno(), self.sockets)
        self._sweeper = asyncio.create_task(self._sweep_laggards(), name="ws lag sweeper")
        if settings.ping_interval is not None:
            self._keepalive = asyncio.create_task(
                self._keep_alive(settings.ping_interval, settings.ping_timeout),
                name="ws keepalive",
            )

    def limit_connections(self, most: int, sockets: int | None = None) -> None:
        """Admit at most `most` connections in all from now on (the open-files budget may
        allow fewer than `max_connections`); more get HTTP 503 with Retry-After. With
        `sockets`, hold at most that many TCP connections (admitted, being handshaken or
        being refused): past it, accepting pauses rather than fails for want of descriptors.
        """
        self._limiter.max_total = most
        self.sockets.limit = sockets

    @property
    def url(self) -> str:
        scheme = "wss" if self.settings.ssl_context else "ws"
        host = self.settings.host
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.port}{WS_PATH}"

    async def stop(self) -> None:
        """Close every connection with 1001 (going away) and stop listening."""
        for task in (self._sweeper, self._keepalive):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._sweeper = self._keepalive = None
        if self._server is None:
            return
        for listening in self._server.sockets:
            compat.ungate_accepts(listening.fileno())
        self._server.close(close_connections=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_TIMEOUT + 1):
                await self._server.wait_closed()
        self._server = None

    async def _sweep_laggards(self) -> None:
        """Close connections that stayed behind for longer than max_lag.

        A stalled client receives nothing more that could trip a bound on send(), so
        lag is also checked here, once a second (or faster for a small max_lag).
        """
        loop = asyncio.get_running_loop()
        period = min(1.0, max(self.settings.send_limits.max_lag / 4, 0.05))
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            for conn in [c for c in self.connections if c.outbox.lagging(now)]:
                conn.drop_slow(f"behind for more than {conn.outbox.max_lag:g} s")

    async def _keep_alive(self, interval: float, timeout: float | None) -> None:
        """Ping every open connection every `interval` seconds; close one whose ping is
        unanswered after `timeout` seconds (None: wait for its pong forever) with 1011.

        A connection that still owes a pong gets no new ping, as with websockets' own
        keepalive. The pings of a round share one deadline, checked in one pass over the
        connections; rounds overlap when `timeout` exceeds `interval`. A failure is logged
        and the sweeper carries on: it must outlive any one connection's trouble.
        """
        loop = asyncio.get_running_loop()
        due: deque[_PingRound] = deque()  # rounds waiting for their deadline, oldest first
        next_round = loop.time() + interval
        while True:
            wake = min(next_round, due[0].deadline) if due else next_round
            await asyncio.sleep(wake - loop.time())
            try:
                while due and due[0].deadline <= loop.time():
                    await self._close_unanswered(due.popleft())
                if loop.time() >= next_round:
                    next_round = loop.time() + interval
                    round_ = _PingRound()
                    if await self._ping_all(round_) and timeout is not None:
                        # From the end of the round: the last ping gets the full timeout.
                        round_.deadline = loop.time() + timeout
                        due.append(round_)
            except Exception:
                log.exception("keepalive sweep failed")

    async def _ping_all(self, round_: _PingRound) -> int:
        """Ping each open connection that owes no pong, a slice at a time; how many."""
        sent = 0
        for i, conn in enumerate(list(self.connections)):
            if i and not i % KEEPALIVE_SLICE:
                await asyncio.sleep(0)
            if conn.awaiting_pong:
                continue
            try:
                if await conn.keepalive_ping(round_):
                    sent += 1
            except ConnectionClosed:
                pass  # closed while the round went on
            except Exception:
                log.exception("%r: keepalive ping failed", conn)
        return sent

    async def _close_unanswered(self, round_: _PingRound) -> None:
        """Close the connections that still owe `round_` a pong, a slice at a time."""
        for i, conn in enumerate(list(self.connections)):
            if i and not i % KEEPALIVE_SLICE:
                await asyncio.sleep(0)
            if conn.ping_unanswered(round_):
                log.info("%r: keepalive ping unanswered, closing", conn)
                try:
                    conn.close(*KEEPALIVE_TIMEOUT)
                except Exception:  # the others of the round must still be closed
                    log.exception("%r: closing after an unanswered ping failed", conn)

    def _process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        """Decide on a WebSocket handshake: None lets websockets check and accept it.

        `_ServerConnection` hands websockets only GETs on `/ws` (`web.front` answers every
        other request), so the limits, the Origin and the gatekeeper are all asked here.
        """
        if request.path.partition("?")[0] not in WS_PATHS:  # not expected: see the docstring
            return _response(http_front.error_answer(http.HTTPStatus.NOT_FOUND, "no such path"))
        address = ws.remote_address
        ip = str(address[0]) if address else ""
        refusal = self._count_connection(ws, ip) or self._check_origin(request.headers)
        if refusal is None and self.gatekeeper is not None:
            verdict = self.gatekeeper.admit(request.path, request.headers, ip)
            if isinstance(verdict, Refusal):
                refusal = verdict
            else:
                self._grants[ws] = verdict
        if refusal is None:
            return None
        log.info("handshake from %s refused: %d %s", _peer(ws), refusal.status, refusal.message)
        response = ws.respond(refusal.status, refusal.message + "\n")
        for name, value in refusal.headers:
            response.headers[name] = value
        return response

    def _count_connection(self, ws: ServerConnection, ip: str) -> Refusal | None:
        """Admit one more connection from `ip` within the limits, until its TCP closes."""
        why = self._limiter.try_acquire(ip)
        if why is not None:
            return Refusal(http.HTTPStatus.SERVICE_UNAVAILABLE, why, (("Retry-After", "5"),))
        # Released whenever the TCP connection ends: after the session, or right after a
        # refusal that a later check makes.
        ws.connection_lost_waiter.add_done_callback(lambda _: self._limiter.release(ip))
        return None

    def _host_names(self) -> HostNames:
        """The names `Host` may carry: ``localhost``, the listen address when it is a name,
        and the configured server names (IP literals are always accepted)."""
        names = {"localhost", *(n.lower().rstrip(".") for n in self.settings.server_names)}
        host = self.settings.host.lower()
        if host and not _is_ip_literal(host):
            names.add(host.rstrip("."))
        return HostNames(frozenset(names))

    def _check_origin(self, headers: Headers) -> Refusal | None:
        """Browsers say where a page came from; refuse pages from other sites (CSWSH).

        The gateway's own origin (the page it serves, as the request's Host names it; Host
        was checked against the names served, so a rebound name cannot pose as it) is always
        allowed, and `allowed_origins` adds others.
        """
        origins = headers.get_all("Origin")
        if not origins:
            return None  # not a browser: nothing to protect against
        if len(origins) > 1:
            return Refusal(http.HTTPStatus.FORBIDDEN, "more than one Origin header")
        origin = origins[0]
        hosts = headers.get_all("Host")
        host = hosts[0] if len(hosts) == 1 else ""
        allowed = [f"http://{host}", f"https://{host}", *(self.settings.allowed_origins or ())]
        if origin.lower().rstrip("/") in {o.lower().rstrip("/") for o in allowed}:
            return None
        return Refusal(http.HTTPStatus.FORBIDDEN, f"origin {origin!r} is not allowed")

    @property
    def coalesced_total(self) -> int:
        """Notify frames replaced by newer ones in an outbox, since the server started
        (summed over the open connections when asked: the fan-out does not count)."""
        return self._coalesced_of_closed + sum(c.outbox.replaced for c in self.connections)

    def _count_slow_consumer(self, conn: Connection) -> None:
        # Called before the close drops what waits.
        self.slow_consumers_closed += 1
        self.slow_consumer_frames_dropped += conn.outbox.frames

    async def _serve_connection(self, ws: ServerConnection) -> None:
        _forget_handshake_headers(ws)
        conn = Connection(ws, self.settings.send_limits, self._count_slow_consumer)
        conn.grant = self._grants.pop(ws, None)
        self.connections.add(conn)
        log.info("%r connected", conn, extra=conn.log_fields)
        try:
            self.handler.connected(conn)
            # recv() in a loop rather than `async for`: the async generator behind `async for`
            # would stay alive (with its frame) for as long as the connection is open.
            while True:
                self.handler.received(conn, await ws.recv())
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(conn)
            self._coalesced_of_closed += conn.outbox.replaced
            self.handler.disconnected(conn)
            await conn.finish()
            conn.finished.set_result(None)
            log.info("%r disconnected (%s)", conn, ws.close_code, extra=conn.log_fields)


class _ServerConnection(ServerConnection):
    """websockets' connection, behind a front that reads the request head first.

    The front (`data_received` until the head is answered) exists because websockets reads
    a connection's first bytes as one request and nothing else:

    * bytes after the request head (a second, pipelined request, junk, a body) were parsed
      as WebSocket frames before the answer went out; failing on them ended the stream, and
      the answer then failed on an assertion (no answer, an ERROR traceback);
    * a head websockets cannot parse (a body, an unknown HTTP version, a malformed header
      line) got no answer at all, only the end of the stream.

    So the head is read here (`http_front.HeadReader`, `parse_head`). A GET on `/ws` (or on
    `/.well-known/coap`) goes to websockets, without what follows it: those bytes wait until
    the handshake is answered, then go to websockets too (frames after a 101; after a
    refusal websockets discards them). Every other request gets `web.front`'s answer through
    websockets' Sans-I/O `send_response()`, which logs it, ends the stream and discards what
    the client sends until it closes (at most `CLOSE_TIMEOUT` seconds later, the TCP
    connection is dropped). Only public websockets API is used: `create_connection`,
    `data_received`, the protocol's `send_response()` and `data_to_send()`.

    Every attribute is named when the connection is created: CPython 3.11 lets a class's
    instances share one table of attribute names, which has room for a few more names than
    the first instance sets, and each new instance takes one of those spare places away.
    websockets sets `recv_messages` and `transport` only in `connection_made()`, which runs
    after every connection accepted in the same loop turn has been created: after a burst
    of five or more, the table has no room left for them, and from then on every connection
    of the process carries a private `__dict__` (about 1.5 KiB more per connection).
    """

    hosts: HostNames = HostNames()
    """The names a request's Host may carry. Class attributes (see `serving`): shared by
    every connection of a server, they cost no name in the instances' attribute table."""
    operations: Operations | None = None
    """Who answers `/readyz` and `/metrics`."""
    sockets: SocketCount | None = None
    """The server's TCP connections, whatever their state (handshake, open, refused)."""

    @classmethod
    def serving(
        cls, hosts: HostNames, operations: Operations | None = None,
        sockets: SocketCount | None = None,
    ) -> type[_ServerConnection]:
        """This class for a server that answers to `hosts`, with these `operations`, its
        TCP connections counted in `sockets`."""
        return type(cls.__name__, (cls,),
                    {"hosts": hosts, "operations": operations, "sockets": sockets})

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.sockets is not None:
            self.sockets.made()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.sockets is not None:
            self.sockets.lost()
        super().connection_lost(exc)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Placeholders until connection_made() sets the real values.
        self.recv_messages = None  # type: ignore[assignment]
        self.transport = None  # type: ignore[assignment]
        # Two attributes only: a 30th and 31st name would overflow the shared table.
        self.front: _Front | None = _Front()
        """The request head being read, then the bytes after a handshake's head; None
        once websockets reads everything itself."""
        self.owner: Connection | None = None
        """The gateway's side of this connection, once open: told of every read that
        leaves bytes in the transport's buffer (`Connection.check_backlog`)."""

    def data_received(self, data: bytes) -> None:
        front = self.front
        if front is not None:
            if front.reader is not None:
                self._read_head(front, front.reader, data)
            # The handshake's answer is decided once `response` is set; data_received cannot
            # run between that and send_response(), so it has gone out.
            elif self.response is None:
                front.early += data
            else:
                self.release_early(data)
            return
        owner = self.owner
        if owner is None:
            super().data_received(data)
        elif not owner.deaf:
            super().data_received(data)
            if self.transport.get_write_buffer_size():
                owner.check_backlog()

    def _read_head(self, front: _Front, reader: HeadReader, data: bytes) -> None:
        try:
            found = reader.feed(data)
            if found is None:
                return
            head_bytes, rest = found
            head = http_front.parse_head(head_bytes)
        except HttpError as error:
            self.front = None
            log.debug("%s: unreadable request (%s)", _peer(self), error.message)
            self._answer(http_front.error_answer(error.status, error.message))
            return
        answer = http_front.answer_request(head, self.hosts, self.operations)
        if answer is not None:
            self.front = None
            log.debug("%s: %s %s answered %d", _peer(self), head.method, head.path,
                      answer.status)
            self._answer(answer)
            return
        # A WebSocket handshake. websockets answers it in a later loop turn (a task runs
        # process_request), so at most a read or two arrive meanwhile: `early` stays small.
        front.reader = None
        front.early += rest
        super().data_received(head_bytes)

    def release_early(self, data: bytes = b"") -> None:
        """Hand the bytes that came after the handshake's head on to websockets, now that
        the handshake is answered (`process_response` schedules this)."""
        front = self.front
        if front is None or front.reader is not None:
            return
        self.front = None
        early = bytes(front.early) + data
        if early and not self.transport.is_closing():
            self.data_received(early)

    def _answer(self, answer: Answer) -> None:
        """Send `answer` and end the stream, as websockets does with its own refusals."""
        self.protocol.send_response(_response(answer))
        for data in self.protocol.data_to_send():
            if data:
                self.transport.write(data)
            elif self.transport.can_write_eof():
                self.transport.write_eof()
            else:  # TLS: no half-close
                self.transport.close()
        # websockets' handshake task waits for a request that never comes, or for the
        # connection to close: a client that keeps it open is dropped after the grace time.
        self.loop.call_later(CLOSE_TIMEOUT, self.transport.abort)


class SocketCount:
    """The TCP connections a server holds: each is a descriptor, from accept() until the
    connection is lost, whether it is being handshaken, open, or refused.

    A connection is `pending` from accept() until asyncio makes its protocol (a loop turn
    or two later), then `open` until it is lost. A pending one that is never made (asyncio
    gave up on it) is forgotten after `PENDING_FOR` seconds.
    """

    __slots__ = ("limit", "open", "pending")

    PENDING_FOR: Final = 1.0

    def __init__(self) -> None:
        self.open = 0
        self.pending: deque[float] = deque()
        self.limit: int | None = None
        """The most this server may hold (None: no bound but the process's)."""

    def held(self) -> int:
        pending, since = self.pending, time.monotonic() - self.PENDING_FOR
        while pending and pending[0] < since:
            pending.popleft()
        return self.open + len(pending)

    def made(self) -> None:
        self.open += 1
        if self.pending:
            self.pending.popleft()

    def lost(self) -> None:
        self.open -= 1

    # compat.AcceptGate: asked before each accept() on the server's listening sockets.

    def no_room(self) -> str | None:
        if self.limit is None or self.held() < self.limit:
            return None
        return (f"the open-files budget is spent ({self.held()} TCP connections held, "
                f"at most {self.limit}: admitted, being opened or being refused)")

    def accepted(self) -> None:
        self.pending.append(time.monotonic())


class _Front:
    """What `_ServerConnection` keeps until websockets reads the connection itself."""

    __slots__ = ("early", "reader")

    def __init__(self) -> None:
        self.reader: HeadReader | None = HeadReader()
        """Reads the request head; None once it is complete."""
        self.early = bytearray()
        """Bytes after the head of a handshake, until websockets has answered it."""


def _process_response(
    ws: ServerConnection, request: Request, response: Response
) -> Response | None:
    """Every handshake answer but a 101 gets `web.front`'s security headers; bytes that
    came after the handshake's head are handed on once the answer is out."""
    if response.status_code != http.HTTPStatus.SWITCHING_PROTOCOLS:
        for name, value in http_front.security_headers():
            response.headers[name] = value
    if isinstance(ws, _ServerConnection):
        # send_response() follows this call in the same step of websockets' handshake task.
        ws.loop.call_soon(ws.release_early)
    return None


def _select_subprotocol(
    ws: ServerConnection, offered: Sequence[Subprotocol]
) -> Subprotocol | None:
    """`/.well-known/coap` speaks the subprotocol ``coap`` (RFC 8323 §4.1: a client MUST
    offer it; one that does not is refused with 400). `/ws` speaks the encoding the client
    asked for (`web.encodings`: JSON when it names none); a client that offers only other
    subprotocols is refused with 400 naming the supported ones."""
    if ws.request is not None and ws.request.path.partition("?")[0] == COAP_WS_PATH:
        if "coap" not in offered:
            raise NegotiationError(f"{COAP_WS_PATH} needs the WebSocket subprotocol 'coap'")
        return Subprotocol("coap")
    try:
        chosen = choose_subprotocol(offered)
    except UnsupportedSubprotocol as exc:
        raise NegotiationError(str(exc)) from None
    return None if chosen is None else Subprotocol(chosen)


def _forget_handshake_headers(ws: ServerConnection) -> None:
    """Drop the opening handshake's headers once the connection is open.

    websockets keeps the request and the response, headers included, for the connection's
    lifetime (about 4 KiB with a short client request, more from a browser). The gateway
    reads them only while deciding on the handshake (`_process_request`), so an open
    connection keeps just the request's path and the response's status. It also means an
    `Authorization` header does not stay in memory for as long as the client is connected.
    """
    for message in (ws.request, ws.response):
        if message is not None:
            message.headers.clear()


def fan_out(
    targets: Iterable[Connection],
    text: str,
    replaces: str | None = None,
    meta: NotifyMeta | None = None,
) -> None:
    """Send one frame to many connections: framed once per form, the same bytes for each.

    The hot path of a notification. A connection with nothing queued ahead of the frame, an
    empty transport buffer and a plain TCP socket gets the bytes by one `os.write` on its
    socket: at a thousand clients per update, asyncio's `transport.write` around the same
    system call was about a sixth of the gateway's CPU per delivered frame. The rest of a
    frame that the socket takes in part goes to the transport's buffer behind it, in order;
    a frame it refuses (EAGAIN: its buffer is full, or past `max_inflight_bytes` of unsent
    bytes) goes to `Connection.send`, so to the outbox once the transport holds a frame; an
    error goes to the transport, which meets it again and closes the connection as it
    always does. Every other connection gets `Connection.send` (queue, slow-consumer
    policy, TLS).

    A connection that is not `plain` takes its own form of the frame (`Connection.pick`:
    CBOR, compact), made once per update for all who take it (`Outgoing`); a compressed
    one goes through its compressor (`Connection.send`).
    """
    frame = text_frame(text)
    write = os.write
    outgoing: Outgoing | None = None
    for conn in targets:
        message: str | bytes = text
        framed = frame
        if not conn.plain:
            if outgoing is None:
                outgoing = Outgoing(text, meta)
            message, framed = conn.pick(outgoing, replaces)
        # The conditions of `Connection.send`'s hot path (`_writable`), inlined because a
        # method call per client is measurable here, plus an empty transport buffer: bytes
        # already buffered must go out before these ones.
        fd, transport, ws = conn._fd, conn._transport, conn.ws
        if (
            fd >= 0
            and not conn.closing
            and not conn._writing
            and not conn.outbox.frames
            and not transport.get_write_buffer_size()
            and not transport.is_closing()  # the socket is still open, so `fd` is still its
            and ws.protocol.state is OPEN
            and ws.send_in_progress is None
        ):
            try:
                sent = write(fd, framed)
            except (BlockingIOError, InterruptedError):
                # Not a byte taken: whether it waits in the transport or in the outbox (where
                # a newer notify replaces it) is `send`'s decision.
                conn.send(message, replaces, framed)
                continue
            except OSError:
                transport.write(framed)
                continue
            if sent != len(framed):
                transport.write(framed[sent:])
            continue
        conn.send(message, replaces, framed)


def _bound_unsent(transport: asyncio.Transport, limit: int) -> None:
    """Let the kernel hold at most about `limit` unsent bytes for this connection.

    Without it a TCP socket takes megabytes that its peer has not read (4 MB measured on
    loopback), and a client that reads slowly gets them all, in order, however old. With
    it, a write past the bound fails with EAGAIN, so `fan_out` and the transport stop
    writing and frames wait in the outbox, where each subscription keeps only its newest.
    """
    sock = transport.get_extra_info("socket")
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, limit)
    except OSError as exc:  # not TCP (a Unix socket), or a kernel without the option
        log.debug("cannot bound unsent bytes: %s", exc)


def _socket_writable(transport: asyncio.Transport) -> bool:
    """Whether the transport's socket takes a write now (for TCP with `TCP_NOTSENT_LOWAT`:
    fewer unsent bytes than the bound). True when there is no socket to ask."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return True
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLOUT)
    return bool(poller.poll(0))


def _plain_socket_fd(transport: asyncio.Transport) -> int:
    """The descriptor of a plain TCP transport's socket; -1 under TLS or without a socket."""
    if transport.get_extra_info("ssl_object") is not None:
        return -1
    sock = transport.get_extra_info("socket")
    return sock.fileno() if sock is not None else -1


def text_frame(text: str) -> bytes:
    """A complete, unmasked, unfragmented WebSocket text frame (RFC 6455 §5.2) for `text`."""
    return data_frame(text)


def data_frame(data: str | bytes) -> bytes:
    """A complete, unmasked, unfragmented WebSocket frame: text for a str, binary for bytes
    (CBOR frames, CoAP messages on the RFC 8323 endpoint); see `encodings.ws_frame`."""
    return ws_frame(data)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True


def _peer(ws: ServerConnection) -> str:
    address = ws.remote_address
    return f"{address[0]}:{address[1]}" if address else "?"


def _response(answer: Answer) -> Response:
    """websockets' form of an `web.front` answer, with the headers only I/O can know."""
    headers = Headers([("Date", formatdate(usegmt=True)), *answer.headers])
    headers["Server"] = SERVER_HEADER
    return Response(answer.status.value, answer.status.phrase, headers, answer.body)
