"""Block-wise transfers (RFC 7959) of client requests, and ``[limits] max_upstream_bytes``
for whatever the gateway takes from a sensor, end to end.

A test-local aiocoap sensor on loopback, behind a gateway whose limit is 2048 bytes:

- ``/sink`` takes a PUT payload in Block1 blocks itself, and records the blocks;
- ``/echo`` answers a POST with its payload reversed (aiocoap's own server assembles the
  Block1 request and serves the answer in Block2 blocks);
- ``/announced`` is an observable 3000-byte representation served block-wise, which announces
  its size in Size2 when the request asks for it (Size2 = 0), as RFC 7959 §4 has it;
- ``/flipping`` (2000 bytes) changes once while its blocks are fetched;
- ``/unobservable`` is a 3000-byte representation without Observe and with Max-Age 0 (the
  gateway polls it every ``poll_min``).

Every wait is on a frame or an event, with generous bounds.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from typing import Any

import aiocoap
import pytest_asyncio
from aiocoap import resource
from aiocoap.numbers.codes import Code

from translator.gateway import Gateway
from translator.sim import _bound_port

from .conftest import WAIT, Client

LIMIT = 2048
BLOCK = 1024


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def serve_block(request: Any, data: bytes, etag: bytes, code: Any = Code.CONTENT) -> Any:
    """The block of `data` that `request` asks for (block 0 when it asks for none)."""
    block2 = request.opt.block2
    number, exponent = (0, 6) if block2 is None else (block2.block_number,
                                                       min(block2.size_exponent, 6))
    size = 1 << (exponent + 4)
    start = number * size
    return aiocoap.Message(
        code=code,
        payload=data[start:start + size],
        block2=(number, start + size < len(data), exponent),
        etag=etag,
        content_format=42,
    )


class Sink(resource.Resource):  # type: ignore[misc]  # aiocoap is untyped
    """Takes PUT payloads in Block1 blocks (RFC 7959 §2.5) and records the block numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks: list[int | None] = []
        self.received = b""
        self._assembly = bytearray()

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        return False

    async def render_put(self, request: Any) -> Any:
        block1 = request.opt.block1
        self.blocks.append(None if block1 is None else block1.block_number)
        if block1 is None:
            self.received = bytes(request.payload)
            return aiocoap.Message(code=Code.CHANGED)
        if block1.block_number == 0:
            self._assembly = bytearray()
        assert block1.start == len(self._assembly)
        self._assembly += request.payload
        if block1.more:
            return aiocoap.Message(code=Code.CONTINUE, block1=block1)
        self.received = bytes(self._assembly)
        return aiocoap.Message(code=Code.CHANGED, block1=block1)


class Echo(resource.Resource):  # type: ignore[misc]
    """POST answers 2.04 with the payload reversed (aiocoap does the blocks both ways)."""

    async def render_post(self, request: Any) -> Any:
        return aiocoap.Message(code=Code.CHANGED, payload=bytes(request.payload)[::-1],
                               content_format=42)


class Announced(resource.ObservableResource):  # type: ignore[misc]
    """3000 bytes, block-wise, with Size2 in every block when the request asks for it."""

    DATA = b"a" * 3000

    def __init__(self) -> None:
        super().__init__()
        self.later_blocks: list[int] = []
        """Block numbers other than 0 asked for."""
        self.size_asked = 0
        """Requests that carried Size2 = 0."""

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        return False

    async def render_get(self, request: Any) -> Any:
        block2 = request.opt.block2
        if block2 is not None and block2.block_number > 0:
            self.later_blocks.append(block2.block_number)
        message = serve_block(request, self.DATA, b"v1")
        if request.opt.size2 == 0:
            self.size_asked += 1
            message.opt.size2 = len(self.DATA)
        return message


class Flipping(resource.Resource):  # type: ignore[misc]
    """2000 bytes that change (another ETag) right after block 0 is first served."""

    def __init__(self) -> None:
        super().__init__()
        self.version = 1
        self.flipped = False
        self.served: list[tuple[int, int]] = []

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        return False

    def _serve(self, request: Any, code: Any) -> Any:
        message = serve_block(request, bytes([self.version]) * 2000, bytes([self.version]), code)
        self.served.append((self.version, message.opt.block2.block_number))
        if not self.flipped:
            self.flipped = True
            self.version += 1
        return message

    async def render_get(self, request: Any) -> Any:
        return self._serve(request, Code.CONTENT)

    async def render_post(self, request: Any) -> Any:
        return self._serve(request, Code.CHANGED)


class Unobservable(resource.Resource):  # type: ignore[misc]
    """3000 bytes without Observe; `first_blocks` counts the requests for block 0."""

    DATA = b"u" * 3000

    def __init__(self) -> None:
        super().__init__()
        self.first_blocks = 0
        self.served_first = asyncio.Event()

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        return False

    async def render_get(self, request: Any) -> Any:
        block2 = request.opt.block2
        if block2 is None or block2.block_number == 0:
            self.first_blocks += 1
            self.served_first.set()
        message = serve_block(request, self.DATA, b"u1")
        message.opt.max_age = 0  # polled every poll_min
        return message


class Sensor:
    def __init__(self, context: Any, port: int) -> None:
        self.context = context
        self.base = f"coap://127.0.0.1:{port}"
        self.sink = Sink()
        self.echo = Echo()
        self.announced = Announced()
        self.flipping = Flipping()
        self.unobservable = Unobservable()


