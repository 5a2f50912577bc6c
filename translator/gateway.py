"""Wiring and lifecycle: the one module that knows both sides.

`Gateway` builds the hub, the CoAP side and the WebSocket side from a `GatewayConfig`,
turns client frames into hub events or CoAP requests, and carries out the commands the hub
returns (deliver text, start/stop an observation, arm a linger timer). Start and shutdown
order live here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from dataclasses import dataclass, field
from typing import Final

from . import frames
from .coap_side import CoapAnswer, CoapSide, UpstreamError
from .codecs import UnsupportedValue, decode_payload, encode_value
from .config import ConfigError, GatewayConfig, policy_for
from .frames import FrameError, FrameId
from .hub import Command, Deliver, Hub, StartLinger, StartObservation, StopObservation
from .uris import CoapUri, UriError, parse_coap_uri
from .ws_side import Connection, SendLimits, ServerSettings, WebSocketServer

log = logging.getLogger(__name__)

DISCOVERY_REFRESH: Final = 60.0
"""A `list` reads the sensors' /.well-known/core again at most this often (seconds)."""


def _tls_context(config: GatewayConfig) -> ssl.SSLContext | None:
    """The server TLS context for `wss://`, or None; unusable files are a ConfigError."""
    server = config.server
    if server.tls_cert is None or server.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    for key, path in (("server.tls_cert", server.tls_cert), ("server.tls_key", server.tls_key)):
        if not os.access(path, os.R_OK):
            raise ConfigError(key, f"cannot read {path!r}")
    try:
        context.load_cert_chain(server.tls_cert, server.tls_key)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError("server.tls_cert", f"unusable certificate or key: {exc}") from None
    return context


@dataclass(eq=False)
class Session:
    """What the gateway keeps per connection besides its subscriptions (held by the hub)."""

    conn: Connection
    requests: set[asyncio.Task[None]] = field(default_factory=set)


