"""CoAP over WebSockets (RFC 8323) at /.well-known/coap: the codec and the protocol state
(pure), then end to end with a real gateway, real simulated sensors, a raw websockets client
speaking CoAP messages, and aiocoap's own coap+ws:// client."""

from __future__ import annotations

import asyncio
import base64
import itertools
import random
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiocoap
import cbor2
import pytest
import pytest_asyncio
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from translator.coap.side import CoapAnswer
from translator.core.coap_ws import (
    ABORT,
    ACCEPT,
    CONTENT_FORMAT,
    CSM,
    MAX_AGE,
    MAX_DIAGNOSTIC,
    MAX_MESSAGE_SIZE,
    OBSERVE,
    PING,
    PONG,
    PROXY_SCHEME,
    PROXY_URI,
    RELEASE,
    URI_HOST,
    URI_PATH,
    URI_PORT,
    URI_QUERY,
    Close,
    CoapWsProtocol,
    Deregister,
    Forward,
    Message,
    MessageError,
    PongReply,
    Refused,
    Register,
    Released,
    Send,
    code_of,
    diagnostic,
    dotted,
    uint,
)
from translator.gateway import Gateway
from translator.sim import SimulatedSensors

from .conftest import WAIT, Client, gateway_config, handshake_request

GET, POST, PUT = code_of("0.01"), code_of("0.02"), code_of("0.03")
CSM_BYTES = Message(CSM, b"", ((MAX_MESSAGE_SIZE, uint(65536)),)).serialize()


# -- the codec ------------------------------------------------------------------------------------


def test_a_message_round_trips_with_extended_option_deltas_and_lengths() -> None:
    long_uri = "coap://sensor.example/" + "x" * 300  # a length past 269: two extra bytes
    message = Message(
        GET, b"\x01\x02\x03",
        ((OBSERVE, b""), (URI_PATH, b"a"), (URI_PATH, b"b"), (PROXY_URI, long_uri.encode()),
         (300, b"\x07")),  # a delta past 269
        b"payload",
    )
    data = message.serialize()
    assert data[0] == 3 and data[1] == GET  # Len 0, TKL 3 (RFC 8323 §4.4)
    assert Message.parse(data) == message


def test_the_wire_form_is_rfc_8323_websocket_framing() -> None:
    # GET, token 0xbb05, Proxy-Uri "coap://h/x": what aiocoap's client sends.
    data = Message(GET, b"\xbb\x05", ((PROXY_URI, b"coap://h/x"),)).serialize()
    assert data == bytes.fromhex("0201bb05da16") + b"coap://h/x"


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"\x00", "at least 2 bytes"),
        (b"\x10\x01", "Len nibble must be 0"),
        (b"\x09\x01" + b"t" * 9, "token length 9 is reserved"),
        (b"\x04\x01ab", "ends inside its 4-byte token"),
        (b"\x00\x01\xf0", "delta nibble 15 is reserved"),
        (b"\x00\x01\x0f", "length nibble 15 is reserved"),
        (b"\x00\x01\xff", "must be followed by a payload"),
        (b"\x00\x01\xd0", "ends inside an extended option delta"),
        (b"\x00\x01\x35ab", "runs past the end"),
    ],
)
def test_bad_bytes_fail_parsing_with_the_reason(data: bytes, why: str) -> None:
    with pytest.raises(MessageError, match=why):
        Message.parse(data)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_parse_or_fail_with_message_error_and_round_trip(data: bytes) -> None:
    try:
        message = Message.parse(data)
    except MessageError:
        return
    assert Message.parse(message.serialize()) == message


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.binary(max_size=48), st.text(max_size=8)), max_size=6))
def test_any_sequence_of_messages_yields_events_never_an_exception(
    messages: list[bytes | str],
) -> None:
    for first in (CSM_BYTES, None):
        protocol = CoapWsProtocol(max_message_size=1024)
        for message in ([first] if first else []) + messages:
            events = protocol.receive(message)
            closes = [e for e in events if isinstance(e, Close)]
            assert not closes or events[-1] is closes[0]  # nothing after a Close


def test_well_formed_requests_with_random_options_are_answered_or_forwarded() -> None:
    rng = random.Random(15)
    for _ in range(2000):
        options = tuple(
            (rng.choice((1, 3, 4, 6, 7, 11, 12, 15, 17, 23, 35, 39, 60, 258, 2049)),
             rng.randbytes(rng.randrange(0, 6)))
            for _ in range(rng.randrange(0, 6))
        )
        code = rng.randrange(0, 32)
        events = started().receive(Message(code, b"tk", options, b"").serialize())
        assert all(isinstance(e, Refused | Forward | Register | Deregister) for e in events)
        for event in events:
            if isinstance(event, Refused):
                assert Message.parse(event.data).token == b"tk"


# -- the protocol state (pure) --------------------------------------------------------------------


def started(**kwargs: Any) -> CoapWsProtocol:
    protocol = CoapWsProtocol(max_message_size=65536, **kwargs)
    assert protocol.receive(CSM_BYTES) == []
    return protocol


def sent(events: list[Any]) -> list[Message]:
    return [Message.parse(e.data) for e in events if isinstance(e, Send | Refused)]


def request(code: int, token: bytes, *options: tuple[int, bytes], payload: bytes = b"") -> bytes:
    return Message(code, token, options, payload).serialize()


def test_the_server_csm_announces_the_frame_limit() -> None:
    csm = Message.parse(CoapWsProtocol(max_message_size=4096).csm())
    assert csm.code == CSM and csm.first(MAX_MESSAGE_SIZE) == uint(4096)


