"""Hostile sensors (issue 4 §8), end to end with the real gateway.

A test-local aiocoap server plays sensors that send invalid CBOR, CBOR nested 100 000 levels
deep (block-wise, since it is 100 kB), huge SenML packs, invalid UTF-8 as text/plain, and a
raw UDP sensor floods 10 000 NON notifications per second for two seconds. Each test checks
that the gateway stays up, that its subscriber is told what happened (a ``notify`` with
``decode_error`` and ``payload_b64``, or a ``status``), that a client watching a healthy
sensor is unaffected (its updates keep coming, ``ping`` is answered) and that what the
gateway holds stays within its bounds (its queues, its history; memory figures are
`make bench`'s).

A 3 MB SenML pack (a million records) is larger than ``[limits] max_upstream_bytes``: the
gateway stops fetching its blocks at the first one past the limit, answers a request for it
with ``upstream_error`` naming the limit, and tells a subscriber with a ``notify`` whose
``decode_error`` says so (no payload).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import math
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiocoap
import cbor2
import pytest
import pytest_asyncio
from aiocoap import resource
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from translator.core.codecs import MAX_SENML_RECORDS
from translator.gateway import Gateway
from translator.sim import SimulatedSensors, _bound_port

from .conftest import WAIT, Client, gateway_config

CF_TEXT, CF_CBOR, CF_SENML_CBOR = 0, 60, 112

INVALID_CBOR = b"\xff\x00\x1c garbage"  # a "break" outside any indefinite-length item
DEEP_CBOR = b"\x81" * 100_000 + b"\x00"  # [[[[...0...]]]] 100 000 levels deep
BAD_UTF8 = b"temperature \xff\xfe\xc3\x28 degrees"


def senml_cbor(records: int) -> bytes:
    """A SenML CBOR pack of `records` records {v: 0} (3 bytes each)."""
    return b"\x9a" + struct.pack(">I", records) + b"\xa1\x02\x00" * records


# --- the hostile aiocoap sensor ----------------------------------------------------------------


BLOCK_SIZE = 1024


class Payload(resource.ObservableResource):  # type: ignore[misc]  # aiocoap is untyped
    """An observable resource whose representation the test sets (NON notifications).

    It serves its blocks itself, statelessly, as constrained devices do (RFC 7959): any
    block of the current representation on request, and block 0 with ``more`` when a
    response is larger than a block. (aiocoap's own Block2 support sends an observation's
    responses whole -- too large for a datagram -- and serves block N only to a client that
    fetched block 0 with the same request first.)
    """

    def __init__(self, payload: bytes, cf: int | None) -> None:
        super().__init__()
        self.payload = payload
        self.cf = cf
        self.version = 0
        self.bytes_served = 0
        self.notifications_rendered = 0
        self.served_past_limit = asyncio.Event()
        """Set once more than [limits] max_upstream_bytes (1 MiB) of blocks went out."""

    def set(self, payload: bytes, cf: int | None) -> None:
        self.payload, self.cf = payload, cf
        self.version += 1
        self.updated_state()

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        return False

    async def render_get(self, request: Any) -> aiocoap.Message:
        if request.opt.observe is not None:
            self.notifications_rendered += 1
        message = aiocoap.Message(
            code=aiocoap.CONTENT, payload=self.payload, transport_tuning=aiocoap.Unreliable()
        )
        message.opt.etag = self.version.to_bytes(4, "big")
        if self.cf is not None:
            message.opt.content_format = self.cf
        block2 = request.opt.block2
        if block2 is not None:
            message = message._extract_block(
                block2.block_number, min(block2.size_exponent, 6), BLOCK_SIZE
            )
        elif len(self.payload) > BLOCK_SIZE:
            message = message._extract_block(0, 6, BLOCK_SIZE)
        self.bytes_served += len(message.payload)
        if self.bytes_served > 1_048_576:
            self.served_past_limit.set()
        return message


@dataclass
class HostileSensor:
    context: Any
    port: int
    resources: dict[str, Payload]

    def uri(self, path: str) -> str:
        return f"coap://127.0.0.1:{self.port}/{path}"


@pytest_asyncio.fixture
async def hostile() -> AsyncIterator[HostileSensor]:
    resources = {
        "invalid-cbor": Payload(INVALID_CBOR, CF_CBOR),
        "deep-cbor": Payload(DEEP_CBOR, CF_CBOR),
        "senml-200k": Payload(senml_cbor(200_000), CF_SENML_CBOR),
        "senml-million": Payload(senml_cbor(1_000_000), CF_SENML_CBOR),
        "bad-utf8": Payload(BAD_UTF8, CF_TEXT),
        "ticker": Payload(cbor2.dumps(0), CF_CBOR),
    }
    site = resource.Site()
    for path, res in resources.items():
        site.add_resource([path], res)
    context = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", 0), transports=["udp6"]
    )
    try:
        yield HostileSensor(context, _bound_port(context), resources)
    finally:
        await context.shutdown()


# --- a raw UDP sensor that floods NON notifications ---------------------------------------------

CON, NON, ACK = 0, 1, 2
CONTENT = 0x45  # 2.05
OPT_OBSERVE, OPT_CONTENT_FORMAT = 6, 12


def coap_message(mtype: int, code: int, mid: int, token: bytes,
                 options: list[tuple[int, bytes]], payload: bytes) -> bytes:
    out = bytearray([0x40 | (mtype << 4) | len(token), code]) + struct.pack(">H", mid) + token
    previous = 0
    for number, value in sorted(options):
        delta, length = number - previous, len(value)
        assert delta < 13 and length < 13  # all this sensor needs
        out += bytes([(delta << 4) | length]) + value
        previous = number
    if payload:
        out += b"\xff" + payload
    return bytes(out)


def uint_option(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def parse_request(data: bytes) -> tuple[int, int, int, bytes, int | None] | None:
    """(type, code, mid, token, observe) of a CoAP message; None if it is not parsable."""
    if len(data) < 4 or data[0] >> 6 != 1:
        return None
    mtype, tkl, code = (data[0] >> 4) & 3, data[0] & 15, data[1]
    mid = struct.unpack(">H", data[2:4])[0]
    token, position, number, observe = data[4 : 4 + tkl], 4 + tkl, 0, None
    while position < len(data) and data[position] != 0xFF:
        delta, length = data[position] >> 4, data[position] & 15
        position += 1
        for nibble in ("delta", "length"):
            value = delta if nibble == "delta" else length
            if value == 13:
                value, position = data[position] + 13, position + 1
            elif value == 14:
                value = struct.unpack(">H", data[position : position + 2])[0] + 269
                position += 2
            if nibble == "delta":
                delta = value
            else:
                length = value
        number += delta
        if number == OPT_OBSERVE:
            observe = int.from_bytes(data[position : position + length], "big")
        position += length
    return mtype, code, mid, token, observe


@dataclass
class Flooder:
    """A sensor on its own thread: answers the registration, then sends `rate` NON
    notifications per second for `seconds`, then keeps answering requests until stopped."""

    rate: int = 10_000
    seconds: float = 2.0
    sock: socket.socket = field(init=False)
    registered: threading.Event = field(default_factory=threading.Event)
    go: threading.Event = field(default_factory=threading.Event)
    """Set by the test when the flood may start (after the registration)."""
    flooded: threading.Event = field(default_factory=threading.Event)
    sent: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)

    @property
    def port(self) -> int:
        port: int = self.sock.getsockname()[1]
        return port

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="flooder", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=WAIT)
        self.sock.close()

    def _receive(self) -> tuple[tuple[int, int, int, bytes, int | None], Any] | None:
        try:
            data, peer = self.sock.recvfrom(2048)
        except (TimeoutError, BlockingIOError):
            return None
        parsed = parse_request(data)
        return None if parsed is None else (parsed, peer)

    def _answer(self, parsed: tuple[int, int, int, bytes, int | None], peer: Any) -> bool:
        """Answer a request; True if it was an observe registration."""
        mtype, code, mid, token, observe = parsed
        if code == 0 or code >> 5 != 0:  # an empty message, or not a request
            return False
        options = [(OPT_CONTENT_FORMAT, uint_option(CF_CBOR))]
        if observe == 0:
            options.append((OPT_OBSERVE, uint_option(1)))
        reply_type = ACK if mtype == CON else NON
        self.sock.sendto(coap_message(reply_type, CONTENT, mid, token, options, cbor2.dumps(0)),
                         peer)
        return observe == 0

    def _run(self) -> None:
        token, peer = b"", None
        while not self._stop.is_set() and not self.registered.is_set():
            received = self._receive()
            if received is not None and self._answer(*received):
                token, peer = received[0][3], received[1]
                self.registered.set()
        while not self._stop.is_set() and not self.go.wait(0.05):
            pass
        if peer is None:
            return
        batch = max(1, self.rate // 200)  # one batch every 5 ms
        total = int(self.rate * self.seconds)
        started = time.perf_counter()
        while self.sent < total and not self._stop.is_set():
            for _ in range(batch):
                self.sent += 1
                options = [(OPT_OBSERVE, uint_option(self.sent + 1)),
                           (OPT_CONTENT_FORMAT, uint_option(CF_CBOR))]
                message = coap_message(NON, CONTENT, self.sent & 0xFFFF, token, options,
                                       cbor2.dumps(self.sent))
                with contextlib.suppress(OSError):  # a full socket buffer drops, like a network
                    self.sock.sendto(message, peer)
            # Pacing a sender (not waiting for a condition): sleep to the next batch time.
            ahead = started + self.sent / self.rate - time.perf_counter()
            if ahead > 0:
                time.sleep(ahead)
        self.flooded.set()
        while not self._stop.is_set():  # deregistrations, re-registrations
            received = self._receive()
            if received is not None:
                self._answer(*received)


@pytest.fixture
def flooder(request: pytest.FixtureRequest) -> Iterator[Flooder]:
    sensor = Flooder(rate=getattr(request, "param", 10_000))
    sensor.start()
    try:
        yield sensor
    finally:
        sensor.stop()


# --- helpers ----------------------------------------------------------------------------------


@pytest_asyncio.fixture
async def setup(
    sensors: SimulatedSensors, hostile: HostileSensor, make_gateway: Any
) -> AsyncIterator[Setup]:
    config = gateway_config(sensors)
    config["policy"]["allow"] += [f"coap://127.0.0.1:{hostile.port}/*", "coap://127.0.0.1:*/*"]
    gateway: Gateway = await make_gateway(config)
    # A client watching a healthy sensor throughout, and one for the hostile sensor. Both
    # accept frames of any size and buffer any number of them: what the gateway sends is
    # under test, not the clients (a client whose buffer is full stops reading, and then
    # its close waits for the close timeout).
    healthy = Client(await connect(gateway.url, compression=None, open_timeout=WAIT,
                                   max_size=None, max_queue=None))
    victim = Client(await connect(gateway.url, compression=None, open_timeout=WAIT,
                                  max_size=None, max_queue=None))
    try:
        healthy_sub = (await healthy.subscribe(name="temperature"))["sub"]
        await healthy.next_notify()
        yield Setup(gateway, hostile, healthy, healthy_sub, victim)
    finally:
        await healthy.close()
        await victim.close()


@dataclass
class Setup:
    gateway: Gateway
    hostile: HostileSensor
    healthy: Client
    healthy_sub: str
    victim: Client

    async def assert_unaffected(self) -> None:
        """The healthy client still gets fresh updates and the gateway answers pings."""
        sub = self.healthy_sub
        before = max(
            (f["seq"] for f in self.healthy.seen if f["type"] == "notify" and f["sub"] == sub),
            default=0,
        )
        notify = await self.healthy.wait_for(
            lambda f: f["type"] == "notify" and f["sub"] == sub and f["seq"] > before
        )
        assert "decode_error" not in notify and isinstance(notify["value"], float)
        assert (await self.healthy.call({"type": "ping"}))["type"] == "pong"
        assert (await self.victim.call({"type": "ping"}))["type"] == "pong"
        # What the gateway holds stays within its bounds (memory figures: `make bench`).
        limits = self.gateway.config.limits
        for conn in self.gateway.ws.connections:
            waiting = conn.outbox.pending_bytes + conn.ws.transport.get_write_buffer_size()
            assert waiting <= limits.max_pending_bytes + limits.max_upstream_bytes * 2
        history = self.gateway.hub.history
        assert history.bytes <= history.max_bytes


def is_update(sub: str) -> Callable[[dict[str, Any]], bool]:
    return lambda f: f.get("sub") == sub and f["type"] in ("notify", "status")


# --- the tests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "payload", "cf", "message"),
    [
        ("invalid-cbor", INVALID_CBOR, CF_CBOR, "invalid CBOR"),
        ("deep-cbor", DEEP_CBOR, CF_CBOR, "nesting depth"),
        ("senml-200k", senml_cbor(200_000), CF_SENML_CBOR, f"more than {MAX_SENML_RECORDS}"),
        ("bad-utf8", BAD_UTF8, CF_TEXT, "not UTF-8"),
    ],
)
async def test_undecodable_notifications_give_decode_error_and_the_observation_survives(
    setup: Setup, path: str, payload: bytes, cf: int, message: str
) -> None:
    uri = setup.hostile.uri(path)
    sub = (await setup.victim.subscribe(uri=uri))["sub"]
    first = await setup.victim.wait_for(lambda f: f.get("sub") == sub and f["type"] == "notify")
    assert first["cf"] == cf
    assert "value" not in first
    assert message in first["decode_error"]
    assert base64.b64decode(first["payload_b64"]) == payload  # block-wise: all of it
    await setup.assert_unaffected()

    # The observation goes on: a good notification after the bad one is delivered.
    res = setup.hostile.resources[path]
    res.set(b"ok" if cf == CF_TEXT else cbor2.dumps([{0: "x", 2: 1.5}]), cf)
    after = await setup.victim.wait_for(lambda f: f.get("sub") == sub and f["type"] == "notify")
    assert after["seq"] > first["seq"]
    assert "decode_error" not in after, after
    if cf == CF_TEXT:
        assert after["value"] == "ok"
    elif cf == CF_CBOR:
        assert after["value"] == [{"0": "x", "2": 1.5}]
    else:
        assert [(r["n"], r["v"]) for r in after["value"]] == [("x", 1.5)]
    # And the bad one again, so that decoding errors do not accumulate state.
    res.set(payload, cf)
    again = await setup.victim.wait_for(lambda f: f.get("sub") == sub and f["type"] == "notify")
    assert message in again["decode_error"]
    await setup.assert_unaffected()


async def test_undecodable_request_answers_give_decode_error(setup: Setup) -> None:
    for path, message in [("invalid-cbor", "invalid CBOR"), ("deep-cbor", "nesting depth"),
                          ("bad-utf8", "not UTF-8"), ("senml-200k", "records")]:
        reply = await setup.victim.call(
            {"type": "request", "method": "GET", "uri": setup.hostile.uri(path), "timeout": 30}
        )
        assert reply["type"] == "response", reply
        assert reply["code"] == "2.05"
        assert message in reply["decode_error"]
        assert base64.b64decode(reply["payload_b64"]) == setup.hostile.resources[path].payload
    await setup.assert_unaffected()


MILLION = senml_cbor(1_000_000)
LIMIT = 1_048_576
"""[limits] max_upstream_bytes, by default."""


async def test_a_million_record_senml_request_is_refused_by_size(setup: Setup) -> None:
    # 3 MB: a million records of 3 bytes, far beyond [limits] max_upstream_bytes (1 MiB).
    assert len(MILLION) > LIMIT
    res = setup.hostile.resources["senml-million"]
    reply = await setup.victim.call(
        {"type": "request", "method": "GET", "uri": setup.hostile.uri("senml-million"),
         "timeout": 30},
        timeout=40,
    )
    assert reply["type"] == "error", {k: str(v)[:80] for k, v in reply.items()}
    assert reply["error"] == "upstream_error"
    assert "1048576" in reply["message"] or "1 048 576" in reply["message"]
    # The gateway stopped at the first block past the limit, not after the 3 MB.
    assert LIMIT < res.bytes_served <= LIMIT + BLOCK_SIZE
    await setup.assert_unaffected()


async def test_a_million_record_senml_notification_is_refused_by_size(setup: Setup) -> None:
    res = setup.hostile.resources["senml-million"]
    sub = (await setup.victim.subscribe(uri=setup.hostile.uri("senml-million")))["sub"]
    # Once the gateway has taken more than the limit, the subscriber must hear about it
    # promptly (not after the rest of the 3 MB).
    async with asyncio.timeout(WAIT):
        await res.served_past_limit.wait()
    # The sensor answers: status online (the first answer of an observation), then the
    # notify for the representation.
    update = await setup.victim.wait_for(
        lambda f: is_update(sub)(f) and not (f["type"] == "status" and f["state"] == "online"),
        timeout=5,
    )
    # Not the 3 MB: a notify without the payload saying it is too large.
    assert "payload_b64" not in update, {k: str(v)[:80] for k, v in update.items()}
    text = update.get("reason", "") + update.get("decode_error", "")
    assert "larger than" in text or "too large" in text, update
    assert update["type"] == "notify" and "value" not in update, update
    assert str(LIMIT) in update["decode_error"] and update["cf"] == CF_SENML_CBOR
    assert res.bytes_served <= LIMIT + BLOCK_SIZE
    # A client that subscribes later gets the same explanation as the cached value.
    late = Client(await connect(setup.gateway.url, compression=None, open_timeout=WAIT))
    try:
        await late.subscribe(uri=setup.hostile.uri("senml-million"))
        cached = await late.next_notify(sub)
        assert cached["seq"] == update["seq"] and cached["decode_error"] == update["decode_error"]
    finally:
        await late.close()
    await setup.assert_unaffected()


@dataclass
class Flood:
    """What one flood did: counts taken while it lasted."""

    sent: int
    victim_updates: int
    ticks_sent: int
    """Notifications the ticker sensor sent during the flood."""
    ticks_reached_gateway: int
    """How many of them the gateway took in (its ``seq`` counts them, even those that the
    outbox then coalesced for a client)."""
    ticks_received: int
    healthy_notifies: int
    pings_sent: int
    """Pings the healthy client sent while the flood lasted."""
    pongs_during: int
    """Their pongs that arrived while the flood lasted."""
    kernel_drops: int


def udp_receive_buffer_errors() -> int:
    """The host's count of UDP datagrams dropped because a socket's buffer was full."""
    with open("/proc/net/snmp") as snmp:
        rows = [line.split() for line in snmp if line.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")])


async def run_flood(setup: Setup, flooder: Flooder) -> Flood:
    """Flood the victim's subscription while the healthy client watches two healthy sensors:
    the simulated temperature and a ticker on the aiocoap sensor that notifies every 20 ms
    (each tick numbered, so that losses can be counted exactly)."""
    loop = asyncio.get_running_loop()
    ticker = setup.hostile.resources["ticker"]
    tick_sub = (await setup.healthy.subscribe(uri=setup.hostile.uri("ticker")))["sub"]
    first_tick = await setup.healthy.wait_for(
        lambda f: f.get("sub") == tick_sub and f["type"] == "notify"
    )
    tick_seqs = [first_tick["seq"]]
    flood_sub = (await setup.victim.subscribe(uri=f"coap://127.0.0.1:{flooder.port}/flood"))[
        "sub"
    ]
    # Wait on the flooder's threading events without blocking the loop.
    assert await loop.run_in_executor(None, flooder.registered.wait, WAIT)

    counts = {"victim": 0, "healthy": 0}
    ticks: set[int] = set()
    last_tick = [math.inf]
    caught_up = asyncio.Event()
    pings_sent, pongs_during = [0], [0]

    async def drain(client: Client, key: str, sub: str) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for text in client.ws:
                frame = json.loads(text)
                if frame.get("sub") == sub and frame["type"] in ("notify", "status"):
                    counts[key] += 1
                if frame.get("sub") == tick_sub and "value" in frame:
                    ticks.add(frame["value"])
                    tick_seqs.append(frame["seq"])
                    if frame["value"] >= last_tick[0]:
                        caught_up.set()
                if frame["type"] == "pong" and not flooder.flooded.is_set():
                    pongs_during[0] += 1

    async def tick() -> int:
        # A sensor that changes every 20 ms: pacing a producer, not waiting for a condition.
        number = 0
        while not flooder.flooded.is_set():
            number += 1
            ticker.set(cbor2.dumps(number), CF_CBOR)
            await asyncio.sleep(0.02)
        return number

    readers = [
        asyncio.create_task(drain(setup.victim, "victim", flood_sub)),
        asyncio.create_task(drain(setup.healthy, "healthy", setup.healthy_sub)),
    ]
    drops_before = udp_receive_buffer_errors()
    ticker_task = asyncio.create_task(tick())
    rendered_before = ticker.notifications_rendered
    flooder.go.set()
    try:
        started = loop.time()
        flooded = loop.run_in_executor(None, flooder.flooded.wait, 3 * WAIT)
        # While the flood lasts the healthy client pings every 0.2 s.
        while not flooder.flooded.is_set() and loop.time() - started < 3 * WAIT:
            await setup.healthy.send({"type": "ping", "id": str(loop.time())})
            pings_sent[0] += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(flooded), 0.2)
        assert await flooded
        ticks_sent = ticker.notifications_rendered - rendered_before
        # The last tick may still be in flight (or lost): wait for it a little, bounded.
        last_tick[0] = await ticker_task
        if max(ticks, default=0) >= last_tick[0]:
            caught_up.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(caught_up.wait(), 1.0)
        return Flood(
            sent=flooder.sent,
            victim_updates=counts["victim"],
            ticks_sent=ticks_sent,
            ticks_reached_gateway=max(tick_seqs) - tick_seqs[0],
            ticks_received=len(ticks),
            healthy_notifies=counts["healthy"],
            pings_sent=pings_sent[0],
            pongs_during=pongs_during[0],
            kernel_drops=udp_receive_buffer_errors() - drops_before,
        )
    finally:
        ticker_task.cancel()
        for reader in readers:
            reader.cancel()
        await asyncio.gather(ticker_task, *readers, return_exceptions=True)


async def test_a_flood_of_notifications(flooder: Flooder, setup: Setup) -> None:
    # (flooder first: it must outlive the gateway, which deregisters at its teardown)
    flood = await run_flood(setup, flooder)
    print(f"\n{flood}")
    assert flood.sent == 20_000  # 10 000 per second for 2 s
    assert flood.victim_updates > 0
    # The gateway kept answering and the healthy sensors kept getting through.
    assert flood.pongs_during >= max(1, flood.pings_sent // 2), flood
    assert flood.healthy_notifies >= 3, flood
    assert flood.ticks_received >= 3, flood
    # Afterwards both clients are served normally (the victim may have been closed as a slow
    # consumer, which is the documented answer to a client that cannot keep up).
    await setup.assert_unaffected()
    if setup.victim.ws.close_code is not None:
        assert setup.victim.ws.close_code == 1008


@pytest.mark.parametrize("flooder", [20_000], indirect=True)  # sure to overload this gateway
async def test_a_flood_does_not_cost_other_sensors_their_notifications(
    flooder: Flooder, setup: Setup
) -> None:
    flood = await run_flood(setup, flooder)
    print(f"\n{flood}")
    # Reading the shared socket in batches (translator/coap/batch.py) keeps it drained, so the
    # kernel drops little and a healthy sensor's notifications get through: on a machine of
    # its own at least 90 % (reading one datagram per loop turn, 15-45 % were lost here). When
    # other processes take the CPU, no reader drains a 20 000/s flood and the kernel drops a
    # share of every sender's datagrams alike; the gateway must lose no more of the healthy
    # sensor's than that share (how fast it drains is `make bench`'s to measure).
    lost = 1 - flood.ticks_reached_gateway / flood.ticks_sent
    dropped = flood.kernel_drops / (flood.sent + flood.ticks_sent)
    assert lost <= dropped + 0.1, (f"{lost:.0%} of the ticks lost, {dropped:.0%} of all "
                                   f"datagrams dropped by the kernel", flood)
