"""Wiring and lifecycle: the one module that knows both sides.

`Gateway` builds the hub, the CoAP side and the WebSocket side from a `GatewayConfig`,
turns client frames into hub events or CoAP requests, and carries out the commands the hub
returns (deliver text, start/stop an observation, arm a linger timer). Start and shutdown
order live here too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http
import logging
import os
import socket
import ssl
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Final

from websockets.datastructures import Headers

from . import frames
from .auth import ANONYMOUS, READ, Principal, TokenStore, scope_for_method, startup_problem
from .coap_security import check_installed, dtls_missing
from .coap_side import CoapAnswer, CoapSide, UpstreamError
from .codecs import UnsupportedValue, decode_payload, encode_value
from .config import ConfigError, GatewayConfig, policy_for
from .credentials import client_credentials
from .frames import FrameError, FrameId
from .hub import Command, Deliver, Hub, StartLinger, StartObservation, StopObservation
from .policy import Decision
from .ratelimit import TokenBucket
from .uris import UriError, parse_coap_uri
from .ws_side import (
    Connection,
    Refusal,
    SendLimits,
    ServerSettings,
    WebSocketServer,
    fan_out,
)

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


@dataclass(eq=False, slots=True)
class Session:
    """What the gateway keeps per connection besides its subscriptions (held by the hub)."""

    conn: Connection
    principal: Principal
    bucket: TokenBucket
    """`request` frames allowed per second (`[limits] rate` / `burst`)."""
    requests: set[asyncio.Task[None]] = field(default_factory=set)
    """CoAP requests in flight (at most `[limits] max_inflight`)."""
    lookups: set[asyncio.Task[None]] = field(default_factory=set)
    """Subscriptions waiting for their host name to be resolved."""

    @property
    def tasks(self) -> set[asyncio.Task[None]]:
        return self.requests | self.lookups


class Gateway:
    """The running gateway: `await start()`, then `await stop()`."""

    def __init__(self, config: GatewayConfig) -> None:
        check_installed(config)
        self.config = config
        self._no_dtls = dtls_missing()
        """Why a client's ``coaps://`` URI cannot be served (the DTLS extra is optional)."""
        self.policy = policy_for(config)
        self.hub: Hub[Connection] = Hub(
            linger=config.server.linger,
            max_subscriptions=config.limits.max_subscriptions,
            sensors={s.name: s.uri for s in config.sensors},
            pinned=[s.uri for s in config.sensors if s.observe],
            max_upstream_bytes=config.limits.max_upstream_bytes,
        )
        self.coap = CoapSide(
            self,
            config.supervision,
            max_representation=config.limits.max_upstream_bytes,
            credentials=client_credentials(config.credentials),
        )
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
                    max_inflight_bytes=limits.max_inflight_bytes,
                ),
                ping_interval=limits.ping_interval or None,
                ping_timeout=limits.ping_timeout or None,
                handshake_timeout=limits.handshake_timeout or None,
                ssl_context=_tls_context(config),
                allowed_origins=config.server.allowed_origins,
                max_connections=limits.max_connections,
                max_connections_per_ip=limits.max_connections_per_ip,
            ),
            gatekeeper=self,
        )
        self.tokens = TokenStore.from_config(
            config.auth, sensors=self.hub.sensor_uris, env=os.environ
        )
        self._sessions: dict[Connection, Session] = {}
        self._lingers: dict[str, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._discovered_at: float | None = None
        self._discovery: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return self.ws.url

    @property
    def authenticating(self) -> bool:
        return len(self.tokens) > 0 and self.config.auth.mode != "none"

    async def start(self) -> None:
        problem = startup_problem(self.config.server.host, self.config.auth, self.tokens)
        if problem is not None:
            raise ConfigError("auth", problem)
        if not self.authenticating:
            log.warning("clients are not authenticated: configure [[auth.tokens]] before "
                        "exposing the gateway beyond this machine")
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
            for task in session.tasks:
                task.cancel()
        pending = [*self._tasks, *(t for s in self._sessions.values() for t in s.tasks)]
        if pending:
            await asyncio.wait(pending, timeout=2)
        await self.coap.shutdown()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- commands from the hub ---------------------------------------------------------------

    def _execute(self, commands: list[Command[Connection]]) -> None:
        for command in commands:
            if isinstance(command, Deliver):
                # Frame once, send to many: the same bytes go to every target.
                fan_out(command.targets, command.text, command.replaces)
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

    def registering(self, uri: str) -> None:
        self._execute(self.hub.upstream_registering(uri))

    def answer(self, uri: str, answer: CoapAnswer) -> None:
        if answer.too_large is not None:
            self._execute(
                self.hub.upstream_too_large(
                    uri,
                    answer.too_large,
                    code=answer.code,
                    cf=answer.cf,
                    max_age=answer.max_age,
                    observe=answer.observable,
                )
            )
            return
        self._execute(
            self.hub.upstream_response(
                uri,
                code=answer.code,
                cf=answer.cf,
                payload=answer.payload,
                max_age=answer.max_age,
                observe=answer.observable,
            )
        )

    def unchanged(self, uri: str) -> None:
        self._execute(self.hub.upstream_unchanged(uri))

    def stale(self, uri: str, reason: str) -> None:
        self._execute(self.hub.upstream_stale(uri, reason))

    def failed(self, uri: str, reason: str) -> None:
        self._execute(self.hub.upstream_failed(uri, reason))

    # -- the WebSocket side's events (MessageHandler) ----------------------------------------

    def admit(self, path: str, headers: Headers, remote_ip: str) -> Refusal | Principal:
        """The handshake's authentication (Gatekeeper): who the client is, or HTTP 401."""
        if not self.authenticating:
            return ANONYMOUS
        presented = headers.get_all("Authorization")
        principal = (
            # Two Authorization headers are ambiguous: refuse rather than pick one.
            self.tokens.authenticate(presented[0] if presented else None, path.partition("?")[2])
            if len(presented) <= 1
            else None
        )
        if principal is None:
            return Refusal(
                http.HTTPStatus.UNAUTHORIZED,
                "a valid token is required (Authorization: Bearer, or ?access_token=)",
                (("WWW-Authenticate", 'Bearer realm="coap-ws-gateway"'),),
            )
        log.info("client %s authenticated as %s", remote_ip, principal.name)
        return principal

    def connected(self, conn: Connection) -> None:
        principal = conn.grant if isinstance(conn.grant, Principal) else ANONYMOUS
        limits = self.config.limits
        self._sessions[conn] = Session(conn, principal, TokenBucket(limits.rate, limits.burst))
        self.hub.connect(conn)

    def disconnected(self, conn: Connection) -> None:
        session = self._sessions.pop(conn, None)
        if session is not None:
            for task in session.tasks:
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
        session = self._sessions[conn]
        match frame:
            case frames.Subscribe():
                decision = self._target(session, frame.uri, frame.name, READ, frame.id)
                if decision.needs_resolution:
                    task = asyncio.create_task(
                        self._answering(
                            conn, frame.id, self._subscribe_resolved(session, decision, frame.id)
                        ),
                        name=f"resolve {decision.uri.host} for #{conn.id}",
                    )
                    session.lookups.add(task)
                    task.add_done_callback(session.lookups.discard)
                else:
                    self._execute(self.hub.subscribe(conn, str(decision.uri), frame.id))
            case frames.Unsubscribe():
                self._execute(self.hub.unsubscribe(conn, frame.sub, frame.id))
            case frames.Request():
                self._start_request(session, frame)
            case frames.ListResources():
                self._require(session.principal, READ, frame.id)
                self._spawn(
                    self._answering(conn, frame.id, self._list(session, frame.id)),
                    f"list for #{conn.id}",
                )
            case frames.Ping():
                conn.send(frames.Pong(frame.id).serialize())

    @staticmethod
    def _require(principal: Principal, scope: str, frame_id: FrameId) -> None:
        if not principal.can(scope):
            raise FrameError(
                frames.FORBIDDEN, f"{principal.name!r} lacks the {scope!r} scope", frame_id
            )

    def _target(
        self,
        session: Session,
        uri_text: str | None,
        name: str | None,
        scope: str,
        frame_id: FrameId,
    ) -> Decision:
        """A frame's target: normalized, in scope, and allowed by the policy and the token.

        When the decision says `needs_resolution`, the host's addresses must still pass
        `_check_addresses` before anything is sent.
        """
        self._require(session.principal, scope, frame_id)
        principal = session.principal
        if name is not None:
            found = self.hub.uri_for_name(name)
            # A name this token may not reach gets the same answer as an unknown one, so that
            # a narrowed token can neither enumerate names nor learn their URIs.
            if found is None or not principal.allows(found, self.hub.sensor_uris):
                raise FrameError(frames.NOT_FOUND, f"no sensor named {name!r}", frame_id)
            uri_text = found
        assert uri_text is not None
        try:
            uri = parse_coap_uri(uri_text)
        except UriError as exc:
            raise FrameError(frames.BAD_REQUEST, str(exc), frame_id) from None
        decision = self.policy.decide(uri)
        if not decision.allowed:
            raise FrameError(frames.FORBIDDEN, decision.reason, frame_id)
        if not principal.allows(uri, self.hub.sensor_uris):
            # The client wrote this URI itself: naming it reveals nothing.
            raise FrameError(
                frames.FORBIDDEN, f"{uri} is not allowed for {principal.name!r}", frame_id
            )
        if uri.scheme == "coaps" and self._no_dtls is not None:
            raise FrameError(frames.UNSUPPORTED, self._no_dtls, frame_id)
        if decision.needs_resolution and str(uri) in self.policy.sensor_uris:
            # A configured sensor's host was named by the operator, not by a client.
            return dataclasses.replace(decision, needs_resolution=False)
        return decision

    async def _check_addresses(
        self, principal: Principal, decision: Decision, frame_id: FrameId
    ) -> None:
        """Resolve a host name and apply the policy, and the token's own patterns, to what it
        resolves to: a name must not smuggle a multicast, broadcast or unspecified
        destination, or an address outside the address patterns, past either."""
        uri = decision.uri
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(
                uri.host, uri.port, type=socket.SOCK_DGRAM
            )
        except OSError as exc:
            raise FrameError(
                frames.UPSTREAM_ERROR, f"cannot resolve {uri.host!r}: {exc}", frame_id
            ) from None
        addresses = [str(info[4][0]) for info in infos]
        if not self.policy.allows_addresses(uri, addresses) or (
            principal.allow is not None and not principal.allow.allows_addresses(uri, addresses)
        ):
            raise FrameError(
                frames.FORBIDDEN,
                f"{uri.host} resolves to a destination the policy does not allow",
                frame_id,
            )

    async def _subscribe_resolved(
        self, session: Session, decision: Decision, frame_id: FrameId
    ) -> None:
        await self._check_addresses(session.principal, decision, frame_id)
        self._execute(self.hub.subscribe(session.conn, str(decision.uri), frame_id))

    @staticmethod
    async def _answering(
        conn: Connection, frame_id: FrameId, work: Coroutine[Any, Any, None]
    ) -> None:
        """Run the work a frame started in a task of its own, so that the frame is answered
        whatever the work raises: its FrameError, or ``internal_error`` (with the frame's
        id) for anything unexpected, which is logged. Cancellation is not an answer."""
        try:
            await work
        except FrameError as exc:
            conn.send(exc.to_frame().serialize())
        except Exception:
            log.exception("%r: internal error answering frame %r", conn, frame_id)
            conn.send(frames.ErrorFrame(frame_id, "internal_error", "internal error").serialize())

    # -- requests ----------------------------------------------------------------------------

    def _start_request(self, session: Session, frame: frames.Request) -> None:
        conn = session.conn
        if not session.bucket.take():
            raise FrameError(
                frames.RATE_LIMITED,
                f"more than {self.config.limits.rate:g} requests per second; retry in "
                f"{session.bucket.retry_after():.2f} s",
                frame.id,
            )
        decision = self._target(
            session, frame.uri, frame.name, scope_for_method(frame.method), frame.id
        )
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
            self._answering(conn, frame.id, self._request(session, frame, decision, payload)),
            name=f"request {frame.id!r} #{conn.id}",
        )
        session.requests.add(task)
        task.add_done_callback(session.requests.discard)

    async def _request(
        self, session: Session, frame: frames.Request, decision: Decision, payload: bytes
    ) -> None:
        conn = session.conn
        uri = str(decision.uri)
        reply: frames.Response | frames.ErrorFrame
        try:
            if decision.needs_resolution:
                await self._check_addresses(session.principal, decision, frame.id)
            answer = await self.coap.request(
                frame.method,
                uri,
                payload=payload,
                cf=frame.cf,
                accept=frame.accept,
                confirmable=frame.confirmable,
                timeout=frame.timeout,
            )
        except FrameError as exc:
            reply = exc.to_frame()
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

    async def _list(self, session: Session, frame_id: FrameId) -> None:
        conn, principal = session.conn, session.principal
        stale = (
            self._discovered_at is None
            or time.monotonic() - self._discovered_at >= DISCOVERY_REFRESH
        )
        if self.config.sensors and stale and (self._discovery is None or self._discovery.done()):
            self._discovery = self._spawn(self._discover(), "discovery")
        if self._discovery is not None and not self._discovery.done():
            # wait() neither cancels the shared discovery with this frame's task nor raises
            # when the discovery itself is cancelled (at shutdown).
            await asyncio.wait([self._discovery])
        # What the operator configured (sensors, and links discovered at their hosts) as far
        # as the policy and the token allow it, and what this token's own connections watch;
        # never what other tokens subscribed to (their URIs may carry secrets in the query).
        own = {
            uri
            for other in self._sessions.values()
            if other.principal == principal
            for uri in self.hub.subscribed_uris(other.conn)
        }
        entries = self.hub.list_entries(
            lambda uri: uri in own
            or (
                self.hub.catalogued(uri)
                and self.policy.allows(uri)
                and principal.allows(uri, self.hub.sensor_uris)
            )
        )
        conn.send(frames.Resources(frame_id, tuple(entries)).serialize())
