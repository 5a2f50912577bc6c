"""Wiring and lifecycle: the one module that knows both sides.

`Gateway` builds the hub, the CoAP side and the WebSocket side from a `GatewayConfig`,
turns client frames into hub events or CoAP requests, and carries out the commands the hub
returns (deliver text, start/stop an observation, arm a linger timer). Start and shutdown
order live here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import difflib
import http
import json
import logging
import os
import resource
import socket
import ssl
import time
from asyncio.constants import ACCEPT_RETRY_DELAY
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from websockets.datastructures import Headers

from translator import compat
from translator.auth import (
    ANONYMOUS,
    READ,
    Principal,
    TokenStore,
    scope_for_method,
    startup_problem,
)
from translator.budget import (
    Budget,
    client_budget,
    default_lookup_workers,
    open_descriptors,
    raise_open_files_limit,
)
from translator.coap.security import check_installed, dtls_missing
from translator.coap.side import CoapAnswer, CoapSide, UpstreamError
from translator.coap_ws_proxy import CoapWsGrant, CoapWsProxy
from translator.config import ConfigError, GatewayConfig, policy_for
from translator.core import frames
from translator.core.codecs import (
    UnsupportedValue,
    cbor_data_item,
    decode_payload,
    encode_value,
)
from translator.core.frames import FrameError, FrameId
from translator.core.history import History
from translator.core.hub import (
    Command,
    Deliver,
    Hub,
    Repeat,
    StartLinger,
    StartObservation,
    StopObservation,
    Wake,
)
from translator.core.policy import Decision
from translator.core.ratelimit import TokenBucket
from translator.core.uris import UriError, parse_coap_uri
from translator.credentials import client_credentials
from translator.logs import limit_loop_exceptions
from translator.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from translator.metrics import GatewayMetrics
from translator.registry import Registry
from translator.web.encodings import parse_client_frame, to_cbor
from translator.web.front import COAP_WS_PATH, WS_PATH, Answer, text_answer
from translator.web.metrics_port import MetricsPort, host_names
from translator.web.server import (
    Connection,
    DeflateSettings,
    Refusal,
    SendLimits,
    ServerSettings,
    WebSocketServer,
    fan_out,
)

if TYPE_CHECKING:
    from translator.cluster.node import ClusterNode
    from translator.cluster.wire import Published

log = logging.getLogger(__name__)

DISCOVERY_REFRESH: Final = 60.0
"""A `list` reads the sensors' /.well-known/core again at most this often (seconds)."""

FRAME_COSTS: Final[dict[type, float]] = {
    frames.Request: 1.0,
    frames.ListResources: 5.0,  # serializes an entry per known resource
    frames.Subscribe: 0.5,
    frames.Unsubscribe: 0.25,
    frames.Ping: 0.1,
    frames.Watch: 5.0,  # a snapshot of the catalogue, like a list
}
"""What each client frame takes from its connection's token bucket (`[limits] rate` and
`burst` are in these units): every frame type is rate limited, by what it costs."""
REPEAT_COST: Final = 0.1
"""What a `pmax` repeat takes from its connection's token bucket (as much as a ping): the
frames a client makes the gateway generate count toward its rate; with the bucket empty,
a repeat is skipped (the client has the value already)."""
UNPARSABLE_COST: Final = 1.0
"""A frame that does not parse costs as much as a request: it is answered for nothing."""
HELD_FRAMES_MAX: Final = 32
"""Frames a connection may send while one of its subscriptions waits for its host name to
resolve. They wait, in order, so that replies keep the order of their frames."""
ACCEPT_EXHAUSTED: Final = "socket.accept() out of system resource"
"""asyncio's report of an accept() that failed for want of descriptors (or memory)."""
OPEN_AFTER_START: Final = 16
"""Descriptors open after start, where /proc cannot count them (11 measured on Linux)."""
LOOKUP_TIMEOUT: Final = 5.0
"""Seconds a host name may take to resolve before the frame fails with `upstream_error`."""