def test_the_first_message_must_be_a_csm() -> None:
    protocol = CoapWsProtocol(max_message_size=1024)
    events = protocol.receive(request(GET, b"t", (PROXY_URI, b"coap://h/x")))
    (abort,) = sent(events)
    assert abort.code == ABORT and b"first message must be a CSM" in abort.payload
    assert events[-1] == Close(1002, "the first message must be a CSM (7.01)")
    assert protocol.receive(CSM_BYTES) == []  # nothing after an Abort


def test_a_text_message_or_garbage_is_aborted_with_a_diagnostic() -> None:
    events = started().receive("GET /")
    assert sent(events)[0].code == ABORT and isinstance(events[-1], Close)
    assert events[-1].code == 1003
    events = started().receive(b"\x00\x01\xf0")
    (abort,) = sent(events)
    assert abort.payload == b"unparsable message: option delta nibble 15 is reserved"
    assert events[-1].code == 1002


def test_csm_with_an_unknown_critical_option_is_aborted_with_bad_csm_option() -> None:
    protocol = CoapWsProtocol(max_message_size=1024)
    (abort,) = sent(protocol.receive(Message(CSM, b"", ((9, b""),)).serialize()))
    assert abort.code == ABORT and abort.first(2) == uint(9)
    # An elective one is ignored, Max-Message-Size is taken.
    protocol = CoapWsProtocol(max_message_size=1024)
    assert protocol.receive(Message(CSM, b"", ((2, uint(2000)), (10, b"x"))).serialize()) == []
    assert protocol.peer_max_message_size == 2000


def test_ping_gets_a_pong_with_its_token_and_unknown_signals_abort() -> None:
    protocol = started()
    (reply,) = protocol.receive(Message(PING, b"\x42").serialize())
    assert isinstance(reply, PongReply)
    pong = Message.parse(reply.data)
    assert (pong.code, pong.token) == (PONG, b"\x42")
    assert protocol.receive(Message(PONG, b"\x43").serialize()) == []
    (abort,) = sent(protocol.receive(Message(code_of("7.09")).serialize()))
    assert abort.payload == b"unknown signaling code 7.09"


def test_release_stops_requests_and_abort_closes() -> None:
    protocol = started()
    assert protocol.receive(Message(RELEASE).serialize()) == [Released()]
    (refused,) = sent(protocol.receive(request(GET, b"t", (PROXY_URI, b"coap://h/x"))))
    assert dotted(refused.code) == "5.03"
    protocol = started()
    events = protocol.receive(Message(ABORT, b"", (), b"bye").serialize())
    assert events == [Close(1000, "aborted by the client: bye")]


def test_empty_messages_and_responses_from_the_client_are_ignored() -> None:
    protocol = started()
    assert protocol.receive(b"\x00\x00") == []
    assert protocol.receive(request(code_of("2.05"), b"t")) == []


def test_proxy_uri_and_proxy_scheme_name_the_target() -> None:
    protocol = started()
    (forward,) = protocol.receive(request(
        PUT, b"t", (PROXY_URI, b"coap://h:5683/led"), (CONTENT_FORMAT, uint(60)),
        (ACCEPT, uint(50)), payload=b"\xf5",
    ))
    assert forward == Forward(b"t", "PUT", "coap://h:5683/led", b"\xf5", 60, 50)
    (forward,) = protocol.receive(request(
        GET, b"u", (URI_HOST, b"10.0.0.7"), (URI_PORT, uint(5700)), (URI_PATH, b"a b"),
        (URI_PATH, b"t/x"), (URI_QUERY, b"q=1&2"), (URI_QUERY, b"r"), (PROXY_SCHEME, b"coap"),
    ))
    assert isinstance(forward, Forward)
    assert forward.uri == "coap://10.0.0.7:5700/a%20b/t%2Fx?q=1%262&r"
    (forward,) = protocol.receive(request(
        GET, b"v", (URI_HOST, b"[ff02::fd]"), (PROXY_SCHEME, b"coap"),
    ))
    assert isinstance(forward, Forward) and forward.uri == "coap://[ff02::fd]/"


@pytest.mark.parametrize(
    ("options", "code", "why"),
    [
        (((PROXY_URI, b"http://h/x"),), "5.05", "proxies only to coap and coaps"),
        (((PROXY_SCHEME, b"https"), (URI_HOST, b"h")), "5.05", "not 'https'"),
        (((URI_PATH, b"temperature"),), "4.04", "forward proxy"),
        (((PROXY_SCHEME, b"coap"), (URI_PATH, b"x")), "4.00", "needs Uri-Host"),
        (((PROXY_SCHEME, b"coap"), (URI_HOST, b"h@evil")), "4.00", "not a host name"),
        (((PROXY_URI, b"coap://h/x"), (1, b"etag")), "4.02", "critical option 1"),
        (((PROXY_URI, b"coap://h/x"), (CONTENT_FORMAT, b"\x01\x02\x03")), "4.02", "longer"),
        (((PROXY_URI, b"coap://h/x"), (PROXY_URI, b"coap://h/y")), "4.02", "must not repeat"),
        (((PROXY_URI, b"\xff"),), "4.02", "not UTF-8"),
        (((PROXY_URI, b"coap://h/x"), (23, uint(0x16))), "4.02", "Block2 with a block number"),
    ],
)
def test_requests_the_proxy_cannot_carry_are_answered_with_their_code(
    options: tuple[tuple[int, bytes], ...], code: str, why: str
) -> None:
    (answer,) = sent(started().receive(request(GET, b"tk", *options)))
    assert (dotted(answer.code), answer.token) == (code, b"tk")
    assert why in answer.payload.decode()


