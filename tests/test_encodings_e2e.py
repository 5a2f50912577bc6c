"""Encodings end to end: real websockets clients with each subprotocol, with and without
permessage-deflate and compact frames, against a real gateway and real aiocoap sensors."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource as resource
import cbor2
import pytest
import pytest_asyncio
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import InvalidStatus

from tests.conftest import CBOR_SUBPROTOCOL, WAIT, Client, gateway_config
from translator.gateway import Gateway
from translator.sim import SimulatedSensors, _bound_port

JSON_SUBPROTOCOL = "coap-ws-gateway.v1.json"
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "cbor_client.py"
CF_JSON, CF_CBOR, CF_SENML_CBOR = 50, 60, 112

# A CBOR item that the JSON mapping cannot carry: a tag of no known meaning around a byte
# string, an integer beyond 64 bits (a bignum), and a plain byte string.
EXOTIC = cbor2.dumps([cbor2.CBORTag(40001, b"\x00\xff"), 2**70, -(2**65), b"raw"])
SENML_PACK = cbor2.dumps([
    {-2: "urn:dev:ow:10e2073a01080063:", 0: "temp", 1: "Cel", 2: 21.5},
    {0: "hum", 1: "%RH", 2: 40.25},
])


class Settable(resource.ObservableResource):  # type: ignore[misc]  # aiocoap is untyped
    """An observable resource whose payload and content-format the test sets."""

    def __init__(self, payload: bytes, cf: int) -> None:
        super().__init__()
        self.payload, self.cf = payload, cf

    def set(self, payload: bytes, cf: int | None = None) -> None:
        self.payload, self.cf = payload, self.cf if cf is None else cf
        self.updated_state()

    async def render_get(self, request: Any) -> aiocoap.Message:
        return aiocoap.Message(payload=self.payload, content_format=self.cf)


class Device:
    def __init__(self, port: int, resources: dict[str, Settable]) -> None:
        self.port = port
        self.resources = resources

    def uri(self, path: str) -> str:
        return f"coap://127.0.0.1:{self.port}/{path}"


@pytest_asyncio.fixture
async def device() -> AsyncIterator[Device]:
    resources = {
        "exotic": Settable(EXOTIC, CF_CBOR),
        "senml": Settable(SENML_PACK, CF_SENML_CBOR),
        "counter": Settable(cbor2.dumps(0), CF_CBOR),
    }
    site = resource.Site()
    for path, res in resources.items():
        site.add_resource([path], res)
    context = await aiocoap.Context.create_server_context(
        site, bind=("127.0.0.1", 0), transports=["udp6"]
    )
    try:
        yield Device(_bound_port(context), resources)
    finally:
        await context.shutdown()


def config_with(sensors: SimulatedSensors, device: Device, **server: Any) -> dict[str, Any]:
    mapping = gateway_config(sensors, **server)
    mapping["policy"]["allow"].append(f"coap://127.0.0.1:{device.port}/*")
    return mapping


async def cbor_client(make_client: Any, gateway: Gateway, **options: Any) -> Client:
    client: Client = await make_client(gateway.url, subprotocols=[CBOR_SUBPROTOCOL], **options)
    assert client.ws.subprotocol == CBOR_SUBPROTOCOL
    assert client.cbor
    return client


# --- negotiation ---------------------------------------------------------------------------------


async def test_no_subprotocol_and_the_json_one_both_get_json(
    gateway: Gateway, make_client: Any
) -> None:
    plain = await make_client(gateway.url)
    named = await make_client(gateway.url, subprotocols=[JSON_SUBPROTOCOL])
    assert plain.ws.subprotocol is None
    assert named.ws.subprotocol == JSON_SUBPROTOCOL
    for client in (plain, named):
        assert (await client.call({"type": "ping"}))["type"] == "pong"


async def test_only_unknown_subprotocols_get_400_naming_the_supported_ones(
    gateway: Gateway, make_client: Any
) -> None:
    with pytest.raises(InvalidStatus) as caught:
        await make_client(gateway.url, subprotocols=["mqtt", "coap-ws-gateway.v9.cbor"])
    response = caught.value.response
    assert response.status_code == 400
    body = response.body.decode()
    assert JSON_SUBPROTOCOL in body and CBOR_SUBPROTOCOL in body


async def test_a_cbor_client_talks_in_cbor_maps_both_ways(
    gateway: Gateway, make_client: Any
) -> None:
    client = await cbor_client(make_client, gateway)
    reply = await client.subscribe(name="temperature")
    notify = await client.next_notify(reply["sub"])
    assert notify["cf"] == CF_CBOR and isinstance(notify["value"], float)
    listing = await client.call({"type": "list"})
    assert listing["type"] == "resources" and listing["resources"]
    answer = await client.call({"type": "request", "method": "PUT", "name": "led",
                                "value": {"on": True}})
    assert answer["type"] == "response" and answer["code"].startswith("2.")


async def test_mismatched_frames_get_bad_request_in_the_connections_own_encoding(
    gateway: Gateway, make_client: Any
) -> None:
    cbor = await cbor_client(make_client, gateway)
    await cbor.send('{"type":"ping","id":1}')
    error = await cbor.recv()  # decoded as CBOR: the error came as a binary CBOR frame
    assert error["type"] == "error" and error["error"] == "bad_request"
    assert "text frames are not supported" in error["message"]
    assert (await cbor.call({"type": "ping"}))["type"] == "pong"  # still open

    plain = await make_client(gateway.url)
    await plain.send(cbor2.dumps({"type": "ping", "id": 1}))
    error = await plain.recv()
    assert error["error"] == "bad_request" and CBOR_SUBPROTOCOL in error["message"]
    assert (await plain.call({"type": "ping"}))["type"] == "pong"


# --- the sensor's CBOR data item, intact ----------------------------------------------------------


async def test_a_cbor_value_reaches_a_cbor_client_as_the_sensors_own_data_item(
    sensors: SimulatedSensors, device: Device, make_gateway: Any, make_client: Any
) -> None:
    gateway = await make_gateway(config_with(sensors, device))
    cbor = await cbor_client(make_client, gateway)
    plain = await make_client(gateway.url)
    for client in (cbor, plain):
        await client.subscribe(uri=device.uri("exotic"))
    got = await cbor.next_notify()
    assert got["value"] == cbor2.loads(EXOTIC)  # tag, bignums and bytes intact
    assert isinstance(got["value"][0], cbor2.CBORTag) and got["value"][1] == 2**70
    # The JSON client gets the RFC 8949 §6.1 mapping: wide integers as strings.
    mapped = await plain.next_notify()
    assert mapped["value"][1] == str(2**70)
    # Also later updates (the fan-out path), and a request's response.
    device.resources["exotic"].set(EXOTIC + b"")
    device.resources["exotic"].updated_state()
    later = await cbor.wait_for(lambda f: f["type"] == "notify" and f["seq"] > got["seq"])
    assert later["value"] == cbor2.loads(EXOTIC)
    answer = await cbor.call({"type": "request", "method": "GET", "uri": device.uri("exotic")})
    assert answer["value"] == cbor2.loads(EXOTIC)


async def test_a_senml_cbor_pack_reaches_a_cbor_client_as_sent(
    sensors: SimulatedSensors, device: Device, make_gateway: Any, make_client: Any
) -> None:
    gateway = await make_gateway(config_with(sensors, device))
    cbor = await cbor_client(make_client, gateway)
    await cbor.subscribe(uri=device.uri("senml"))
    got = await cbor.next_notify()
    assert got["cf"] == CF_SENML_CBOR
    assert got["value"] == cbor2.loads(SENML_PACK)  # integer labels, base name unresolved


async def test_a_cbor_client_request_value_reaches_the_sensor(
    sensors: SimulatedSensors, gateway: Gateway, make_client: Any
) -> None:
    cbor = await cbor_client(make_client, gateway)
    for on in (True, False):
        answer = await cbor.call({"type": "request", "method": "PUT", "name": "led",
                                  "value": {"on": on}, "cf": CF_CBOR})
        assert answer["code"].startswith("2."), answer
        assert sensors.led_on is on


# --- compact frames ------------------------------------------------------------------------------


@pytest.mark.parametrize("subprotocols", [None, [CBOR_SUBPROTOCOL]])
async def test_compact_notifies_carry_only_what_changed(
    sensors: SimulatedSensors, device: Device, make_gateway: Any, make_client: Any,
    subprotocols: list[str] | None,
) -> None:
    gateway = await make_gateway(config_with(sensors, device))
    client = await make_client(gateway.url, subprotocols=subprotocols)
    full = await make_client(gateway.url, subprotocols=subprotocols)
    counter = device.resources["counter"]
    reply = await client.call({"type": "subscribe", "uri": device.uri("counter"),
                               "compact": True})
    await full.subscribe(uri=device.uri("counter"))
    sub = reply["sub"]
    first = await client.next_notify(sub)
    assert {"uri", "code", "cf", "max_age"} <= set(first)  # the first one is complete
    await full.next_notify(sub)
    counter.set(cbor2.dumps(1))
    second = await client.wait_for(lambda f: f["type"] == "notify" and f["seq"] > first["seq"])
    assert set(second) == {"type", "sub", "seq", "value", "ts"}
    assert second["value"] == 1
    reference = await full.wait_for(lambda f: f["type"] == "notify" and f["seq"] == second["seq"])
    assert {k: reference[k] for k in second} == second
    assert client.wire_sizes[-1] < full.wire_sizes[-1]
    # A change of content-format is said in the compact frame.
    counter.set(b"2", CF_JSON)
    third = await client.wait_for(lambda f: f["type"] == "notify" and f["seq"] > second["seq"])
    assert third["cf"] == CF_JSON and third["value"] == 2 and "uri" not in third
    # Subscribing again without compact turns it off.
    await client.call({"type": "subscribe", "uri": device.uri("counter")})
    counter.set(b"3")
    await client.wait_for(lambda f: f["type"] == "notify" and f["value"] == 3 and "uri" in f)


# --- compression ---------------------------------------------------------------------------------


class Counting(ClientConnection):
    """websockets' client connection, counting the bytes that arrive on the wire."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.wire_bytes = 0

    def data_received(self, data: bytes) -> None:
        self.wire_bytes += len(data)
        super().data_received(data)


