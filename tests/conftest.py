"""Shared fixtures: real simulated sensors, a real gateway and real WebSocket clients.

Everything binds port 0 on loopback and reads the real port back. Waiting is always on an
event or a frame, bounded by generous timeouts, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import os
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import cbor2
import jsonschema
import pytest
import pytest_asyncio
import yaml
from referencing import Registry
from referencing.jsonschema import DRAFT7
from websockets.asyncio.client import ClientConnection, connect

from translator.config import config_from_mapping
from translator.gateway import Gateway
from translator.sim import SimulatedSensors

WAIT = 10.0
"""Seconds any single wait in a test may take before it fails."""


def handshake_request(port: int, path: str = "/ws") -> bytes:
    """A client's WebSocket opening handshake (RFC 6455 §4.1), for tests that speak the
    protocol over a bare TCP stream."""
    key = base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()


ASYNCAPI = Path(__file__).resolve().parent.parent / "docs" / "asyncapi.yaml"
"""The machine-readable protocol description; every frame a `Client` receives must fit it."""
ASYNCAPI_URI = "urn:coap-ws-gateway:asyncapi"


@functools.cache
def asyncapi_document() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(ASYNCAPI.read_text(encoding="utf-8"))
    return document


@functools.cache
def asyncapi_validator(schema_name: str) -> jsonschema.Draft7Validator:
    """A compiled validator for `#/components/schemas/<schema_name>` of docs/asyncapi.yaml.

    The whole document is registered as one resource, so that the schemas' `$ref`s into
    `#/components/schemas/...` resolve. AsyncAPI 3.0 schemas extend JSON Schema Draft 7.
    """
    registry: Registry[Any] = Registry().with_resource(
        ASYNCAPI_URI, DRAFT7.create_resource(asyncapi_document())
    )
    schema = {"$ref": f"{ASYNCAPI_URI}#/components/schemas/{schema_name}"}
    return jsonschema.Draft7Validator(schema, registry=registry)


GATEWAY_FRAME_SCHEMAS = {
    "subscribed": "Subscribed", "unsubscribed": "Unsubscribed", "response": "Response",
    "resources": "Resources", "pong": "Pong", "notify": "Notify", "status": "Status",
    "error": "Error", "catalog": "Catalog",
}
"""Gateway frame type -> its schema. The hook picks the schema by `type` rather than
validating against the `GatewayFrame` union: the same verdict (each branch has its own
`type` const), but one schema's errors instead of all eight branches' (test_asyncapi checks
the union itself)."""


def check_gateway_frame(frame: Any) -> None:
    """Fail the test unless `frame` fits docs/asyncapi.yaml, naming the frame and why."""
    frame_type = frame.get("type") if isinstance(frame, dict) else None
    schema_name = GATEWAY_FRAME_SCHEMAS.get(frame_type) if isinstance(frame_type, str) else None
    if schema_name is None:
        pytest.fail(f"the gateway sent a frame of no type docs/asyncapi.yaml knows: {frame!r}")
    error = jsonschema.exceptions.best_match(asyncapi_validator(schema_name).iter_errors(frame))
    if error is not None:
        text = json.dumps(frame, ensure_ascii=False)
        shown = text if len(text) <= 2000 else f"{text[:2000]}... ({len(text)} characters)"
        path = "/".join(str(part) for part in error.absolute_path) or "(the frame)"
        pytest.fail(
            f"the gateway sent a frame that docs/asyncapi.yaml ({schema_name}) does not admit:"
            f"\n  {shown}\n  at {path}: {error.message}"
        )


CBOR_SUBPROTOCOL = "coap-ws-gateway.v1.cbor"


def json_mappable(item: Any) -> Any:
    """A CBOR-decoded frame as the schema can check it: byte strings, tags and integers
    beyond JSON's range stand in as the strings of their repr (`value` admits any type)."""
    if isinstance(item, dict):
        return {key: json_mappable(value) for key, value in item.items()}
    if isinstance(item, list):
        return [json_mappable(value) for value in item]
    if isinstance(item, bytes | cbor2.CBORTag):
        return repr(item)
    return item