def test_a_long_diagnostic_is_cut_without_splitting_a_character() -> None:
    payload = diagnostic(code_of("4.00"), b"", "é" * 400).payload
    assert len(payload) == MAX_DIAGNOSTIC and payload.decode() == "é" * 256


def test_an_unknown_method_is_4_05_and_elective_options_are_ignored() -> None:
    protocol = started()
    (answer,) = sent(protocol.receive(request(code_of("0.09"), b"t")))
    assert dotted(answer.code) == "4.05"
    (forward,) = protocol.receive(request(GET, b"t", (PROXY_URI, b"coap://h/x"), (4, b"etag")))
    assert isinstance(forward, Forward)


def test_observe_registration_notifications_and_deregistration() -> None:
    protocol = started(max_observations=2)
    (register,) = protocol.receive(request(GET, b"a", (OBSERVE, b""), (PROXY_URI, b"coap://h/t")))
    assert register == Register(b"a", "coap://h/t", None)
    assert protocol.observe(b"a", "coap://h:5683/t") is None
    assert protocol.observe(b"b", "coap://h:5683/t") is None
    # Each token gets each update once, never an older one after a newer one.
    notes = protocol.notifications("coap://h:5683/t", 5, "2.05", 60, b"\x01", 30)
    assert [n.key for n in notes] == ["coap:61", "coap:62"]  # replaceable, one key per token
    first = [Message.parse(n.data) for n in notes]
    assert [(m.token, m.first(OBSERVE), m.first(MAX_AGE)) for m in first] == [
        (b"a", uint(5), uint(30)), (b"b", uint(5), uint(30))]
    assert protocol.notifications("coap://h:5683/t", 5, "2.05", 60, b"\x01", None) == []
    assert protocol.notifications("coap://h:5683/t", 4, "2.05", 60, b"\x00", None) == []
    # A re-registration gets the current value again.
    protocol.observe(b"a", "coap://h:5683/t")
    again = protocol.notifications("coap://h:5683/t", 5, "2.05", 60, b"\x01", None)
    assert [Message.parse(n.data).token for n in again] == [b"a"]
    # Past the bound: 5.03.
    with pytest.raises(Exception, match="at most 2 observations"):
        protocol.observe(b"c", "coap://h:5683/u")
    # Deregistration (Observe = 1): the last token of the URI says the URI is left.
    (dereg,) = protocol.receive(request(GET, b"a", (OBSERVE, uint(1)), (PROXY_URI, b"coap://h/t")))
    assert dereg == Deregister(b"a", "coap://h/t", None, None)
    (dereg,) = protocol.receive(request(GET, b"b", (OBSERVE, uint(1)), (PROXY_URI, b"coap://h/t")))
    assert isinstance(dereg, Deregister) and dereg.left == "coap://h:5683/t"
    assert protocol.observation_count == 0


def test_a_failure_ends_every_observation_of_the_uri_and_accept_is_honoured() -> None:
    protocol = started()
    protocol.observe(b"a", "coap://h:5683/t")
    protocol.observe(b"b", "coap://h:5683/t", accept=50)
    notes = protocol.notifications("coap://h:5683/t", 1, "2.05", 60, b"\x01", None)
    out = [Message.parse(n.data) for n in notes]
    assert [(m.token, dotted(m.code)) for m in out] == [(b"a", "2.05"), (b"b", "4.06")]
    assert notes[1].key is None  # an observation's last message is never dropped
    assert protocol.observing(b"b") is None
    (failure,) = [Message.parse(d) for d in protocol.failure("coap://h:5683/t", "5.02", "gone")]
    assert (failure.token, dotted(failure.code), failure.payload) == (b"a", "5.02", b"gone")
    assert failure.first(OBSERVE) is None and protocol.observed_uris == ()


def test_a_response_larger_than_the_clients_max_message_size_becomes_5_02() -> None:
    protocol = CoapWsProtocol(max_message_size=65536)
    protocol.receive(Message(CSM, b"", ((MAX_MESSAGE_SIZE, uint(100)),)).serialize())
    answer = Message.parse(protocol.response(b"t", "2.05", payload=b"x" * 200))
    assert dotted(answer.code) == "5.02" and b"Max-Message-Size" in answer.payload
    assert dotted(Message.parse(protocol.response(b"t", "2.05", payload=b"x" * 50)).code) == "2.05"


# -- end to end ----------------------------------------------------------------------------------


class CoapClient:
    """A CoAP-over-WebSocket client made of a websockets connection and the codec above."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._tokens = itertools.count(1)
        self.kept: list[Message] = []
        """Messages read while waiting for another one."""

    def token(self) -> bytes:
        return next(self._tokens).to_bytes(2, "big")

    async def send(self, message: Message | bytes | str) -> None:
        await self.ws.send(message.serialize() if isinstance(message, Message) else message)

    async def recv(self, timeout: float = WAIT) -> Message:
        async with asyncio.timeout(timeout):
            data = await self.ws.recv()
        assert isinstance(data, bytes), data
        return Message.parse(data)

    async def wait_for(self, predicate: Callable[[Message], bool]) -> Message:
        for i, message in enumerate(self.kept):
            if predicate(message):
                return self.kept.pop(i)
        async with asyncio.timeout(WAIT):
            while True:
                message = await self.recv()
                if predicate(message):
                    return message
                self.kept.append(message)

    async def request(
        self, code: int, *options: tuple[int, bytes], payload: bytes = b"",
        token: bytes | None = None,
    ) -> Message:
        token = self.token() if token is None else token
        await self.send(Message(code, token, options, payload))
        return await self.wait_for(lambda m: m.token == token and m.code >> 5 != 7)


def coap_peers(gateway: Gateway) -> set[Any]:
    """The gateway's side of the RFC 8323 connections open now."""
    return set(gateway.coap_ws.peers)