def _accept_exhausted(context: dict[str, Any]) -> str:
    """What asyncio's report of a failed accept() means, said once per interval."""
    exc = context.get("exception")
    why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    open_now = open_descriptors()  # None when not even /proc/self/fd can be opened
    in_use = f"{open_now} open" if open_now is not None else "all in use"
    return (f"cannot accept connections: {why} (open-files limit {limit}, {in_use}); "
            f"accepting again in {ACCEPT_RETRY_DELAY:g} s, new clients "
            "wait meanwhile")


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
    """CoAP requests in flight."""
    lookups: set[asyncio.Task[None]] = field(default_factory=set)
    """Subscriptions waiting for their host name to be resolved (one at a time)."""
    lists: set[asyncio.Task[None]] = field(default_factory=set)
    """`list` frames being answered."""
    held: deque[str | bytes] | None = None
    """While a lookup runs: the frames that arrived after it, to be handled in order."""
    held_bytes: int = 0

    @property
    def tasks(self) -> set[asyncio.Task[None]]:
        return self.requests | self.lookups | self.lists

    @property
    def in_flight(self) -> int:
        """Work in flight for this connection: requests, lookups and lists, together at most
        `[limits] max_inflight`."""
        return len(self.requests) + len(self.lookups) + len(self.lists)

    def track(self, task: asyncio.Task[None], into: set[asyncio.Task[None]]) -> None:
        into.add(task)
        task.add_done_callback(into.discard)


