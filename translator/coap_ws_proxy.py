"""The RFC 8323 endpoint's wiring: CoAP-over-WebSocket clients as peers of the JSON ones.

A connection on `/.well-known/coap` (subprotocol ``coap``) is a `Session` like any other:
the same token and scopes, the same policy checks (`Gateway._target`, `_check_addresses`),
the same rate limit, in-flight budget and subscription bounds. What differs is the wire:
`core.coap_ws.CoapWsProtocol` reads and writes CoAP messages, and this module turns its
events into the gateway's operations:

    protocol event         what happens
    ---------------------  -----------------------------------------------------------------
    Forward                policy + scope, then `CoapSide.request`; the answer (or the error
                           as a CoAP code, `COAP_CODES`) goes back with the client's token
    Register               policy + `read` scope, then `Hub.subscribe`: the connection
                           joins the one upstream observation of the resource, shared with
                           every JSON client of it
    Deregister             the token's observation ends (`Hub.unsubscribe` with its last
                           token on the URI); the GET is answered from the latest value
    Released               every observation ends; the WebSocket closes once the requests
                           in flight are answered
    disconnect / Abort     `Hub.disconnect`, as for a JSON client: nothing lingers

Notifications: the hub hands a CoAP peer the same `Deliver` commands as a JSON client
(`take_deliveries` picks them out before the JSON fan-out). A notify frame says which update
of which resource it is; the payload sent is the sensor's own bytes with its Content-Format
(kept per observed resource in `representations`, since the JSON frame holds a decoded
value), with the hub's `seq` as Observe. A status `offline` ends the observations with an
error code (RFC 7641 §3.2: a non-2.xx notification ends an observation).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from translator.auth import READ, Principal, scope_for_method
from translator.coap.side import CoapAnswer, UpstreamError
from translator.core import frames
from translator.core.coap_ws import (
    Close,
    CoapWsProtocol,
    Deregister,
    Event,
    Forward,
    PongReply,
    Refused,
    Register,
    Released,
    RequestRefused,
    Send,
    code_of,
    dotted,
)
from translator.core.frames import FrameError
from translator.core.hub import Deliver
from translator.core.policy import Decision
from translator.web.server import Connection

if TYPE_CHECKING:
    from translator.gateway import Gateway, Session

log = logging.getLogger(__name__)

COAP_CODES: Final[dict[str, str]] = {
    frames.BAD_REQUEST: "4.00",
    frames.FORBIDDEN: "4.03",
    frames.NOT_FOUND: "4.04",
    frames.RATE_LIMITED: "4.29",  # RFC 8516 Too Many Requests
    frames.UPSTREAM_ERROR: "5.02",
    frames.LIMIT: "5.03",
    frames.TIMEOUT: "5.04",
    frames.UNSUPPORTED: "5.05",  # coaps:// without the DTLS extra: Proxying Not Supported
}
"""The CoAP response code of each protocol error code (the JSON side's `error` field)."""
OFFLINE_CODE: Final = "5.02"
"""What ends an observation whose sensor went offline without an error code of its own."""

COSTS: Final[dict[type, float]] = {
    Forward: 1.0, Refused: 1.0, Register: 0.5, Deregister: 0.5, PongReply: 0.1,
}
"""What each request takes from the connection's token bucket, as the JSON frames do
(`request` 1, `subscribe` 0.5, `ping` 0.1; a request the protocol refuses by itself, such
as 4.02, as much as one forwarded). A Ping past the limit gets no Pong (signaling has no
error answer). Other signaling costs nothing: it does no work beyond its parsing."""


@dataclass(frozen=True, slots=True)
class CoapWsGrant:
    """What the handshake on the RFC 8323 path grants: who the client is, and that it speaks
    CoAP rather than JSON frames (`Connection.grant`)."""

    principal: Principal


@dataclass(eq=False, slots=True)
class Peer:
    """One RFC 8323 connection: the gateway's session for it and its protocol state."""

    session: Session
    protocol: CoapWsProtocol

    @property
    def conn(self) -> Connection:
        return self.session.conn


class CoapWsProxy:
    """The RFC 8323 peers of one gateway and the representations their notifications carry."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.peers: dict[Connection, Peer] = {}
        self.representations: dict[str, CoapAnswer] = {}
        """The latest 2.xx answer of each observed resource, as the sensor sent it: what a
        notification carries. Dropped when the observation stops (`forget`)."""

    # -- connections --------------------------------------------------------------------------

    def connected(self, session: Session) -> None:
        limits = self.gateway.config.limits
        protocol = CoapWsProtocol(
            max_message_size=limits.max_frame_bytes,
            max_observations=limits.max_subscriptions,
        )
        self.peers[session.conn] = Peer(session, protocol)
        session.conn.send(protocol.csm())

    def disconnected(self, conn: Connection) -> None:
        self.peers.pop(conn, None)

    def received(self, conn: Connection, message: str | bytes) -> None:
        peer = self.peers.get(conn)
        if peer is None:
            return
        try:
            events = peer.protocol.receive(message)
        except Exception:  # the protocol never raises on input; if it does, abort cleanly
            log.exception("%r: internal error reading a CoAP message", conn)
            events = peer.protocol.abort("internal error", 1011)
        for event in events:
            self._carry_out(peer, event)

    def _carry_out(self, peer: Peer, event: Event) -> None:
        conn = peer.conn
        if isinstance(event, Send):
            conn.send(event.data)
            return
        if isinstance(event, Close):
            conn.close(event.code, event.reason)
            return
        if isinstance(event, Released):
            self._release(peer)
            return
        bucket = peer.session.bucket
        if isinstance(event, PongReply):
            if bucket.take(COSTS[PongReply]):
                conn.send(event.data)
            return
        token = event.token
        try:
            try:
                if not bucket.take(min(COSTS[type(event)], bucket.burst)):
                    raise self.gateway._rate_limited(peer.session, None)
                if isinstance(event, Refused):
                    conn.send(event.data)
                elif isinstance(event, Forward):
                    self._forward(peer, event)
                elif isinstance(event, Register):
                    self._register(peer, event)
                else:
                    self._deregister(peer, event)  # the events left: a request to answer
            except RequestRefused as refused:
                conn.send(peer.protocol.error(token, dotted(refused.code), refused.text))
            except FrameError as exc:
                conn.send(self._error(peer, token, exc))
        except Exception:  # never let one request take the connection or the gateway down
            log.exception("%r: internal error handling a CoAP request", conn)
            conn.send(peer.protocol.error(token, "5.00", "internal error"))

    def _error(self, peer: Peer, token: bytes, exc: FrameError) -> bytes:
        code = COAP_CODES.get(exc.code, "5.00")
        if exc.code == frames.RATE_LIMITED:
            # RFC 8516: Max-Age says when to retry.
            wait = math.ceil(peer.session.bucket.retry_after())
            return peer.protocol.response(token, code, payload=exc.message.encode(),
                                          max_age=wait)
        return peer.protocol.error(token, code, exc.message)

    # -- requests -----------------------------------------------------------------------------

    def _forward(self, peer: Peer, event: Forward) -> None:
        gateway, session = self.gateway, peer.session
        decision = gateway._target(session, event.uri, None, scope_for_method(event.method), None)
        gateway._require_room(session, None)
        task = asyncio.create_task(
            self._request(peer, event, decision),
            name=f"coap+ws {event.method} #{peer.conn.id} token {event.token.hex()}",
        )
        session.track(task, session.requests)
        task.add_done_callback(lambda _: self._close_if_released(peer))

    async def _request(self, peer: Peer, event: Forward, decision: Decision) -> None:
        gateway, protocol, token = self.gateway, peer.protocol, event.token
        uri = str(decision.uri)
        started = time.monotonic()
        outcome = "internal_error"
        try:
            try:
                if decision.needs_resolution:
                    await gateway._check_addresses(peer.session.principal, decision, None)
                answer = await gateway.coap.request(
                    event.method, uri, payload=event.payload, cf=event.cf, accept=event.accept,
                    timeout=frames.DEFAULT_REQUEST_TIMEOUT,
                )
            except FrameError as exc:
                outcome, reply = exc.code, self._error(peer, token, exc)
            except TimeoutError:
                outcome = frames.TIMEOUT
                reply = protocol.error(token, "5.04", f"no answer from {uri} within "
                                       f"{frames.DEFAULT_REQUEST_TIMEOUT:g} s")
            except UpstreamError as exc:
                outcome = frames.UPSTREAM_ERROR
                reply = protocol.error(token, "5.02", f"{uri}: {exc}")
            else:
                outcome = f"{answer.code[0]}.xx"
                reply = protocol.response(token, answer.code, cf=answer.cf,
                                          payload=answer.payload, max_age=answer.max_age)
        except Exception:
            log.exception("%r: internal error forwarding a CoAP request", peer.conn)
            reply = protocol.error(token, "5.00", "internal error")
        gateway.metrics_registry.request_done(event.method, outcome, time.monotonic() - started)
        peer.conn.send(reply)

    # -- observations -------------------------------------------------------------------------

    def _register(self, peer: Peer, event: Register) -> None:
        gateway, session = self.gateway, peer.session
        decision = gateway._target(session, event.uri, None, READ, None)
        if not decision.needs_resolution:
            self._subscribe(peer, event, str(decision.uri))
            return
        gateway._require_room(session, None)
        task = asyncio.create_task(
            self._subscribe_resolved(peer, event, decision),
            name=f"coap+ws resolve {decision.uri.host} for #{peer.conn.id}",
        )
        session.track(task, session.lookups)

    async def _subscribe_resolved(self, peer: Peer, event: Register, decision: Decision) -> None:
        try:
            await self.gateway._check_addresses(peer.session.principal, decision, None)
            if self.peers.get(peer.conn) is peer:
                self._subscribe(peer, event, str(decision.uri))
        except RequestRefused as refused:
            peer.conn.send(peer.protocol.error(event.token, dotted(refused.code), refused.text))
        except FrameError as exc:
            peer.conn.send(self._error(peer, event.token, exc))
        except Exception:
            log.exception("%r: internal error registering an observation", peer.conn)
            peer.conn.send(peer.protocol.error(event.token, "5.00", "internal error"))

    def _subscribe(self, peer: Peer, event: Register, uri: str) -> None:
        """Join the hub's observation of `uri`; the hub's answer (the latest value, or the
        first notification) reaches the token through `take_deliveries`."""
        gateway, protocol, conn = self.gateway, peer.protocol, peer.conn
        if peer.protocol.released:
            raise RequestRefused(code_of("5.03"), "the connection was released")
        left = protocol.observe(event.token, uri, event.accept)
        try:
            commands = gateway.hub.subscribe(conn, uri)
        except FrameError:
            left_too = protocol.end(event.token)
            if left_too is not None and left_too != uri:
                self._unsubscribe(peer, left_too)
            raise
        if left is not None:
            self._unsubscribe(peer, left)
        gateway._execute(commands)

    def _deregister(self, peer: Peer, event: Deregister) -> None:
        """End the observation (done by the protocol already), then answer the GET from the
        latest value, or by asking the sensor when there is none."""
        gateway = self.gateway
        if event.left is not None:
            self._unsubscribe(peer, event.left)
        decision = gateway._target(peer.session, event.uri, None, READ, None)
        latest = self.representations.get(str(decision.uri))
        if latest is not None and _usable(latest) and event.accept in (None, latest.cf):
            peer.conn.send(peer.protocol.response(
                event.token, latest.code, cf=latest.cf, payload=latest.payload,
                max_age=latest.max_age,
            ))
            return
        self._forward(peer, Forward(event.token, "GET", event.uri, b"", None, event.accept))

    def _unsubscribe(self, peer: Peer, uri: str) -> None:
        """Leave the hub's observation of `uri` (the connection's last token on it ended)."""
        gateway = self.gateway
        resource = gateway.hub.resource(uri)
        if resource is None or self.peers.get(peer.conn) is not peer:
            return
        try:
            commands = gateway.hub.unsubscribe(peer.conn, resource.sub)
        except FrameError:
            return  # not subscribed (any more)
        gateway._execute(commands)

    def _unsubscribe_later(self, peer: Peer, uri: str) -> None:
        """`_unsubscribe` once the hub's current commands are carried out (an ending found
        while delivering must not change the hub under the commands still to run)."""

        def unsubscribe() -> None:
            if uri not in peer.protocol.observed_uris:
                self._unsubscribe(peer, uri)

        asyncio.get_running_loop().call_soon(unsubscribe)

    def _release(self, peer: Peer) -> None:
        for uri in peer.protocol.end_all():
            self._unsubscribe(peer, uri)
        self._close_if_released(peer)

    def _close_if_released(self, peer: Peer) -> None:
        if peer.protocol.released and not peer.session.requests - {asyncio.current_task()}:
            peer.conn.close(1000, "released")

    # -- from the hub and the CoAP side -------------------------------------------------------

    def take_deliveries(self, command: Deliver[Connection]) -> Sequence[Connection]:
        """Carry out `command` for the CoAP peers among its targets; the rest, for the JSON
        fan-out."""
        peers = self.peers
        mine = [peers[t] for t in command.targets if t in peers]
        if not mine:
            return command.targets
        frame = json.loads(command.text)
        kind = frame.get("type")
        if kind == "notify":
            self._notify(mine, frame)
        elif kind == "status" and frame.get("state") == "offline":
            code = frame.get("code") or OFFLINE_CODE
            self._fail(mine, frame["uri"], code, frame.get("reason") or "the sensor is offline")
        return tuple(t for t in command.targets if t not in peers)

    def _notify(self, peers: list[Peer], frame: dict[str, object]) -> None:
        uri, seq = str(frame["uri"]), frame["seq"]
        assert isinstance(seq, int)
        latest = self.representations.get(uri)
        if latest is None:
            # A value cached from an earlier observation of the resource (the hub keeps
            # idle ones): its bytes are gone, and the observation's first answer follows.
            return
        if not _usable(latest):
            self._fail(peers, uri, "5.02", str(frame.get("decode_error")))
            return
        for peer in peers:
            for note in peer.protocol.notifications(
                uri, seq, latest.code, latest.cf, latest.payload, latest.max_age
            ):
                peer.conn.send(note.data, note.key)
            if uri not in peer.protocol.observed_uris:  # a 4.06 ended the last one
                self._unsubscribe_later(peer, uri)

    def _fail(self, peers: list[Peer], uri: str, code: str, text: str) -> None:
        for peer in peers:
            for data in peer.protocol.failure(uri, code, text):
                peer.conn.send(data)
            self._unsubscribe_later(peer, uri)

    def upstream_answer(self, uri: str, answer: CoapAnswer) -> None:
        """An answer on the observation of `uri` (before the hub hears of it). One that
        comes after the hub stopped the observation is not kept: nothing would drop it."""
        resource = self.gateway.hub.resource(uri)
        if answer.code.startswith("2.") and resource is not None and resource.observing:
            self.representations[uri] = answer

    def forget(self, uri: str) -> None:
        """The observation of `uri` stopped: its representation is no longer kept."""
        self.representations.pop(uri, None)


def _usable(answer: CoapAnswer) -> bool:
    return answer.too_large is None and answer.broken is None