async def gone(conns: set[Any]) -> None:
    """Wait until the gateway has forgotten these connections."""
    if conns:
        await asyncio.wait_for(
            asyncio.gather(*(asyncio.shield(c.finished) for c in conns)), WAIT
        )


def coap_url(gateway: Gateway, query: str = "") -> str:
    assert gateway.coap_ws_url == f"ws://127.0.0.1:{gateway.ws.port}/.well-known/coap"
    return gateway.coap_ws_url + query


@pytest_asyncio.fixture
async def make_coap_client() -> AsyncIterator[Callable[..., Any]]:
    clients: list[CoapClient] = []

    async def make(gateway: Gateway, token: str | None = None, csm: bool = True) -> CoapClient:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        ws = await connect(coap_url(gateway), subprotocols=["coap"],  # type: ignore[list-item]
                           additional_headers=headers, open_timeout=WAIT)
        assert ws.subprotocol == "coap"
        client = CoapClient(ws)
        clients.append(client)
        server_csm = await client.recv()
        assert server_csm.code == CSM
        assert server_csm.first(MAX_MESSAGE_SIZE) == uint(gateway.config.limits.max_frame_bytes)
        if csm:
            await client.send(CSM_BYTES)
        return client

    try:
        yield make
    finally:
        for client in clients:
            await client.ws.close()


def proxy(uri: str) -> tuple[int, bytes]:
    return (PROXY_URI, uri.encode())


async def test_get_and_put_are_forwarded_to_the_sensor(
    gateway: Gateway, sensors: SimulatedSensors, make_coap_client: Any
) -> None:
    client = await make_coap_client(gateway)
    answer = await client.request(GET, proxy(f"{sensors.base_uri}/status"))
    assert dotted(answer.code) == "2.05" and answer.payload.startswith(b"ok uptime=")
    assert answer.first(CONTENT_FORMAT) == b""  # text/plain, 0
    put = await client.request(
        PUT, proxy(f"{sensors.base_uri}/led"), (CONTENT_FORMAT, uint(60)),
        payload=cbor2.dumps({"on": True}),
    )
    assert dotted(put.code) == "2.04"
    answer = await client.request(
        GET, (URI_HOST, b"127.0.0.1"), (URI_PORT, uint(sensors.port)), (URI_PATH, b"led"),
        (PROXY_SCHEME, b"coap"),
    )
    assert cbor2.loads(answer.payload) == {"on": True}


async def test_observe_shares_the_one_upstream_observation_with_json_clients(
    gateway: Gateway, sensors: SimulatedSensors, make_coap_client: Any, client: Client
) -> None:
    uri = f"{sensors.base_uri}/temperature"
    await client.subscribe(name="temperature")
    await client.next_notify()
    coap = await make_coap_client(gateway)
    token = coap.token()
    first = await coap.request(GET, (OBSERVE, b""), proxy(uri), token=token)
    assert dotted(first.code) == "2.05" and first.first(OBSERVE) is not None
    assert first.first(CONTENT_FORMAT) == uint(60)
    # The sensor's own CBOR bytes, not a re-encoding of the JSON value.
    assert isinstance(cbor2.loads(first.payload), float)
    seqs = [int.from_bytes(first.first(OBSERVE) or b"", "big")]
    for _ in range(3):
        note = await coap.wait_for(lambda m: m.token == token)
        seqs.append(int.from_bytes(note.first(OBSERVE) or b"", "big"))
    assert seqs == sorted(seqs) and len(set(seqs)) == 4
    # A second CoAP client and a second token: still one registration at the sensor.
    before = coap_peers(gateway)
    other = await make_coap_client(gateway)
    (other_conn,) = coap_peers(gateway) - before
    await other.request(GET, (OBSERVE, b""), proxy(uri))
    await coap.request(GET, (OBSERVE, b""), proxy(uri))
    assert sensors.registrations("/temperature") == 1
    assert sensors.observer_count("/temperature") == 1
    resource = gateway.hub.resource(str(gateway.hub.uri_for_name("temperature")))
    assert resource is not None and len(resource.subscribers) == 3
    # Deregistration of one token keeps the connection's other one; of both, leaves the hub.
    answer = await coap.request(GET, (OBSERVE, uint(1)), proxy(uri), token=token)
    assert dotted(answer.code) == "2.05" and answer.first(OBSERVE) is None
    assert len(resource.subscribers) == 3
    await other.ws.close()
    await gone({other_conn})
    assert len(resource.subscribers) == 2
    await client.close()
    await coap.ws.close()
    await sensors.wait_observers("/temperature", 0, timeout=WAIT)
    assert gateway.hub.subscription_count == 0


