"""The CoAP side on a network it does not control (issue 21), end to end on loopback.

A real gateway observes real sensors (the simulated aiocoap ones, which count their
observers, or `WireSensor`, a plain UDP socket whose every datagram the test writes), a real
WebSocket client watches, and the datagrams an attacker would send are sent for real: from
other 127.0.0.x addresses (Linux routes all of 127/8 to lo), and, for a forged source address
or a forged ICMP error, through a raw socket (tests/spoof.py; skipped without root, never
in CI). Each test checks what the web client and the sensor see. That something did *not*
happen is shown by a round trip that must come after it: a later notification, or a request
through the gateway answered after the datagrams were read.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiocoap
import cbor2
import pytest
import pytest_asyncio
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

from translator.coap.batch import readers_of
from translator.gateway import Gateway
from translator.logs import FIRST
from translator.sim import SimulatedSensors

from .conftest import WAIT, Client, gateway_config
from .spoof import (
    FRAG_NEEDED,
    ICMP_DEST_UNREACH,
    ICMP_TIME_EXCEEDED,
    PORT_UNREACH,
    Spoofer,
    need_raw_sockets,
)

GATEWAY_HOST = "127.0.0.1"
"""The address the gateway's datagrams to a 127.0.0.1 sensor come from."""
FAST = {"backoff_min": 0.05, "backoff_max": 0.2, "registration_timeout": 2.0}


def coap(mtype: Type, code: Code, mid: int, token: bytes = b"", **options: Any) -> bytes:
    message = aiocoap.Message(code=code, **options)
    message.mtype, message.mid, message.token = mtype, mid, token
    return bytes(message.encode())


def coap_port(gateway: Gateway) -> int:
    (reader,) = readers_of(gateway.coap.context)
    port: int = reader.sock.getsockname()[1]
    return port


def temperatures(client: Client, sub: str) -> list[Any]:
    return [f["value"] for f in client.seen if f.get("sub") == sub and f["type"] == "notify"]


def statuses(client: Client, sub: str) -> list[str]:
    return [f["state"] for f in client.seen if f.get("sub") == sub and f["type"] == "status"]


@dataclass
class Watched:
    """A gateway observing the simulated temperature sensor, and a client subscribed to it."""

    sensors: SimulatedSensors
    gateway: Gateway
    client: Client
    sub: str

    @property
    def sensor(self) -> tuple[str, int]:
        return ("127.0.0.1", self.sensors.port)

    @property
    def gateway_address(self) -> tuple[str, int]:
        return (GATEWAY_HOST, coap_port(self.gateway))

    async def later_notification(self) -> dict[str, Any]:
        """A notification newer than every one seen so far."""
        seen = [f["seq"] for f in self.client.seen if f.get("sub") == self.sub
                and f["type"] == "notify"]
        newest = max(seen, default=0)
        return await self.client.wait_for(
            lambda f: f.get("sub") == self.sub and f["type"] == "notify" and f["seq"] > newest
        )

    async def round_trip(self) -> None:
        """A request through the gateway to the sensor, answered: what was sent to the
        gateway before it has been read."""
        reply = await self.client.call({"type": "request", "method": "GET",
                                        "uri": f"{self.sensors.base_uri}/status"})
        assert reply["type"] == "response" and reply["code"] == "2.05", reply

    def assert_sensor_unharmed(self) -> None:
        """One observation at the sensor, never registered again, never offline."""
        assert self.sensors.observer_count("/temperature") == 1
        assert self.sensors.registrations("/temperature") == 1
        assert statuses(self.client, self.sub) == ["online"], statuses(self.client, self.sub)
        assert all(isinstance(v, float) and -50 < v < 100
                   for v in temperatures(self.client, self.sub))


@pytest_asyncio.fixture
async def watched(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any
) -> AsyncIterator[Watched]:
    gateway = await make_gateway({**gateway_config(sensors), "supervision": FAST})
    client = await make_client(gateway.url)
    sub = (await client.subscribe(name="temperature"))["sub"]
    await client.next_notify(sub)
    await sensors.wait_observers("/temperature", 1)
    yield Watched(sensors, gateway, client, sub)