class Client:
    """A test WebSocket client that reads frames (JSON, or CBOR on a connection opened with
    the CBOR subprotocol) and waits for matching ones."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.cbor = ws.subprotocol == CBOR_SUBPROTOCOL
        self._next_id = 0
        self.seen: list[dict[str, Any]] = []
        self.wire_sizes: list[int] = []
        """The size of each message received (after decompression), in order."""

    async def send(self, frame: dict[str, Any] | str | bytes) -> None:
        if isinstance(frame, str | bytes):
            await self.ws.send(frame)
        else:
            await self.ws.send(cbor2.dumps(frame) if self.cbor else json.dumps(frame))

    async def recv(self, timeout: float = WAIT) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            message = await self.ws.recv()
        self.wire_sizes.append(len(message))
        frame: dict[str, Any]
        if self.cbor:
            assert isinstance(message, bytes), f"a text frame on a CBOR connection: {message!r}"
            frame = cbor2.loads(message)
        else:
            assert isinstance(message, str), f"a binary frame on a JSON connection: {message!r}"
            frame = json.loads(message)
        # Every frame an end-to-end test receives is checked against the protocol's
        # machine-readable description, so that docs/asyncapi.yaml cannot drift from the code.
        check_gateway_frame(json_mappable(frame) if self.cbor else frame)
        self.seen.append(frame)
        return frame

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = WAIT
    ) -> dict[str, Any]:
        """The next frame that matches; frames before it are kept in `seen`."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout=timeout)
                if predicate(frame):
                    return frame

    async def call(self, frame: dict[str, Any], timeout: float = WAIT) -> dict[str, Any]:
        """Send a frame with a fresh id and return the reply carrying that id."""
        self._next_id += 1
        frame_id = f"t{self._next_id}"
        await self.send({**frame, "id": frame_id})
        return await self.wait_for(lambda f: f.get("id") == frame_id, timeout)

    async def subscribe(self, **target: str) -> dict[str, Any]:
        reply = await self.call({"type": "subscribe", **target})
        assert reply["type"] == "subscribed", reply
        return reply

    async def next_notify(self, sub: str | None = None, timeout: float = WAIT) -> dict[str, Any]:
        return await self.wait_for(
            lambda f: f["type"] == "notify" and (sub is None or f["sub"] == sub), timeout
        )

    async def close(self) -> None:
        await self.ws.close()


@pytest_asyncio.fixture
async def sensors() -> AsyncIterator[SimulatedSensors]:
    sim = SimulatedSensors("127.0.0.1", 0, interval=0.05, seed=1)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


def gateway_config(sensors: SimulatedSensors, **server: Any) -> dict[str, Any]:
    base = sensors.base_uri
    return {
        "server": {"host": "127.0.0.1", "port": 0, "linger": 0, **server},
        "sensors": [
            {"name": "temperature", "uri": f"{base}/temperature"},
            {"name": "humidity", "uri": f"{base}/humidity"},
            {"name": "status", "uri": f"{base}/status"},
            {"name": "led", "uri": f"{base}/led"},
        ],
        "policy": {"allow": [f"{base}/*"]},
    }


@pytest_asyncio.fixture
async def make_gateway() -> AsyncIterator[Callable[[dict[str, Any]], Any]]:
    started: list[Gateway] = []

    async def make(mapping: dict[str, Any]) -> Gateway:
        gateway = Gateway(config_from_mapping(mapping))
        await gateway.start()
        started.append(gateway)
        return gateway

    try:
        yield make
    finally:
        for gateway in started:
            await gateway.stop()


@pytest_asyncio.fixture
async def gateway(sensors: SimulatedSensors, make_gateway: Any) -> Gateway:
    gw: Gateway = await make_gateway(gateway_config(sensors))
    return gw


@pytest_asyncio.fixture
async def make_client() -> AsyncIterator[Callable[[str], Any]]:
    clients: list[Client] = []

    async def make(url: str, **options: Any) -> Client:
        """`options` go to websockets' connect(): `subprotocols`, `compression`, ..."""
        ws = await connect(url, **{"compression": None, "open_timeout": WAIT, **options})
        client = Client(ws)
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            await client.close()


@pytest_asyncio.fixture
async def client(gateway: Gateway, make_client: Any) -> Client:
    c: Client = await make_client(gateway.url)
    return c


@pytest.fixture
def silent_udp_port() -> Iterator[int]:
    """A bound UDP port that never answers (a sensor that is up but mute)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


@pytest.fixture
def closed_udp_port() -> int:
    """A UDP port with nothing bound to it (ICMP port unreachable on loopback)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port