class Gateway:
    """The running gateway: `await start()`, then `await stop()`."""

    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.policy = policy_for(config)
        self.hub: Hub[Connection] = Hub(
            linger=config.server.linger,
            max_subscriptions=config.limits.max_subscriptions,
            sensors={s.name: s.uri for s in config.sensors},
            pinned=[s.uri for s in config.sensors if s.observe],
        )
        self.coap = CoapSide(self)
        limits = config.limits
        self.ws = WebSocketServer(
            self,
            ServerSettings(
                host=config.server.host,
                port=config.server.port,
                max_frame_bytes=limits.max_frame_bytes,
                send_limits=SendLimits(
                    max_pending_bytes=limits.max_pending_bytes,
                    max_frames=limits.max_queue,
                    max_lag=limits.max_lag,
                ),
                ping_interval=limits.ping_interval or None,
                ping_timeout=limits.ping_timeout or None,
                handshake_timeout=limits.handshake_timeout or None,
                ssl_context=_tls_context(config),
                allowed_origins=config.server.allowed_origins,
            ),
        )
        self._sessions: dict[Connection, Session] = {}
        self._lingers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._discovered_at: float | None = None
        self._discovery: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return self.ws.url

    async def start(self) -> None:
        if self.policy.allows_everything:
            log.warning("policy allows every CoAP destination ('*'): for development only")
        await self.coap.start()
        await self.ws.start()
        self._execute(self.hub.startup())
        if self.config.sensors:
            self._discovery = self._spawn(self._discover(), "discovery")

    async def stop(self) -> None:
        """Cancel upstream observations, close WebSockets with 1001, stop everything."""
        for handle in self._lingers.values():
            handle.cancel()
        self._lingers.clear()
        await self.ws.stop()
        for task in list(self._tasks):
            task.cancel()
        for session in self._sessions.values():
            for task in session.requests:
                task.cancel()
        pending = [*self._tasks, *(t for s in self._sessions.values() for t in s.requests)]
        if pending:
            await asyncio.wait(pending, timeout=2)
        await self.coap.shutdown()

    def _spawn(self, coro: object, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- commands from the hub ---------------------------------------------------------------

    def _execute(self, commands: list[Command[Connection]]) -> None:
        for command in commands:
            if isinstance(command, Deliver):
                text, replaces = command.text, command.replaces
                for conn in command.targets:
                    conn.send(text, replaces)
            elif isinstance(command, StartObservation):
                self._cancel_linger(command.uri)
                self.coap.start_observation(command.uri)
            elif isinstance(command, StopObservation):
                self._cancel_linger(command.uri)
                self.coap.stop_observation(command.uri)
            elif isinstance(command, StartLinger):
                self._cancel_linger(command.uri)
                self._lingers[command.uri] = asyncio.get_running_loop().call_later(
                    command.delay, self._linger_expired, command.uri, command.generation
                )

    def _cancel_linger(self, uri: str) -> None:
        handle = self._lingers.pop(uri, None)
        if handle is not None:
            handle.cancel()

    def _linger_expired(self, uri: str, generation: int) -> None:
        self._lingers.pop(uri, None)
        self._execute(self.hub.linger_expired(uri, generation))

    # -- the CoAP side's events (ObservationListener) ----------------------------------------

    def answer(self, uri: str, answer: CoapAnswer) -> None:
        self._execute(
            self.hub.upstream_response(
                uri,
                code=answer.code,
                cf=answer.cf,
                payload=answer.payload,
                max_age=answer.max_age,
                observe=answer.observe is not None,
            )
        )

    def failed(self, uri: str, reason: str) -> None:
        self._execute(self.hub.upstream_status(uri, "offline", reason))

    # -- the WebSocket side's events (MessageHandler) ----------------------------------------

    def connected(self, conn: Connection) -> None:
        self._sessions[conn] = Session(conn)
        self.hub.connect(conn)

    def disconnected(self, conn: Connection) -> None:
        session = self._sessions.pop(conn, None)
        if session is not None:
            for task in session.requests:
                task.cancel()
        self._execute(self.hub.disconnect(conn))

    def received(self, conn: Connection, message: str | bytes) -> None:
        try:
            frame = frames.parse(message)
            self._dispatch(conn, frame)
        except FrameError as exc:
            conn.send(exc.to_frame().serialize())
        except Exception:  # never let one frame take the connection or the gateway down
            log.exception("%r: internal error handling a frame", conn)
            conn.send(frames.ErrorFrame(None, "internal_error", "internal error").serialize())

    def _dispatch(self, conn: Connection, frame: frames.ClientFrame) -> None:
        match frame:
            case frames.Subscribe():
                uri = self._resolve(frame.uri, frame.name, frame.id)
                self._execute(self.hub.subscribe(conn, str(uri), frame.id))
            case frames.Unsubscribe():
                self._execute(self.hub.unsubscribe(conn, frame.sub, frame.id))
            case frames.Request():
                self._start_request(conn, frame)
            case frames.ListResources():
                self._spawn(self._list(conn, frame.id), f"list for #{conn.id}")
            case frames.Ping():
                conn.send(frames.Pong(frame.id).serialize())

    def _resolve(self, uri_text: str | None, name: str | None, frame_id: FrameId) -> CoapUri:
        """A frame's target as a normalized URI that the policy allows."""
        if name is not None:
            found = self.hub.uri_for_name(name)
            if found is None:
                raise FrameError(frames.NOT_FOUND, f"no sensor named {name!r}", frame_id)
            uri_text = found
        assert uri_text is not None
        try:
            uri = parse_coap_uri(uri_text)
        except UriError as exc:
            raise FrameError(frames.BAD_REQUEST, str(exc), frame_id) from None
        if not self.policy.allows(uri):
            raise FrameError(
                frames.FORBIDDEN, f"{uri} is not allowed by the gateway's policy", frame_id
            )
        return uri

    # -- requests ----------------------------------------------------------------------------

    def _start_request(self, conn: Connection, frame: frames.Request) -> None:
        session = self._sessions[conn]
        uri = self._resolve(frame.uri, frame.name, frame.id)
        if len(session.requests) >= self.config.limits.max_inflight:
            raise FrameError(
                frames.LIMIT,
                f"at most {self.config.limits.max_inflight} requests in flight per connection",
                frame.id,
            )
        payload = frame.payload or b""
        if frame.has_value:
            assert frame.cf is not None
            try:
                payload = encode_value(frame.cf, frame.value)
            except UnsupportedValue as exc:
                raise FrameError(frames.UNSUPPORTED, str(exc), frame.id) from None
        task = asyncio.create_task(
            self._request(conn, frame, str(uri), payload), name=f"request {frame.id!r} #{conn.id}"
        )
        session.requests.add(task)
        task.add_done_callback(session.requests.discard)

    async def _request(
        self, conn: Connection, frame: frames.Request, uri: str, payload: bytes
    ) -> None:
        reply: frames.Response | frames.ErrorFrame
        try:
            answer = await self.coap.request(
                frame.method,
                uri,
                payload=payload,
                cf=frame.cf,
                accept=frame.accept,
                confirmable=frame.confirmable,
                timeout=frame.timeout,
            )
        except TimeoutError:
            reply = frames.ErrorFrame(
                frame.id, frames.TIMEOUT, f"no answer from {uri} within {frame.timeout:g} s"
            )
        except UpstreamError as exc:
            reply = frames.ErrorFrame(frame.id, frames.UPSTREAM_ERROR, f"{uri}: {exc}")
        else:
            # An error response's payload is a diagnostic text (RFC 7252 §5.5.2), whatever
            # the resource advertises for its representations.
            advertised = self.hub.advertised_cf(uri) if answer.code.startswith("2.") else None
            body = decode_payload(
                answer.cf, answer.payload, ts=time.time(), advertised_cf=advertised
            )
            reply = frames.Response(frame.id, answer.code, answer.cf, body)
        conn.send(reply.serialize())

    # -- discovery and list ------------------------------------------------------------------

    async def _discover(self) -> None:
        """Read /.well-known/core of every configured sensor's host."""
        self._discovered_at = time.monotonic()
        origins = dict.fromkeys(parse_coap_uri(s.uri).origin for s in self.config.sensors)
        results = await asyncio.gather(
            *(self.coap.discover(origin) for origin in origins), return_exceptions=True
        )
        for origin, result in zip(origins, results, strict=True):
            if isinstance(result, BaseException):
                log.info("discovery at %s failed: %s", origin, result)
                continue
            try:
                self.hub.set_links(origin, result)
            except ValueError as exc:
                log.info("discovery at %s: bad link-format: %s", origin, exc)

    async def _list(self, conn: Connection, frame_id: FrameId) -> None:
        stale = (
            self._discovered_at is None
            or time.monotonic() - self._discovered_at >= DISCOVERY_REFRESH
        )
        if self.config.sensors and stale and (self._discovery is None or self._discovery.done()):
            self._discovery = self._spawn(self._discover(), "discovery")
        if self._discovery is not None and not self._discovery.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._discovery)
        entries = self.hub.list_entries(self.policy.allows)
        conn.send(frames.Resources(frame_id, tuple(entries)).serialize())