async def test_aiocoap_observes_over_coap_ws_while_a_json_client_watches(
    gateway: Gateway, sensors: SimulatedSensors, client: Client
) -> None:
    """Issue 15 §3: aiocoap's own client, over coap+ws://, through the RFC 8323 endpoint."""
    uri = f"{sensors.base_uri}/temperature"
    sub = (await client.subscribe(uri=uri))["sub"]
    context = await aiocoap.Context.create_client_context()
    try:
        message = aiocoap.Message(
            code=aiocoap.GET, uri=f"coap+ws://127.0.0.1:{gateway.ws.port}", observe=0
        )
        message.opt.proxy_uri = uri
        observed = context.request(message)
        first = await asyncio.wait_for(observed.response, WAIT)
        assert first.code == aiocoap.CONTENT and first.opt.observe is not None
        values = [cbor2.loads(first.payload)]
        async with asyncio.timeout(WAIT):
            async for notification in observed.observation:
                values.append(cbor2.loads(notification.payload))
                if len(values) == 4:
                    break
        json_values = [(await client.next_notify(sub))["value"] for _ in range(2)]
        assert all(isinstance(v, float) for v in [*values, *json_values])
        assert sensors.registrations("/temperature") == 1
        # A plain GET through the same connection.
        get = aiocoap.Message(code=aiocoap.GET, uri=f"coap+ws://127.0.0.1:{gateway.ws.port}")
        get.opt.proxy_uri = f"{sensors.base_uri}/status"
        answer = await asyncio.wait_for(context.request(get).response, WAIT)
        assert answer.code == aiocoap.CONTENT and answer.payload.startswith(b"ok")
        (peer,) = coap_peers(gateway)
    finally:
        await context.shutdown()
    # aiocoap closes the WebSocket: its subscription ends; the JSON client's stays.
    await gone({peer})
    assert gateway.hub.subscription_count == 1
    assert sensors.observer_count("/temperature") == 1
    await client.next_notify(sub)


async def test_aiocoap_cancel_sends_nothing_over_websockets(
    gateway: Gateway, sensors: SimulatedSensors
) -> None:
    """Pins the aiocoap deviation recorded in docs/interop.md: `cancel()` does not
    deregister over a reliable transport, so the token observes until the connection ends."""
    context = await aiocoap.Context.create_client_context()
    try:
        message = aiocoap.Message(
            code=aiocoap.GET, uri=f"coap+ws://127.0.0.1:{gateway.ws.port}", observe=0
        )
        message.opt.proxy_uri = f"{sensors.base_uri}/temperature"
        observed = context.request(message)
        await asyncio.wait_for(observed.response, WAIT)
        (peer,) = gateway.coap_ws.peers.values()
        observed.observation.cancel()
        # A later request on the same connection is answered after anything cancel() sent.
        get = aiocoap.Message(code=aiocoap.GET, uri=f"coap+ws://127.0.0.1:{gateway.ws.port}")
        get.opt.proxy_uri = f"{sensors.base_uri}/status"
        await asyncio.wait_for(context.request(get).response, WAIT)
        assert peer.protocol.observation_count == 1
        assert gateway.hub.subscription_count == 1
    finally:
        await context.shutdown()


async def test_aiocoap_cannot_present_a_token(
    sensors: SimulatedSensors, make_gateway: Any
) -> None:
    """docs/interop.md: aiocoap's coap+ws client sends no Authorization and no query."""
    gateway = await make_gateway(auth_config(sensors))
    context = await aiocoap.Context.create_client_context()
    try:
        message = aiocoap.Message(code=aiocoap.GET, uri=f"coap+ws://127.0.0.1:{gateway.ws.port}")
        message.opt.proxy_uri = f"{sensors.base_uri}/status"
        with pytest.raises(Exception) as failed:
            await asyncio.wait_for(context.request(message).response, WAIT)
        assert not isinstance(failed.value, TimeoutError)
        assert "401" in repr(failed.value) + repr(failed.value.__cause__)
    finally:
        await context.shutdown()


async def test_closing_or_aborting_ends_the_hub_subscription(
    gateway: Gateway, sensors: SimulatedSensors, make_coap_client: Any
) -> None:
    coap = await make_coap_client(gateway)
    await coap.request(GET, (OBSERVE, b""), proxy(f"{sensors.base_uri}/temperature"))
    await sensors.wait_observers("/temperature", 1, timeout=WAIT)
    conns = coap_peers(gateway)
    await coap.send(Message(ABORT, b"", (), b"done"))
    await gone(conns)
    await sensors.wait_observers("/temperature", 0, timeout=WAIT)
    assert gateway.hub.subscription_count == 0 and gateway.hub.connection_count == 0


async def test_ping_pong_and_release(
    gateway: Gateway, sensors: SimulatedSensors, make_coap_client: Any
) -> None:
    coap = await make_coap_client(gateway)
    await coap.send(Message(PING, b"\x99"))
    pong = await coap.recv()
    assert (pong.code, pong.token) == (PONG, b"\x99")
    await coap.request(GET, (OBSERVE, b""), proxy(f"{sensors.base_uri}/temperature"))
    await coap.send(Message(RELEASE))
    with pytest.raises(ConnectionClosed):
        while True:
            await coap.recv()
    assert coap.ws.close_code == 1000 and coap.ws.close_reason == "released"
    await sensors.wait_observers("/temperature", 0, timeout=WAIT)


@pytest.mark.parametrize(
    ("frame", "close_code", "diagnostic"),
    [
        ("a text frame", 1003, b"binary messages, not text"),
        (b"\x4f\x01", 1002, b"unparsable message: the Len nibble must be 0"),
        (Message(code_of("7.20")).serialize(), 1002, b"unknown signaling code 7.20"),
    ],
)
async def test_bad_frames_get_an_abort_with_a_diagnostic(
    gateway: Gateway, make_coap_client: Any, caplog: pytest.LogCaptureFixture,
    frame: str | bytes, close_code: int, diagnostic: bytes,
) -> None:
    coap = await make_coap_client(gateway)
    conns = coap_peers(gateway)
    await coap.send(frame)
    abort = await coap.recv()
    assert abort.code == ABORT and diagnostic in abort.payload
    with pytest.raises(ConnectionClosed):
        await coap.recv()
    assert coap.ws.close_code == close_code
    await gone(conns)
    assert "Traceback" not in caplog.text and "internal error" not in caplog.text
    assert gateway.hub.connection_count == 0