async def _bytes_for_updates(client: Client, sensors: SimulatedSensors, updates: int) -> int:
    """Wire bytes `client` received for `updates` temperature notifies after the first."""
    reply = await client.subscribe(name="temperature")
    first = await client.next_notify(reply["sub"])
    ws = client.ws
    assert isinstance(ws, Counting)
    start = ws.wire_bytes
    last = first["seq"]
    while last < first["seq"] + updates:
        last = (await client.next_notify(reply["sub"]))["seq"]
    # Notifies only: the sensors' own walk moves temperature, nothing else is subscribed.
    return ws.wire_bytes - start


async def test_deflate_is_negotiated_and_shrinks_the_wire_bytes(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any
) -> None:
    gateway = await make_gateway(gateway_config(sensors, compression="deflate"))
    compressed = await make_client(gateway.url, compression="deflate", create_connection=Counting)
    plain = await make_client(gateway.url, create_connection=Counting)
    extensions = compressed.ws.response.headers.get("Sec-WebSocket-Extensions", "")
    assert "permessage-deflate" in extensions
    assert "Sec-WebSocket-Extensions" not in plain.ws.response.headers
    squeezed, full = await asyncio.gather(
        _bytes_for_updates(compressed, sensors, 20), _bytes_for_updates(plain, sensors, 20)
    )
    assert squeezed < full * 0.6, (squeezed, full)