@pytest.fixture
def stranger() -> Iterator[socket.socket]:
    """A UDP socket on another loopback address: someone else on the network."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.2", 0))
    sock.settimeout(WAIT)
    try:
        yield sock
    finally:
        sock.close()


@pytest.fixture
def spoofer() -> Iterator[Spoofer]:
    need_raw_sockets()
    raw = Spoofer()
    try:
        yield raw
    finally:
        raw.close()


# --- 1. a burst with an undecodable option ----------------------------------------------------


async def test_a_burst_with_an_undecodable_option_does_not_stop_reading(
    watched: Watched, stranger: socket.socket
) -> None:
    # ~6000 small NON responses with one token, one of them with a Uri-Path that is not
    # UTF-8, all in the socket before the gateway reads any (this coroutine does not yield).
    target = watched.gateway_address
    burst = coap(Type.NON, Code.CONTENT, 1, b"\x01\x02", payload=b"x")
    bad = coap(Type.NON, Code.CONTENT, 2, b"\x01\x02")
    bad = bad[:6] + b"\xb2\xff\xfe" + bad[6:]  # option 11 (Uri-Path), 2 bytes, not UTF-8
    for number in range(6000):
        stranger.sendto(bad if number == 3000 else burst, target)
    # Reading goes on: notifications keep coming, the sensor keeps one observation.
    for _ in range(3):
        await watched.later_notification()
    await watched.round_trip()
    watched.assert_sensor_unharmed()
    dropped = watched.gateway.coap.dropped
    assert dropped.get("coap.unmatched", 0) > 0, dropped
    (reader,) = readers_of(watched.gateway.coap.context)
    assert reader.live == 0 and reader.reading  # nothing of the burst queued, never paused


async def test_a_datagram_aiocoap_cannot_handle_is_dropped_and_counted(
    make_gateway: Any, make_client: Any
) -> None:
    """The sensor itself sends a notification with an option aiocoap cannot decode: that
    datagram is dropped and counted, and the next one is delivered."""
    async with WireSensor() as sensor:
        gateway = await make_gateway(sensor.config())
        client = await make_client(gateway.url)
        sub = (await client.subscribe(uri=sensor.uri("value")))["sub"]
        registration = await sensor.registration()
        sensor.answer(registration, 1.0)
        assert (await client.next_notify(sub))["value"] == 1.0
        header_end = 4 + len(registration.token)
        good = sensor.notification(registration, 3.0)
        bad = good[:header_end] + b"\xb2\xff\xfe" + good[header_end:]  # Uri-Path, not UTF-8
        sensor.send(bad)
        sensor.send(sensor.notification(registration, 4.0))
        assert (await client.next_notify(sub))["value"] == 4.0
        assert gateway.coap.dropped.get("coap.unhandled") == 1


# --- 2. ICMP errors ---------------------------------------------------------------------------


async def test_forged_icmp_errors_take_nothing_away(watched: Watched, spoofer: Spoofer) -> None:
    # Port unreachable, time exceeded and fragmentation needed from a third address, each
    # quoting a datagram from the gateway to the sensor that the gateway never sent.
    about = (watched.gateway_address, watched.sensor,
             coap(Type.NON, Code.GET, 0x4242, b"\x00\x2a", observe=0, uri_path=["temperature"]))
    for _ in range(10):
        spoofer.icmp("127.0.0.7", ICMP_DEST_UNREACH, PORT_UNREACH, about)
        spoofer.icmp("127.0.0.7", ICMP_TIME_EXCEEDED, 0, about)
        spoofer.icmp("127.0.0.7", ICMP_DEST_UNREACH, FRAG_NEEDED, about, mtu=576)
    await watched.round_trip()
    await watched.later_notification()
    watched.assert_sensor_unharmed()
    dropped = watched.gateway.coap.dropped
    assert dropped.get("coap.icmp-unmatched") == 10, dropped
    assert dropped.get("coap.icmp-ignored-kind") == 20, dropped


async def test_an_icmp_error_about_a_request_in_flight_fails_it_and_the_old_observation_is_deregistered_first(  # noqa: E501
    make_gateway: Any, make_client: Any, spoofer: Spoofer
) -> None:
    """A real port unreachable (it quotes what the gateway sent) is taken: the request fails,
    so does the observation of that sensor, and before registering again the gateway
    deregisters the old observation (RFC 7641 §3.6): the sensor never holds two."""
    async with WireSensor() as sensor:
        gateway = await make_gateway(sensor.config())
        client = await make_client(gateway.url)
        sub = (await client.subscribe(uri=sensor.uri("value")))["sub"]
        first = await sensor.registration()
        sensor.answer(first, 1.0)
        assert (await client.next_notify(sub))["value"] == 1.0

        pending = asyncio.create_task(client.call(
            {"type": "request", "method": "GET", "uri": sensor.uri("slow"), "timeout": 30}
        ))
        request = await sensor.next_request(lambda r: r.path == "slow")
        spoofer.icmp(sensor.host, ICMP_DEST_UNREACH, PORT_UNREACH,
                     (request.source, (sensor.host, sensor.port), request.data))
        reply = await pending
        assert reply["type"] == "error" and reply["error"] == "upstream_error", reply

        # The old observation goes first, then a new registration with a new token.
        again = await sensor.registration()
        assert sensor.observers == {again.token}, sensor.log
        deregistrations = [r for r in sensor.log if r.observe == 1]
        assert [r.token for r in deregistrations][:1] == [first.token]
        assert sensor.log.index(deregistrations[0]) < sensor.log.index(again)
        assert again.token != first.token
        sensor.answer(again, 2.0)
        assert (await client.next_notify(sub))["value"] == 2.0


# --- 3. datagrams to the broadcast address ----------------------------------------------------


async def test_spoofed_datagrams_to_the_broadcast_address_get_silence(
    watched: Watched, spoofer: Spoofer
) -> None:
    broadcast = ("127.255.255.255", coap_port(watched.gateway))
    for payload in (
        coap(Type.CON, Code.GET, 0x1001, b"\x07", uri_path=["x"]),  # a request
        coap(Type.CON, Code.EMPTY, 0x1002),  # a ping
        coap(Type.CON, Code.CONTENT, 0x1003, b"\x09\x09", observe=3),  # an unknown response
    ):
        spoofer.udp(watched.sensor, broadcast, payload)  # "from the sensor"
    await watched.round_trip()
    await watched.later_notification()
    watched.assert_sensor_unharmed()
    assert watched.gateway.coap.dropped.get("coap.not-unicast") == 3


# --- 4. tokens --------------------------------------------------------------------------------


async def test_tokens_are_eight_random_bytes_for_every_request_and_registration(
    make_gateway: Any, make_client: Any
) -> None:
    async with WireSensor() as sensor:
        gateway = await make_gateway(sensor.config())
        client = await make_client(gateway.url)
        for path in ("a", "b", "c"):
            await client.subscribe(uri=sensor.uri(path))
        for _ in range(3):
            sensor.answer(await sensor.registration(), 0.0)
        for _ in range(3):
            start = len(sensor.log)
            call = asyncio.create_task(client.call(
                {"type": "request", "method": "GET", "uri": sensor.uri("r"), "timeout": 30}))
            sensor.answer(await sensor.next_request(lambda r: r.path == "r", start), 1.0)
            assert (await call)["type"] == "response"
        tokens = [r.token for r in sensor.log]
        assert len(tokens) == 6 and len(set(tokens)) == 6
        assert {len(t) for t in tokens} == {8}
        numbers = sorted(int.from_bytes(t, "big") for t in tokens)
        assert max(b - a for a, b in itertools.pairwise(numbers)) > 2**32


async def test_a_blind_spray_of_guessed_tokens_never_reaches_a_client(
    watched: Watched, spoofer: Spoofer
) -> None:
    # Every 2-byte token (65 280 of them), "from the sensor", with a forged value: what
    # guessed aiocoap's counter tokens before.
    target = watched.gateway_address
    forged = cbor2.dumps(-999.0)
    for high in range(1, 256):
        for low in range(256):
            payload = coap(Type.NON, Code.CONTENT, (high << 8) | low, bytes((high, low)),
                           observe=1 << 22, content_format=60, payload=forged)
            spoofer.udp(watched.sensor, target, payload)
            if low % 32 == 31:
                await asyncio.sleep(0)  # a loop turn for the gateway to read them
    await watched.round_trip()
    assert -999.0 not in temperatures(watched.client, watched.sub)
    # (A forged notification taken would also hold back the real ones: its Observe number
    # is ahead of theirs.)
    await watched.later_notification()
    assert -999.0 not in temperatures(watched.client, watched.sub)
    watched.assert_sensor_unharmed()
    # (Nearly) all of them reached the gateway, rather than the kernel's full buffer.
    assert watched.gateway.coap.dropped.get("coap.unmatched", 0) > 60_000


# --- 5. requests to the gateway's client socket -----------------------------------------------


async def test_requests_to_the_client_socket_get_an_empty_rst_or_nothing_and_leave_no_state(
    watched: Watched, stranger: socket.socket
) -> None:
    target = watched.gateway_address
    loop = asyncio.get_running_loop()
    stranger.setblocking(False)

    async def receive() -> bytes:
        async with asyncio.timeout(WAIT):
            data: bytes = await loop.sock_recv(stranger, 2048)
        return data

    stranger.sendto(coap(Type.CON, Code.GET, 0x1234, b"tk", uri_path=["x"]), target)
    assert await receive() == b"\x70\x00\x12\x34"  # an empty RST, as small as the request
    stranger.sendto(coap(Type.NON, Code.GET, 0x1235, b"tk", uri_path=["x"]), target)
    stranger.sendto(coap(Type.CON, Code.EMPTY, 0x1236), target)  # a ping after it
    assert await receive() == b"\x70\x00\x12\x36"  # nothing came for the NON before it
    for mid in range(1000):
        stranger.sendto(coap(Type.CON, Code.POST, mid, b"t", uri_path=["x"]), target)
        if mid % 100 == 99:
            for _ in range(100):
                await receive()
    # Nothing remembered: aiocoap saw none of them.
    (reader,) = readers_of(watched.gateway.coap.context)
    assert reader.stack.messages._recent_messages == {}
    assert reader.stack.tokens.incoming_requests == {}
    assert watched.gateway.coap.dropped.get("coap.request") == 1002
    await watched.later_notification()
    watched.assert_sensor_unharmed()


# --- 6. a flood of one (address, token) -------------------------------------------------------


async def test_a_flood_of_one_token_does_not_starve_real_notifications(
    watched: Watched
) -> None:
    loop = asyncio.get_running_loop()
    target = watched.gateway_address
    done = threading.Event()
    sent = [0]

    def flood() -> None:  # 15 000 datagrams a second for a second, from 127.0.0.2
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.2", 0))
        datagram = coap(Type.NON, Code.CONTENT, 1, b"\x05\x05", observe=9, payload=b"x")
        started = time.perf_counter()
        try:
            while sent[0] < 15_000:
                for _ in range(75):
                    with contextlib.suppress(OSError):
                        sock.sendto(datagram, target)
                    sent[0] += 1
                ahead = started + sent[0] / 15_000 - time.perf_counter()
                if ahead > 0:
                    time.sleep(ahead)  # pacing the attacker, not waiting for a condition
        finally:
            sock.close()
            done.set()

    before = len(temperatures(watched.client, watched.sub))
    flooding = loop.run_in_executor(None, flood)
    during = 0
    while not done.is_set():
        await watched.later_notification()
        during += 1
    await flooding
    # The sensor changes every 50 ms: most of its notifications get through meanwhile.
    assert during >= 8, (during, sent[0])
    await watched.later_notification()
    assert len(temperatures(watched.client, watched.sub)) > before
    watched.assert_sensor_unharmed()
    # Dropped on read, before any queueing: none of it waits in the gateway's queue.
    assert watched.gateway.coap.dropped.get("coap.unmatched", 0) > sent[0] // 2
    (reader,) = readers_of(watched.gateway.coap.context)
    assert reader.live == 0 and not reader.latest


# --- 7. logs ----------------------------------------------------------------------------------


async def test_unmatched_datagrams_are_logged_through_the_limiter(
    watched: Watched, stranger: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    target = watched.gateway_address
    for mid in range(50):
        stranger.sendto(coap(Type.NON, Code.CONTENT, mid, b"\x01", payload=b"x"), target)
        bad = coap(Type.NON, Code.CONTENT, 100 + mid, b"\x02")
        stranger.sendto(bad[:5] + b"\xb2\xff\xfe" + bad[5:], target)  # not UTF-8 either
    await watched.round_trip()
    lines = [r for r in caplog.records if "127.0.0.2" in r.getMessage()]
    assert 0 < len(lines) <= FIRST, [r.getMessage() for r in lines]
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert watched.gateway.coap.dropped.get("coap.unmatched") == 100


# --- 8. datagrams longer than the read buffer -------------------------------------------------


async def test_a_datagram_longer_than_the_gateway_takes_is_dropped_not_cut(
    make_gateway: Any, make_client: Any
) -> None:
    async with WireSensor() as sensor:
        gateway = await make_gateway(sensor.config())
        client = await make_client(gateway.url)
        sub = (await client.subscribe(uri=sensor.uri("value")))["sub"]
        registration = await sensor.registration()
        sensor.answer(registration, "short")
        assert (await client.next_notify(sub))["value"] == "short"
        sensor.send(sensor.notification(registration, "x" * 6000))  # 6016 bytes in all
        sensor.send(sensor.notification(registration, "after"))
        assert (await client.next_notify(sub))["value"] == "after"
        assert [f["value"] for f in client.seen if f["type"] == "notify"] == ["short", "after"]
        assert gateway.coap.dropped.get("coap.truncated") == 1


# --- 9. an ACK with another Message ID --------------------------------------------------------


async def test_an_ack_is_taken_only_with_its_requests_message_id_and_token(
    make_gateway: Any, make_client: Any
) -> None:
    async with WireSensor() as sensor:
        gateway = await make_gateway(sensor.config())
        client = await make_client(gateway.url)
        call = asyncio.create_task(client.call(
            {"type": "request", "method": "GET", "uri": sensor.uri("r"), "timeout": 30}))
        request = await sensor.next_request(lambda r: r.path == "r")
        assert request.mtype == Type.CON
        # The right token on another Message ID, then the right one.
        sensor.send(sensor.response(request, "forged", mtype=Type.ACK,
                                    mid=(request.mid + 1) & 0xFFFF))
        sensor.send(sensor.response(request, "real", mtype=Type.ACK))
        reply = await call
        assert reply["type"] == "response" and reply["value"] == "real", reply
        assert gateway.coap.dropped.get("coap.unmatched") == 1


# --- the kernel's pending ICMP error on the next send -----------------------------------------


async def test_a_forged_icmp_error_does_not_fail_the_next_send_to_someone_else(
    watched: Watched, spoofer: Spoofer
) -> None:
    """Linux reports an ICMP error on the socket's next send as well, whoever that is to; the
    gateway tries that send again instead of failing every request to its address."""
    about = (watched.gateway_address, ("127.0.0.9", 5683),
             coap(Type.NON, Code.GET, 1, b"\x01\x02\x03\x04"))
    spoofer.icmp("127.0.0.9", ICMP_DEST_UNREACH, PORT_UNREACH, about)
    # In this same loop turn, before the gateway reads its error queue, it sends.
    (reader,) = readers_of(watched.gateway.coap.context)
    failed: list[Any] = []
    reader.stack.fail = lambda exc, remote: failed.append(exc)
    message = aiocoap.Message(code=Code.GET, uri=f"{watched.sensors.base_uri}/status")
    message.mtype, message.mid, message.token = Type.NON, 77, b"12345678"
    message.remote = reader.stack.endpoint(("::ffff:127.0.0.1", watched.sensors.port, 0, 0),
                                           None)
    reader.send(message)
    assert failed == []
    await watched.round_trip()


# --- a sensor on a plain socket ---------------------------------------------------------------


@dataclass
class Received:
    data: bytes
    source: tuple[str, int]
    mtype: Type
    code: Code
    mid: int
    token: bytes
    observe: int | None
    path: str


class WireSensor:
    """A sensor on a plain UDP socket: every request it gets is kept (`log`), and the test
    writes every answer. It counts the observations it holds (`observers`: registered
    tokens, less the deregistered ones)."""

    host = "127.0.0.1"

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.host, 0))
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.log: list[Received] = []
        self.observers: set[bytes] = set()
        self._new = asyncio.Event()
        self._reader: asyncio.Task[None] | None = None
        self._peer: Any = None
        self._observe = 1

    async def __aenter__(self) -> WireSensor:
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
        self.sock.close()

    def uri(self, path: str) -> str:
        return f"coap://{self.host}:{self.port}/{path}"

    def config(self) -> dict[str, Any]:
        return {"server": {"host": "127.0.0.1", "port": 0, "linger": 0},
                "policy": {"allow": [f"coap://{self.host}:{self.port}/*"]},
                "supervision": FAST}

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data, peer = await loop.sock_recvfrom(self.sock, 8192)
            message = aiocoap.Message.decode(data)
            if not message.code.is_request():
                continue
            self._peer = peer
            received = Received(data, peer, message.mtype, message.code, message.mid,
                                bytes(message.token), message.opt.observe,
                                "/".join(message.opt.uri_path))
            if received.observe == 0:
                self.observers.add(received.token)
            elif received.observe == 1:
                self.observers.discard(received.token)
            self.log.append(received)
            self._new.set()

    async def next_request(self, predicate: Callable[[Received], bool],
                           seen: int = 0) -> Received:
        async with asyncio.timeout(WAIT):
            while True:
                for received in self.log[seen:]:
                    seen += 1
                    if predicate(received):
                        return received
                self._new.clear()
                await self._new.wait()

    async def registration(self) -> Received:
        """The next registration not returned before."""
        taken = getattr(self, "_registrations", 0)
        found = await self.next_request(lambda r: r.observe == 0, taken)
        self._registrations = self.log.index(found) + 1
        return found

    def response(self, request: Received, value: Any, *, mtype: Type | None = None,
                 mid: int | None = None, observe: bool = False) -> bytes:
        if mtype is None:
            mtype = Type.ACK if request.mtype == Type.CON else Type.NON
        if mid is None:
            mid = request.mid if mtype == Type.ACK else (request.mid + 0x100) & 0xFFFF
        options: dict[str, Any] = {"content_format": 60}
        if observe:
            self._observe += 1
            options["observe"] = self._observe
        return coap(mtype, Code.CONTENT, mid, request.token, payload=cbor2.dumps(value),
                    **options)

    def answer(self, request: Received, value: Any) -> None:
        self.send(self.response(request, value, observe=request.observe == 0))

    def notification(self, registration: Received, value: Any) -> bytes:
        self._observe += 1
        return coap(Type.NON, Code.CONTENT, (0x8000 + self._observe) & 0xFFFF,
                    registration.token, observe=self._observe, content_format=60,
                    payload=cbor2.dumps(value))

    def send(self, data: bytes) -> None:
        self.sock.sendto(data, self._peer)