async def test_a_request_before_the_clients_csm_is_aborted(
    gateway: Gateway, sensors: SimulatedSensors, make_coap_client: Any
) -> None:
    coap = await make_coap_client(gateway, csm=False)
    await coap.send(Message(GET, b"t", (proxy(f"{sensors.base_uri}/status"),)))
    abort = await coap.recv()
    assert abort.code == ABORT and b"CSM" in abort.payload


async def test_the_handshake_needs_the_coap_subprotocol(gateway: Gateway) -> None:
    with pytest.raises(InvalidStatus) as refused:
        await connect(coap_url(gateway), open_timeout=WAIT)
    assert refused.value.response.status_code == 400
    assert b"subprotocol 'coap'" in refused.value.response.body


# -- the same rules as /ws -----------------------------------------------------------------------


SECRET, READER, NARROW = "s3cret-token-value", "reader-token-value", "narrow-token-value"


def auth_config(sensors: SimulatedSensors, **limits: Any) -> dict[str, Any]:
    config = gateway_config(sensors)
    config["auth"] = {"tokens": [
        {"token": SECRET, "name": "admin", "scopes": ["read", "write"]},
        {"token": READER, "name": "reader", "scopes": ["read"]},
        {"token": NARROW, "name": "led-only", "scopes": ["read", "write"], "allow": ["led"]},
    ]}
    if limits:
        config["limits"] = limits
    return config


async def test_tokens_and_scopes_apply(
    sensors: SimulatedSensors, make_gateway: Any, make_coap_client: Any
) -> None:
    gateway = await make_gateway(auth_config(sensors))
    for wrong in (None, "wrong-token"):
        with pytest.raises(InvalidStatus) as refused:
            headers = {"Authorization": f"Bearer {wrong}"} if wrong else {}
            await connect(coap_url(gateway), subprotocols=["coap"],  # type: ignore[list-item]
                          additional_headers=headers, open_timeout=WAIT)
        assert refused.value.response.status_code == 401
    # The query form works too (for browsers).
    ws = await connect(coap_url(gateway, f"?access_token={READER}"),
                       subprotocols=["coap"], open_timeout=WAIT)  # type: ignore[list-item]
    await ws.close()
    reader = await make_coap_client(gateway, token=READER)
    denied = await reader.request(PUT, proxy(f"{sensors.base_uri}/led"), payload=b"\xf5")
    assert dotted(denied.code) == "4.03" and b"lacks the 'write' scope" in denied.payload
    allowed = await reader.request(GET, proxy(f"{sensors.base_uri}/status"))
    assert dotted(allowed.code) == "2.05"
    narrow = await make_coap_client(gateway, token=NARROW)
    refused_uri = await narrow.request(
        GET, (OBSERVE, b""), proxy(f"{sensors.base_uri}/temperature")
    )
    assert dotted(refused_uri.code) == "4.03"
    assert gateway.hub.subscription_count == 0


@pytest.mark.parametrize(
    ("target", "code"),
    [
        ("coap://127.0.0.1:9/anything", "4.03"),  # loopback, outside the allow list
        ("coap://[ff02::fd]/x", "4.03"),  # multicast: an amplifier
        ("coap://224.0.1.187/x", "4.03"),
        ("coap://255.255.255.255/x", "4.03"),  # limited broadcast
        ("coap://0.0.0.0/x", "4.03"),
        ("coap://sensor.invalid/x", "4.03"),  # a name the policy does not allow
        ("coap+tcp://127.0.0.1/x", "5.05"),
        ("http://127.0.0.1/x", "5.05"),
        ("coap://bad host/x", "4.00"),
    ],
)
async def test_never_an_open_proxy(
    gateway: Gateway, make_coap_client: Any, target: str, code: str
) -> None:
    coap = await make_coap_client(gateway)
    for observe in ((), ((OBSERVE, b""),)):
        answer = await coap.request(GET, *observe, proxy(target))
        assert dotted(answer.code) == code, answer.payload
    assert gateway.hub.subscription_count == 0


async def test_even_a_permissive_policy_refuses_multicast_and_broadcast(
    sensors: SimulatedSensors, make_gateway: Any, make_coap_client: Any
) -> None:
    config = gateway_config(sensors)
    config["policy"]["allow"] = ["coap://*:*/*"]
    gateway = await make_gateway(config)
    coap = await make_coap_client(gateway)
    for target in ("coap://[ff02::fd]/x", "coap://224.0.1.187/x", "coap://255.255.255.255/x"):
        answer = await coap.request(GET, (OBSERVE, b""), proxy(target))
        assert dotted(answer.code) == "4.03", target
    assert gateway.hub.subscription_count == 0


async def test_policy_applies_to_proxy_scheme_targets_too(
    gateway: Gateway, make_coap_client: Any
) -> None:
    coap = await make_coap_client(gateway)
    answer = await coap.request(GET, (URI_HOST, b"ff02::fd"), (PROXY_SCHEME, b"coap"))
    assert dotted(answer.code) == "4.03"


async def test_rate_limit_is_4_29_with_max_age(
    sensors: SimulatedSensors, make_gateway: Any, make_coap_client: Any
) -> None:
    config = gateway_config(sensors)
    config["limits"] = {"rate": 1, "burst": 2}
    gateway = await make_gateway(config)
    coap = await make_coap_client(gateway)
    codes = [
        dotted((await coap.request(GET, proxy(f"{sensors.base_uri}/status"))).code)
        for _ in range(3)
    ]
    assert codes[:2] == ["2.05", "2.05"] and codes[2] == "4.29"