async def test_deflate_with_cbor_and_compact_together(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any
) -> None:
    gateway = await make_gateway(gateway_config(sensors, compression="deflate"))
    client = await cbor_client(make_client, gateway, compression="deflate")
    reply = await client.call({"type": "subscribe", "name": "temperature", "compact": True})
    first = await client.next_notify(reply["sub"])
    second = await client.wait_for(lambda f: f["type"] == "notify" and f["seq"] > first["seq"])
    assert set(second) == {"type", "sub", "seq", "value", "ts"}


async def test_without_the_setting_a_client_offering_deflate_gets_plain_frames(
    gateway: Gateway, make_client: Any
) -> None:
    client = await make_client(gateway.url, compression="deflate")
    assert "Sec-WebSocket-Extensions" not in client.ws.response.headers
    assert not client.ws.protocol.extensions
    assert (await client.call({"type": "ping"}))["type"] == "pong"


async def test_a_compressed_slow_reader_still_gets_every_frame_in_order(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any
) -> None:
    """Frames that wait in the outbox go through websockets' send(), compressed too."""
    gateway = await make_gateway(gateway_config(sensors, compression="deflate"))
    client = await make_client(gateway.url, compression="deflate")
    reply = await client.subscribe(name="temperature")
    ids = [f"p{i}" for i in range(50)]
    for frame_id in ids:  # a burst of replies queued behind each other
        await client.send({"type": "ping", "id": frame_id})
    pongs: list[str] = []
    async with asyncio.timeout(WAIT):
        while len(pongs) < len(ids):
            frame = await client.recv()
            if frame["type"] == "pong":
                pongs.append(frame["id"])
    assert pongs == ids
    assert (await client.next_notify(reply["sub"]))["sub"] == reply["sub"]


# --- the example client --------------------------------------------------------------------------


async def test_the_cbor_client_example_follows_a_sensor(
    sensors: SimulatedSensors, make_gateway: Any
) -> None:
    gateway = await make_gateway(gateway_config(sensors, compression="deflate"))
    example = EXAMPLE
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(example), gateway.url, "temperature", "--count", "3",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(WAIT * 2):
            out, err = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    lines = out.decode().splitlines()
    updates = [line for line in lines if "/temperature #" in line]
    assert len(updates) == 3, lines
    # The merged state keeps the fields compact frames leave out.
    assert all("(cf 60," in line for line in updates)


async def test_each_update_is_encoded_once_per_form_whatever_the_clients(
    sensors: SimulatedSensors, device: Device, make_gateway: Any, make_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from translator.web import encodings

    made: list[int] = []
    real = encodings.cbor_map

    def counting(obj: dict[str, Any], value_item: bytes | None = None) -> bytes:
        if obj.get("type") == "notify":
            made.append(obj["seq"])
        return real(obj, value_item)

    monkeypatch.setattr(encodings, "cbor_map", counting)
    gateway = await make_gateway(config_with(sensors, device))
    clients = [await cbor_client(make_client, gateway) for _ in range(4)]
    uri = device.uri("counter")
    for client in clients:
        await client.call({"type": "subscribe", "uri": uri, "compact": True})
        await client.next_notify()
    made.clear()
    device.resources["counter"].set(cbor2.dumps(41))
    got = [await c.wait_for(lambda f: f["type"] == "notify" and f["value"] == 41)
           for c in clients]
    assert len({f["seq"] for f in got}) == 1
    assert made == [got[0]["seq"]]  # one CBOR compact encoding for the four clients