class Gateway:
    """The running gateway: `await start()`, then `await stop()`."""

    def __init__(self, config: GatewayConfig) -> None:
        check_installed(config)
        self.config = config
        self._no_dtls = dtls_missing()
        """Why a client's ``coaps://`` URI cannot be served (the DTLS extra is optional)."""
        self.policy = policy_for(config)
        sub_for: Callable[[str], str] | None = None
        if config.cluster.enabled:
            from translator.cluster.names import cluster_sub

            sub_for = cluster_sub
        self.hub: Hub[Connection] = Hub(
            linger=config.server.linger,
            max_subscriptions=config.limits.max_subscriptions,
            sensors={s.name: s.uri for s in config.sensors},
            pinned=[s.uri for s in config.sensors if s.observe],
            max_upstream_bytes=config.limits.max_upstream_bytes,
            max_observations=config.limits.max_observations,
            max_idle_bytes=config.limits.max_idle_bytes,
            history=History(size=config.history.size, max_bytes=config.history.max_bytes),
            sub_for=sub_for,
            min_pmax=config.limits.min_pmax,
        )
        self.coap = CoapSide(
            self,
            config.supervision,
            max_representation=config.limits.max_upstream_bytes,
            credentials=client_credentials(config.credentials),
            receive_buffer=config.coap.receive_buffer,
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
                server_names=config.server.server_names,
                max_connections=limits.max_connections,
                max_connections_per_ip=limits.max_connections_per_ip,
                backlog=config.server.backlog,
                deflate=DeflateSettings(
                    context_takeover=config.server.deflate_context_takeover,
                    window_bits=config.server.deflate_window_bits,
                    memory_level=config.server.deflate_memory_level,
                ) if config.server.compression == "deflate" else None,
            ),
            gatekeeper=self,
            operations=self,
        )
        self.tokens = TokenStore.from_config(
            config.auth, sensors=self.hub.sensor_uris, env=os.environ
        )
        self._sessions: dict[Connection, Session] = {}
        self.coap_ws = CoapWsProxy(self)
        """The RFC 8323 endpoint's peers (`/.well-known/coap`)."""
        self._lingers: dict[str, asyncio.TimerHandle] = {}
        self._wake: asyncio.TimerHandle | None = None
        """The one timer of all conditional subscriptions (`Hub.wake`)."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._discovered_at: float | None = None
        self._discovery: asyncio.Task[None] | None = None
        self._stopping = False
        self._started = False
        self.registry = Registry(config, self.hub, self.coap, self._execute, self._spawn)
        """Resources that registered themselves (the RD), and who watches the catalogue."""
        self.budget: Budget | None = None
        """The clients the open-files limit allows, once started."""
        # Where observations go and the CoAP side's answers are numbered: this gateway's own
        # hub, or in a cluster the node that shares them over NATS (translator/cluster/).
        # The Resource Directory stays per node: what registered here is catalogued here,
        # and observed through the cluster like any URI (docs/cluster.md).
        self._watch = self.coap.start_observation
        self._unwatch = self.coap.stop_observation
        self._upstream_hub: Hub[Any] = self.hub
        self._upstream_execute: Callable[[list[Command[Any]]], None] = self._execute
        self.cluster: ClusterNode | None = None
        if config.cluster.enabled:
            from translator.cluster.node import ClusterNode

            self.cluster = ClusterNode(
                config, local=self.hub, deliver=self._execute, upstream=self.coap,
                represent=self._represent,
            )
            self._watch, self._unwatch = self.cluster.watch, self.cluster.unwatch
            self._upstream_hub = self.cluster.owner_hub
            self._upstream_execute = self.cluster.execute_owned
        # After the cluster: prometheus-client collects once when the collector registers.
        self.metrics_registry = GatewayMetrics(self)
        address = config.metrics.address
        self.metrics_port = None if address is None else MetricsPort(
            *address, host_names(address[0], config.server.server_names), self
        )
        """`[metrics] listen`: the operator's endpoints on an address of their own."""

    @property
    def url(self) -> str:
        return self.ws.url

    @property
    def upstream_hub(self) -> Hub[Any]:
        """The hub the CoAP side's answers go to: this gateway's own, or in a cluster the
        one of what this node observes for every node."""
        return self._upstream_hub

    @property
    def coap_ws_url(self) -> str:
        """The RFC 8323 endpoint beside `url`: CoAP over WebSockets, subprotocol ``coap``."""
        return self.ws.url.removesuffix(WS_PATH) + COAP_WS_PATH

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
        files = raise_open_files_limit()
        log.info("open files: %s", files.describe())
        loop = asyncio.get_running_loop()
        limit_loop_exceptions(loop, explained={ACCEPT_EXHAUSTED: _accept_exhausted})
        compat.accept_backoff(loop)
        if self.metrics_port is not None:  # first: nothing else to undo when it fails
            try:
                await self.metrics_port.start()
            except OSError as exc:
                raise ConfigError("metrics.listen", f"cannot listen on "
                                  f"{self.config.metrics.listen}: {exc.strerror or exc}") from None
            log.info("metrics at %s", self.metrics_port.url)
        await self.coap.start()
        if self.cluster is not None:
            await self.cluster.start()
        await self.registry.start()
        await self.ws.start()
        log.info("CoAP over WebSockets (RFC 8323) at %s", self.coap_ws_url)
        self.budget = self._client_budget(files.soft)
        self.ws.limit_connections(self.budget.clients, self.budget.sockets)
        if self.budget.limited_by_files:
            log.warning("clients: %s", self.budget.describe())
        else:
            log.info("clients: %s", self.budget.describe())
        self._started = True
        self._execute(self.hub.startup())
        if self.config.sensors:
            self._discovery = self._spawn(self._discover(), "discovery")

    def _client_budget(self, limit: int) -> Budget:
        """The clients the open-files limit allows besides what is open now (budget.py)."""
        config = self.config
        open_now = open_descriptors()
        return client_budget(
            limit,
            config.limits.max_connections,
            open_now=open_now if open_now is not None else OPEN_AFTER_START,
            lookup_workers=default_lookup_workers(),
            dtls_sensors=sum(s.uri.startswith("coaps://") for s in config.sensors),
            oscore_contexts=sum(c.kind == "oscore" for c in config.credentials),
            dtls_possible=any(c.kind == "dtls" for c in config.credentials),
        )

    async def stop(self) -> None:
        """Deregister upstream observations, close WebSockets with 1001, stop everything.

        Nothing that happens while stopping (a client going away) arms a linger timer or
        starts an observation.
        """
        self._stopping = True
        for handle in self._lingers.values():
            handle.cancel()
        self._lingers.clear()
        self._arm_wake(None)
        # The deregistrations go out first (they are what the sensors see); the clients are
        # closed while the sensors answer, so that a silent sensor and a stalled client cost
        # their timeouts side by side, within the CLI's 5 s.
        for uri in self.coap.observed:
            self.coap.stop_observation(uri)
        await self.ws.stop()
        for task in list(self._tasks):
            task.cancel()
        for session in self._sessions.values():
            for task in session.tasks:
                task.cancel()
        pending = [*self._tasks, *(t for s in self._sessions.values() for t in s.tasks)]
        if pending:
            await asyncio.wait(pending, timeout=2)
        if self.cluster is not None:
            await self.cluster.stop()
        await self.registry.stop()
        await self.coap.shutdown()
        if self.metrics_port is not None:
            await self.metrics_port.stop()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- commands from the hub ---------------------------------------------------------------

    def _execute(self, commands: list[Command[Connection]]) -> None:
        for command in commands:
            if self._stopping and isinstance(command, StartObservation | StartLinger):
                continue
            if isinstance(command, Repeat):
                # Only WebSocket sessions hold conditional subscriptions (never a CoAP peer).
                fan_out(self._within_rate(command.targets), command.text, command.replaces)
            elif isinstance(command, Deliver):
                targets: Sequence[Connection] = command.targets
                if self.coap_ws.peers:  # CoAP-over-WebSocket peers get CoAP messages
                    targets = self.coap_ws.take_deliveries(command)
                # Frame once, send to many: the same bytes go to every target.
                fan_out(targets, command.text, command.replaces, command.meta)
            elif isinstance(command, Wake):
                self._arm_wake(None if self._stopping else command.at)
            elif isinstance(command, StartObservation):
                self._cancel_linger(command.uri)
                self._watch(command.uri)
            elif isinstance(command, StopObservation):
                self._cancel_linger(command.uri)
                self._unwatch(command.uri)
                self.coap_ws.forget(command.uri)
            elif isinstance(command, StartLinger):
                self._cancel_linger(command.uri)
                self._lingers[command.uri] = asyncio.get_running_loop().call_later(
                    command.delay, self._linger_expired, command.uri, command.generation
                )

    def _arm_wake(self, at: float | None) -> None:
        if self._wake is not None:
            self._wake.cancel()
            self._wake = None
        if at is not None:
            delay = max(0.0, at - self.hub.monotonic())
            self._wake = asyncio.get_running_loop().call_later(delay, self._woken)

    def _woken(self) -> None:
        self._wake = None
        self._execute(self.hub.wake())

    def _within_rate(self, targets: tuple[Connection, ...]) -> list[Connection]:
        """The connections whose rate budget still has room for a `pmax` repeat."""
        sessions = self._sessions
        return [
            conn for conn in targets
            if (session := sessions.get(conn)) is not None
            and session.bucket.take(min(REPEAT_COST, session.bucket.burst))
        ]

    def _cancel_linger(self, uri: str) -> None:
        handle = self._lingers.pop(uri, None)
        if handle is not None:
            handle.cancel()

    def _linger_expired(self, uri: str, generation: int) -> None:
        self._lingers.pop(uri, None)
        self._execute(self.hub.linger_expired(uri, generation))

    # -- the CoAP side's events (ObservationListener) ----------------------------------------

    def registering(self, uri: str) -> None:
        self._upstream_execute(self._upstream_hub.upstream_registering(uri))

    def answer(self, uri: str, answer: CoapAnswer) -> None:
        hub, code, cf = self._upstream_hub, answer.code, answer.cf
        if self.cluster is None:
            self.coap_ws.upstream_answer(uri, answer)
        # (In a cluster the RFC 8323 endpoint of every node, this one included, hears of
        # the representation with the relayed notify: `_represent`.)
        age, observe = answer.max_age, answer.observable
        if answer.broken is not None:
            commands = hub.upstream_unusable(
                uri, answer.broken, code=code, cf=cf, max_age=age, observe=observe
            )
        elif answer.too_large is not None:
            commands = hub.upstream_too_large(
                uri, answer.too_large, code=code, cf=cf, max_age=age, observe=observe
            )
        else:
            commands = hub.upstream_response(
                uri, code=code, cf=cf, payload=answer.payload, max_age=age, observe=observe
            )
        if self.cluster is None:
            self._execute(commands)
        else:
            dropped = answer.broken is not None or answer.too_large is not None
            self.cluster.execute_owned(commands, answer.payload, dropped)

    def _represent(self, uri: str, published: Published) -> None:
        """A cluster's notify of `uri` with the sensor's representation (from the owner of
        the resource, maybe this node): the RFC 8323 endpoint keeps it, as it keeps an
        answer of this node's own observation."""
        frame = json.loads(published.text)
        payload = published.payload
        assert payload is not None
        broken = str(frame.get("decode_error") or "dropped") if published.dropped else None
        self.coap_ws.upstream_answer(uri, CoapAnswer(
            code=frame["code"], cf=frame.get("cf"), payload=payload,
            max_age=frame.get("max_age"), observe=None, broken=broken,
        ))

    def unchanged(self, uri: str) -> None:
        self._upstream_execute(self._upstream_hub.upstream_unchanged(uri))

    def stale(self, uri: str, reason: str) -> None:
        self._upstream_execute(self._upstream_hub.upstream_stale(uri, reason))

    def failed(self, uri: str, reason: str) -> None:
        self._upstream_execute(self._upstream_hub.upstream_failed(uri, reason))

    # -- the WebSocket side's events (MessageHandler) ----------------------------------------

    def admit(
        self, path: str, headers: Headers, remote_ip: str
    ) -> Refusal | Principal | CoapWsGrant:
        """The handshake's authentication (Gatekeeper): who the client is, or HTTP 401."""
        if not self.authenticating:
            return self._grant(path, ANONYMOUS)
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
        return self._grant(path, principal)

    @staticmethod
    def _grant(path: str, principal: Principal) -> Principal | CoapWsGrant:
        """The RFC 8323 endpoint's connections are told apart by their grant."""
        if path.partition("?")[0] == COAP_WS_PATH:
            return CoapWsGrant(principal)
        return principal

    # -- the operator's endpoints (Operations) ----------------------------------------------

    def ready(self) -> bool:
        return self._started and not self._stopping

    def degraded(self) -> str | None:
        return None if self.cluster is None else self.cluster.problem

    def metrics(self, authorization: str | None) -> Answer:
        """Prometheus metrics; with tokens configured, for a token with the `metrics` scope
        only (none or an unknown one: 401, another scope: 403)."""
        if self.authenticating:
            principal = self.tokens.authenticate(authorization, "")
            if principal is None:
                return text_answer(
                    http.HTTPStatus.UNAUTHORIZED, "a token with the 'metrics' scope is needed\n",
                    headers=(("WWW-Authenticate", 'Bearer realm="coap-ws-gateway"'),),
                )
            if not principal.can("metrics"):
                return text_answer(
                    http.HTTPStatus.FORBIDDEN, f"{principal.name!r} lacks the 'metrics' scope\n"
                )
        return text_answer(
            http.HTTPStatus.OK, self.metrics_registry.exposition().decode(), METRICS_CONTENT_TYPE
        )

    def connected(self, conn: Connection) -> None:
        grant = conn.grant
        principal = (
            grant.principal if isinstance(grant, CoapWsGrant)
            else grant if isinstance(grant, Principal) else ANONYMOUS
        )
        limits = self.config.limits
        session = Session(conn, principal, TokenBucket(limits.rate, limits.burst))
        self._sessions[conn] = session
        self.hub.connect(conn)
        if isinstance(grant, CoapWsGrant):
            self.coap_ws.connected(session)

    def disconnected(self, conn: Connection) -> None:
        session = self._sessions.pop(conn, None)
        if session is not None:
            for task in session.tasks:
                task.cancel()
        self.coap_ws.disconnected(conn)
        self.registry.forget(conn)
        self._execute(self.hub.disconnect(conn))

    def received(self, conn: Connection, message: str | bytes) -> None:
        if conn in self.coap_ws.peers:
            self.coap_ws.received(conn, message)
            return
        session = self._sessions.get(conn)
        if session is None:
            return
        if session.held is not None:
            self._hold(session, message)
        else:
            self._handle(session, message)

    def _handle(self, session: Session, message: str | bytes) -> None:
        conn = session.conn
        try:
            try:
                frame = parse_client_frame(message, conn.cbor)
            except FrameError:
                if not session.bucket.take(UNPARSABLE_COST):
                    raise self._rate_limited(session, None) from None
                raise
            # A cost above the bucket's size could never be paid: it takes the whole bucket.
            if not session.bucket.take(min(FRAME_COSTS[type(frame)], session.bucket.burst)):
                raise self._rate_limited(session, frame.id)
            self._dispatch(session, frame)
        except FrameError as exc:
            conn.send(exc.to_frame().serialize())
        except Exception:  # never let one frame take the connection or the gateway down
            log.exception("%r: internal error handling a frame", conn)
            conn.send(frames.ErrorFrame(None, "internal_error", "internal error").serialize())

    def _rate_limited(self, session: Session, frame_id: FrameId) -> FrameError:
        return FrameError(
            frames.RATE_LIMITED,
            f"more than {self.config.limits.rate:g} requests per second (or their cost in "
            f"other frames); retry in {session.bucket.retry_after():.2f} s",
            frame_id,
        )

    def _hold(self, session: Session, message: str | bytes) -> None:
        """Keep a frame until the lookup ahead of it is done; refuse it past the bound."""
        assert session.held is not None
        if (
            len(session.held) >= HELD_FRAMES_MAX
            or session.held_bytes + len(message) > self.config.limits.max_frame_bytes
        ):
            frame_id: FrameId = None
            with contextlib.suppress(FrameError):
                frame_id = parse_client_frame(message, session.conn.cbor).id
            session.conn.send(frames.ErrorFrame(
                frame_id, frames.LIMIT,
                f"at most {HELD_FRAMES_MAX} frames may wait behind a host-name lookup",
            ).serialize())
            return
        session.held.append(message)
        session.held_bytes += len(message)

    def _release(self, session: Session) -> None:
        """A lookup is done: handle the frames held behind it, in order, until one of them
        starts another lookup (the rest then wait behind that one)."""
        if self._sessions.get(session.conn) is not session or session.held is None:
            return
        held, session.held, session.held_bytes = session.held, None, 0
        while held:
            self._handle(session, held.popleft())
            if session.held is not None:
                session.held.extend(held)
                session.held_bytes = sum(len(m) for m in held)
                return

    def _require_room(self, session: Session, frame_id: FrameId) -> None:
        limit = self.config.limits.max_inflight
        if session.in_flight >= limit:
            raise FrameError(
                frames.LIMIT,
                f"at most {limit} requests, lookups and lists in flight per connection",
                frame_id,
            )

    def _dispatch(self, session: Session, frame: frames.ClientFrame) -> None:
        conn = session.conn
        match frame:
            case frames.Subscribe():
                decision = self._target(session, frame.uri, frame.name, READ, frame.id)
                uri = str(decision.uri)
                resumes = self._resumes_from_cluster(uri, frame)
                if decision.needs_resolution or resumes:
                    self._require_room(session, frame.id)
                    task = asyncio.create_task(
                        self._answering(
                            conn, frame.id, self._subscribe_later(session, decision, frame)
                        ),
                        name=f"subscribe {uri} for #{conn.id}",
                    )
                    session.track(task, session.lookups)
                    # Later frames wait for it, so that their replies stay in frame order
                    # (and nothing of the subscription goes before its `subscribed`).
                    session.held = deque()
                    task.add_done_callback(lambda _: self._release(session))
                else:
                    self._subscribe(conn, uri, frame)
            case frames.Unsubscribe():
                self._execute(self.hub.unsubscribe(conn, frame.sub, frame.id))
                conn.forget_compact(frame.sub)
            case frames.Request():
                self._start_request(session, frame)
            case frames.ListResources():
                self._require(session.principal, READ, frame.id)
                self._require_room(session, frame.id)
                session.track(
                    asyncio.create_task(
                        self._answering(conn, frame.id, self._list(session, frame.id)),
                        name=f"list for #{conn.id}",
                    ),
                    session.lists,
                )
            case frames.Ping():
                conn.send(frames.Pong(frame.id).serialize())
            case frames.Watch():
                self._require(session.principal, READ, frame.id)
                visible = self._visible(session.principal)
                configured = [
                    {"name": s.name, "uri": s.uri, "ep": None, "source": "config"}
                    for s in self.config.sensors if visible(s.uri)
                ]
                principal = session.principal
                self.registry.watch(
                    conn, frame.id,
                    lambda uri: principal.allows(uri, self.hub.sensor_uris), configured,
                )

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
            found = self.hub.uri_for_name(name) or self.registry.uri_for_name(name)
            # A name this token may not reach gets the same answer as an unknown one, so that
            # a narrowed token can neither enumerate names nor learn their URIs.
            if found is None or not principal.allows(found, self.hub.sensor_uris):
                raise FrameError(
                    frames.NOT_FOUND, f"no sensor named {name!r}{self._nearest(name, principal)}",
                    frame_id,
                )
            uri_text = found
        assert uri_text is not None
        try:
            uri = parse_coap_uri(uri_text)
        except UriError as exc:
            raise FrameError(frames.BAD_REQUEST, str(exc), frame_id) from None
        decision = self.policy.decide(uri)
        if not decision.allowed and self.registry.catalogued(str(uri)):
            # A registered resource passed the directory's rules when it joined (an IP
            # literal, never multicast or broadcast, from an allowed registrant).
            decision = Decision(uri, True, False, "")
        if not decision.allowed:
            raise FrameError(frames.FORBIDDEN, decision.reason, frame_id)
        if not principal.allows(uri, self.hub.sensor_uris):
            # The client wrote this URI itself: naming it reveals nothing.
            raise FrameError(
                frames.FORBIDDEN,
                f"{uri} is not allowed for {principal.name!r}: the token's allow list does not "
                "cover it",
                frame_id,
            )
        if uri.scheme == "coaps" and self._no_dtls is not None:
            raise FrameError(frames.UNSUPPORTED, self._no_dtls, frame_id)
        if decision.needs_resolution and str(uri) in self.policy.sensor_uris:
            # A configured sensor's host was named by the operator, not by a client.
            return dataclasses.replace(decision, needs_resolution=False)
        return decision

    def _nearest(self, name: str, principal: Principal) -> str:
        """A hint naming the configured sensors closest to `name` that `principal` may reach
        (never one it may not: that would let a narrowed token enumerate names)."""
        sensors = self.hub.sensor_uris
        names = {**self.registry.catalog.names, **sensors}
        reachable = [n for n, uri in names.items() if principal.allows(uri, sensors)]
        close = difflib.get_close_matches(name, reachable, n=3)
        return f" (did you mean {', '.join(map(repr, close))}?)" if close else ""

    async def _check_addresses(
        self, principal: Principal, decision: Decision, frame_id: FrameId
    ) -> None:
        """Resolve a host name and apply the policy, and the token's own patterns, to what it
        resolves to: a name must not smuggle a multicast, broadcast or unspecified
        destination, or an address outside the address patterns, past either."""
        uri = decision.uri
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                infos = await asyncio.get_running_loop().getaddrinfo(
                    uri.host, uri.port, type=socket.SOCK_DGRAM
                )
        except TimeoutError:
            raise FrameError(
                frames.UPSTREAM_ERROR,
                f"cannot resolve {uri.host!r}: no answer within {LOOKUP_TIMEOUT:g} s",
                frame_id,
            ) from None
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

    async def _subscribe_later(
        self, session: Session, decision: Decision, frame: frames.Subscribe
    ) -> None:
        """A subscribe that waits: for its host name to resolve within the address rules,
        and, when it resumes (`since`) what this node's history cannot answer, for the
        frames its cluster's stream keeps, read into the hub's history so that the hub
        replays from them. Without them (NATS unreachable, too slow) it is answered as any
        other subscribe, with the latest value."""
        if decision.needs_resolution:
            await self._check_addresses(session.principal, decision, frame.id)
        uri = str(decision.uri)
        kept = None
        if self.cluster is not None and self._resumes_from_cluster(uri, frame):
            kept = await self.cluster.retained(uri)
            if kept:
                self.hub.preload(uri, [(p.text, p.cbor_value) for p in kept])
        self._subscribe(session.conn, uri, frame)
        if kept and self.cluster is not None:
            self.cluster.resumed(uri)

    def _resumes_from_cluster(self, uri: str, frame: frames.Subscribe) -> bool:
        """A subscribe that resumes (`since`) what this node's history cannot answer but its
        cluster's stream may: the resource was numbered elsewhere (docs/cluster.md)."""
        return (
            self.cluster is not None and frame.since is not None and frame.cond is None
            and self.hub.wants_history(uri, frame.since)
        )

    def _subscribe(self, conn: Connection, uri: str, frame: frames.Subscribe) -> None:
        commands = self.hub.subscribe(conn, uri, frame.id, frame.since, frame.cond)
        resource = self.hub.resource(uri)
        if resource is not None:
            # Before the commands run: the cached notify among them is the complete first.
            if frame.compact:
                conn.want_compact(resource.sub)
            else:
                conn.forget_compact(resource.sub)
        self._execute(commands)

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
        decision = self._target(
            session, frame.uri, frame.name, scope_for_method(frame.method), frame.id
        )
        self._require_room(session, frame.id)
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
        session.track(task, session.requests)

    async def _request(
        self, session: Session, frame: frames.Request, decision: Decision, payload: bytes
    ) -> None:
        conn = session.conn
        uri = str(decision.uri)
        started = time.monotonic()
        reply: frames.Response | frames.ErrorFrame
        cbor_reply: bytes | None = None
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
            if conn.cbor:
                # A CBOR client gets a CBOR value as the sensor's own data item.
                raw = cbor_data_item(answer.cf, answer.payload, body, advertised)
                if raw is not None:
                    cbor_reply = to_cbor(reply.serialize(), raw)
        outcome = (
            f"{reply.code[0]}.xx" if isinstance(reply, frames.Response) else reply.error
        )
        self.metrics_registry.request_done(frame.method, outcome, time.monotonic() - started)
        conn.send(reply.serialize() if cbor_reply is None else cbor_reply)

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
        visible = self._visible(principal)
        entries = self.hub.list_entries(lambda uri: uri in own or visible(uri))
        entries = self.registry.annotate(entries, visible)
        conn.send(frames.Resources(frame_id, tuple(entries)).serialize())

    def _visible(self, principal: Principal) -> Callable[[str], bool]:
        """Whether a catalogued resource is shown to `principal`: configured, discovered at
        a configured sensor's host, or registered, as far as the policy (registered ones
        passed the directory's rules instead) and the token allow."""
        def visible(uri: str) -> bool:
            registered = self.registry.catalogued(uri)
            return (
                (registered or (self.hub.catalogued(uri) and self.policy.allows(uri)))
                and principal.allows(uri, self.hub.sensor_uris)
            )
        return visible