async def test_pings_count_toward_the_rate_limit(
    sensors: SimulatedSensors, make_gateway: Any, make_coap_client: Any
) -> None:
    config = gateway_config(sensors)
    config["limits"] = {"rate": 0.001, "burst": 1}
    gateway = await make_gateway(config)
    coap = await make_coap_client(gateway)
    for number in range(12):
        await coap.send(Message(PING, bytes((number,))))
    refused = await coap.request(GET, proxy(f"{sensors.base_uri}/status"))
    assert dotted(refused.code) == "4.29" and refused.first(MAX_AGE) is not None
    # A request the protocol refuses by itself (no proxy option: 4.04) costs as much.
    refused = await coap.request(GET, (URI_PATH, b"x"))
    assert dotted(refused.code) == "4.29"
    pongs = [m for m in coap.kept if m.code == PONG]
    assert len(pongs) in (9, 10)  # 0.1 each from a bucket of 1 (float rounding: 9 or 10)
    assert coap.kept == pongs


async def test_in_flight_budget_and_observation_bounds(
    sensors: SimulatedSensors, make_gateway: Any, make_coap_client: Any, silent_udp_port: int
) -> None:
    config = gateway_config(sensors)
    config["policy"]["allow"].append(f"coap://127.0.0.1:{silent_udp_port}/*")
    config["limits"] = {"max_inflight": 2, "max_subscriptions": 1}
    gateway = await make_gateway(config)
    coap = await make_coap_client(gateway)
    silent = proxy(f"coap://127.0.0.1:{silent_udp_port}/x")
    for token in (b"s1", b"s2"):
        await coap.send(Message(GET, token, (silent,)))
    busy = await coap.request(GET, proxy(f"{sensors.base_uri}/status"))
    assert dotted(busy.code) == "5.03" and b"at most 2 requests" in busy.payload
    await coap.request(GET, (OBSERVE, b""), proxy(f"{sensors.base_uri}/temperature"))
    over = await coap.request(GET, (OBSERVE, b""), proxy(f"{sensors.base_uri}/humidity"))
    assert dotted(over.code) == "5.03" and b"at most 1" in over.payload
    assert gateway.hub.subscription_count == 1


async def test_a_message_over_the_frame_limit_closes_the_connection(
    sensors: SimulatedSensors, make_gateway: Any, make_coap_client: Any
) -> None:
    config = gateway_config(sensors)
    config["limits"] = {"max_frame_bytes": 1024}
    gateway = await make_gateway(config)
    coap = await make_coap_client(gateway)
    await coap.send(Message(PUT, b"t", (proxy(f"{sensors.base_uri}/led"),), b"x" * 2000))
    with pytest.raises(ConnectionClosed):
        await coap.recv()
    assert coap.ws.close_code == 1009


# -- observations that end, and what a connection leaves behind ------------------------------------


async def test_an_offline_resource_ends_the_observation_with_its_code(
    gateway: Gateway, sensors: SimulatedSensors, make_coap_client: Any, client: Client
) -> None:
    uri = f"{sensors.base_uri}/nothing-here"
    reply = await client.subscribe(uri=uri)
    coap = await make_coap_client(gateway)
    answer = await coap.request(GET, (OBSERVE, b""), proxy(uri))
    assert dotted(answer.code) == "4.04" and answer.first(OBSERVE) is None
    assert answer.payload == b"the sensor answered 4.04"
    # The CoAP peer left the hub's subscription; the JSON client keeps its own.
    (peer,) = coap_peers(gateway)
    await client.call({"type": "ping"})  # the deferred unsubscription has run by now
    assert gateway.hub.subscriptions_of(peer) == ()
    assert gateway.hub.subscriptions_of(next(iter(set(gateway._sessions) - {peer}))) == (
        reply["sub"],
    )


async def test_an_observation_whose_accept_the_sensor_misses_ends_with_4_06(
    gateway: Gateway, sensors: SimulatedSensors, make_coap_client: Any
) -> None:
    coap = await make_coap_client(gateway)
    answer = await coap.request(
        GET, (OBSERVE, b""), proxy(f"{sensors.base_uri}/temperature"), (ACCEPT, uint(50))
    )
    assert dotted(answer.code) == "4.06"
    await sensors.wait_observers("/temperature", 0, timeout=WAIT)  # linger = 0
    assert gateway.hub.subscription_count == 0


async def test_release_answers_the_requests_in_flight_first(
    gateway: Gateway, sensors: SimulatedSensors, make_coap_client: Any
) -> None:
    coap = await make_coap_client(gateway)
    await coap.send(Message(GET, b"r1", (proxy(f"{sensors.base_uri}/status"),)))
    await coap.send(Message(RELEASE))
    answer = await coap.recv()
    assert (answer.token, dotted(answer.code)) == (b"r1", "2.05")
    with pytest.raises(ConnectionClosed):
        await coap.recv()
    assert coap.ws.close_code == 1000


async def test_deregistering_an_unknown_token_is_a_plain_get(
    gateway: Gateway, sensors: SimulatedSensors, make_coap_client: Any
) -> None:
    coap = await make_coap_client(gateway)
    answer = await coap.request(GET, (OBSERVE, uint(1)), proxy(f"{sensors.base_uri}/status"))
    assert dotted(answer.code) == "2.05" and answer.payload.startswith(b"ok")
    assert answer.first(OBSERVE) is None and gateway.hub.subscription_count == 0