@pytest_asyncio.fixture
async def sensor() -> AsyncIterator[Sensor]:
    site = resource.Site()
    context = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", 0), transports=["udp6"]
    )
    made = Sensor(context, _bound_port(context))
    for path in ("sink", "echo", "announced", "flipping", "unobservable"):
        site.add_resource([path], getattr(made, path))
    try:
        yield made
    finally:
        await context.shutdown()


@pytest_asyncio.fixture
async def client(sensor: Sensor, make_gateway: Any, make_client: Any) -> Client:
    gateway: Gateway = await make_gateway({
        "server": {"host": "127.0.0.1", "port": 0, "linger": 0},
        "policy": {"allow": [f"{sensor.base}/*"]},
        "limits": {"max_upstream_bytes": LIMIT},
        "supervision": {"poll_min": 0.05, "backoff_min": 0.05, "registration_timeout": 2.0},
    })
    made: Client = await make_client(gateway.url)
    return made


async def request(client: Client, method: str, uri: str, payload: bytes | None = None
                  ) -> dict[str, Any]:
    frame: dict[str, Any] = {"type": "request", "method": method, "uri": uri, "timeout": WAIT}
    if payload is not None:
        frame["payload_b64"] = b64(payload)
    return await client.call(frame, timeout=2 * WAIT)


async def test_a_request_payload_larger_than_a_message_goes_in_block1_blocks(
    sensor: Sensor, client: Client
) -> None:
    data = bytes(range(256)) * 12  # 3072 bytes: three blocks of 1024
    reply = await request(client, "PUT", f"{sensor.base}/sink", data)
    assert reply["type"] == "response" and reply["code"] == "2.04", reply
    assert sensor.sink.received == data
    assert sensor.sink.blocks == [0, 1, 2]


async def test_block1_request_with_a_block2_answer_within_and_beyond_the_limit(
    sensor: Sensor, client: Client
) -> None:
    data = bytes(range(250)) * 6  # 1500 bytes out in Block1, 1500 back in Block2
    reply = await request(client, "POST", f"{sensor.base}/echo", data)
    assert reply["type"] == "response" and reply["code"] == "2.04", reply
    assert base64.b64decode(reply["payload_b64"]) == data[::-1]

    too_big = b"b" * 3000  # the answer would be 3000 bytes
    reply = await request(client, "POST", f"{sensor.base}/echo", too_big)
    assert reply["type"] == "error" and reply["error"] == "upstream_error", reply
    assert f"max_upstream_bytes ({LIMIT} bytes)" in reply["message"]


async def test_a_size2_beyond_the_limit_is_refused_before_fetching_more_blocks(
    sensor: Sensor, client: Client
) -> None:
    uri = f"{sensor.base}/announced"
    reply = await request(client, "GET", uri)
    assert reply["type"] == "error" and reply["error"] == "upstream_error", reply
    assert reply["message"] == (
        f"{uri}: representation larger than max_upstream_bytes ({LIMIT} bytes): "
        "3000 bytes announced in Size2"
    )
    # A subscriber is told in a notify, without payload.
    sub = (await client.subscribe(uri=uri))["sub"]
    notify = await client.next_notify(sub)
    assert "payload_b64" not in notify and "value" not in notify
    assert notify["decode_error"] == (
        f"representation larger than max_upstream_bytes ({LIMIT} bytes): "
        "3000 bytes or more; dropped"
    )
    assert notify["cf"] == 42 and notify["seq"] == 1
    # The gateway asked for the size and believed it: no block after the first was fetched.
    assert sensor.announced.size_asked >= 2
    assert sensor.announced.later_blocks == []


async def test_a_changing_representation_restarts_a_get_but_fails_a_post(
    sensor: Sensor, client: Client
) -> None:
    uri = f"{sensor.base}/flipping"
    reply = await request(client, "GET", uri)
    assert reply["type"] == "response" and reply["code"] == "2.05", reply
    assert base64.b64decode(reply["payload_b64"]) == b"\x02" * 2000  # never half and half
    assert sensor.flipping.served == [(1, 0), (2, 1), (2, 0), (2, 1)]

    sensor.flipping.flipped = False
    reply = await request(client, "POST", uri)
    assert reply["type"] == "error" and reply["error"] == "upstream_error", reply
    assert "changed during the block-wise transfer" in reply["message"]


async def test_a_polled_representation_beyond_the_limit_is_told_once(
    sensor: Sensor, client: Client
) -> None:
    resource_ = sensor.unobservable
    sub = (await client.subscribe(uri=f"{sensor.base}/unobservable"))["sub"]
    notify = await client.next_notify(sub)
    assert "3000 bytes or more; dropped" in notify["decode_error"]
    assert "payload_b64" not in notify
    # Two more polls, each too large again: the same answer, so no second notify. (The
    # third request for block 0 is made only after the second poll was taken in.)
    async with asyncio.timeout(WAIT):
        while resource_.first_blocks < 3:
            resource_.served_first.clear()
            await resource_.served_first.wait()
    assert (await client.call({"type": "ping"}))["type"] == "pong"
    frames = [f for f in client.seen if f.get("sub") == sub]
    assert [f["type"] for f in frames] == ["subscribed", "status", "notify"], frames
    entry = next(e for e in (await client.call({"type": "list"}))["resources"]
                 if e.get("sub") == sub)
    assert entry["state"] == "online" and entry["notifications"] == 1
    assert entry["registrations"] == 1