async def test_a_host_name_is_resolved_and_checked_before_registering(
    sensors: SimulatedSensors, make_gateway: Any, make_coap_client: Any
) -> None:
    config = gateway_config(sensors)
    config["policy"]["allow"].append(f"coap://localhost:{sensors.port}/*")
    gateway = await make_gateway(config)
    coap = await make_coap_client(gateway)
    uri = f"coap://localhost:{sensors.port}/temperature"
    first = await coap.request(GET, (OBSERVE, b""), proxy(uri))
    assert dotted(first.code) == "2.05" and first.first(OBSERVE) is not None
    assert gateway.hub.subscribed_uris(next(iter(coap_peers(gateway)))) == (uri,)


async def test_connection_limits_apply(
    sensors: SimulatedSensors, make_gateway: Any, make_coap_client: Any
) -> None:
    config = gateway_config(sensors)
    config["limits"] = {"max_connections_per_ip": 1}
    gateway = await make_gateway(config)
    await make_coap_client(gateway)
    with pytest.raises(InvalidStatus) as refused:
        await connect(coap_url(gateway), subprotocols=["coap"],  # type: ignore[list-item]
                      open_timeout=WAIT)
    assert refused.value.response.status_code == 503


async def test_the_sensors_bytes_are_kept_only_while_the_resource_is_observed(
    gateway: Gateway, sensors: SimulatedSensors, client: Client
) -> None:
    uri = f"{sensors.base_uri}/temperature"
    sub = (await client.subscribe(uri=uri))["sub"]
    await client.next_notify(sub)
    assert gateway.coap_ws.representations[uri].cf == 60
    await client.call({"type": "unsubscribe", "sub": sub})  # linger = 0: stops at once
    assert uri not in gateway.coap_ws.representations
    # A late answer for a resource nobody observes is not kept (nothing would drop it).
    late = CoapAnswer(code="2.05", cf=0, payload=b"late", max_age=None, observe=9)
    gateway.answer("coap://127.0.0.1:9/elsewhere", late)
    gateway.answer(uri, late)
    assert gateway.coap_ws.representations == {}


async def test_plain_http_on_the_coap_path_is_answered_like_on_ws(gateway: Gateway) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.ws.port)
    try:
        for request, status in (
            (b"GET /.well-known/coap HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b" 426 "),
            (b"POST /.well-known/coap HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n", b" 405 "),
        ):
            writer.write(request)
            line = await asyncio.wait_for(reader.readline(), WAIT)
            assert status in line, line
            await asyncio.wait_for(reader.read(), WAIT)
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.ws.port)
    finally:
        writer.close()


def split_frame(data: bytearray) -> tuple[bytes, bytearray] | None:
    """The first unmasked WebSocket frame's payload in `data` and the bytes after it, or None
    while it is incomplete (frames under 64 KiB)."""
    if len(data) < 2:
        return None
    length, start = data[1] & 0x7F, 2
    if length == 126:
        if len(data) < 4:
            return None
        length, start = int.from_bytes(data[2:4], "big"), 4
    if len(data) < start + length:
        return None
    return bytes(data[start : start + length]), data[start + length :]


async def test_a_slow_coap_client_gets_the_newest_notification_not_a_backlog(
    gateway: Gateway, sensors: SimulatedSensors, client: Client
) -> None:
    """As on /ws (§13): while a CoAP client reads nothing, a newer notification for its
    token replaces the unsent older one; it then reads a few KiB, not the backlog."""
    updates, size = 150, 1000  # 150 KB of notifications: far past the socket buffers
    uri = f"{sensors.base_uri}/blob"
    sub = (await client.subscribe(uri=uri))["sub"]
    await client.next_notify(sub)
    loop = asyncio.get_running_loop()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting
    sock.setblocking(False)
    known = coap_peers(gateway)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", gateway.ws.port))
        head = handshake_request(gateway.ws.port, "/.well-known/coap").replace(
            b"\r\n\r\n", b"\r\nSec-WebSocket-Protocol: coap\r\n\r\n"
        )
        await loop.sock_sendall(sock, head)
        received = bytearray()
        while b"\r\n\r\n" not in received:
            received += await asyncio.wait_for(loop.sock_recv(sock, 4096), WAIT)
        assert received.startswith(b"HTTP/1.1 101"), bytes(received)
        received = received.partition(b"\r\n\r\n")[2]
        (conn,) = coap_peers(gateway) - known
        observe = Message(GET, b"sl", ((OBSERVE, b""), proxy(uri))).serialize()
        for message in (CSM_BYTES, observe):  # masked with a zero key: the bytes as they are
            await loop.sock_sendall(sock, bytes((0x82, 0x80 | len(message))) + bytes(4) + message)
        for value in range(1, updates + 1):
            sensors.set_blob(value.to_bytes(4, "big") + bytes(size))
            while int.from_bytes(
                base64.b64decode((await client.next_notify(sub))["payload_b64"])[:4], "big"
            ) < value:
                pass
        assert conn.outbox.replaced > 0 and not conn.closing
        # Read until the newest value: a few KiB, not the 150 KB of every update.
        newest = b""
        read = len(received)
        async with asyncio.timeout(WAIT):
            while not newest.startswith(updates.to_bytes(4, "big")):
                while (split := split_frame(received)) is None:
                    chunk = await loop.sock_recv(sock, 65536)
                    assert chunk, "closed by the gateway"
                    received += chunk
                    read += len(chunk)
                frame, received = split
                newest = Message.parse(frame).payload
        assert read < 40_000, read
    finally:
        sock.close()
