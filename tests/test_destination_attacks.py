"""Issue 20, destination side: what an attacker's frames reach, end to end.

Each test sends the frames a review used against a running gateway and keeps a UDP listener
where the forbidden traffic would go: the listener must receive nothing, and the client must
get the answer the policy gives before any traffic (the same for an open and a closed port).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from translator.gateway import Gateway
from translator.sim import SimulatedSensors

from .conftest import Client, gateway_config
from .test_security import open_client


class Listener:
    """A UDP socket standing where a forbidden request would land."""

    def __init__(self, host: str) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]

    def received(self) -> bytes | None:
        try:
            return self.sock.recv(65536)
        except BlockingIOError:
            return None


@pytest.fixture
def listener() -> Iterator[Listener]:
    spot = Listener("127.0.0.2")
    try:
        yield spot
    finally:
        spot.sock.close()


def closed_port(host: str) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


async def settle(client: Client) -> None:
    """A round trip through the gateway: frames sent before it have been handled (and any
    datagram they caused has been sent over loopback) when it returns."""
    assert (await client.call({"type": "ping"}))["type"] == "pong"


def policy(sensors: SimulatedSensors, *allow: str) -> dict[str, Any]:
    config = gateway_config(sensors)
    config["policy"]["allow"] = [*config["policy"]["allow"], *allow]
    return config


@pytest.mark.parametrize(
    ("allow", "uri"),
    [
        ("coap://*:5683/*", "coap://127.0.0.2:{port}/:5683/"),
        ("coap://*:5683/*", "coap://127.0.0.2:{port}/x?:5683/"),
        ("coap://*.example.com:5683/*", "coap://127.0.0.2:{port}/.example.com:5683/"),
        ("coap://127.0.0.2:56?3/*", "coap://127.0.0.2:{port}/3/x"),
        ("coap://127.0.0.*/*", "coap://127.0.0.2:{port}/x"),
        ("coap://[*]:*/*", "coap://[::ffff:127.0.0.2]:{port}/x"),
    ],
)
async def test_text_in_the_path_or_query_never_satisfies_host_or_port(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any, listener: Listener,
    allow: str, uri: str,
) -> None:
    gateway: Gateway = await make_gateway(policy(sensors, allow))
    client = await make_client(gateway.url)
    closed = closed_port("127.0.0.2")
    answers = []
    for port in (listener.port, closed):
        target = uri.format(port=port)
        for frame in ({"type": "request", "method": "PUT", "uri": target, "value": True},
                      {"type": "subscribe", "uri": target}):
            reply = await client.call(frame)
            assert reply["type"] == "error" and reply["error"] == "forbidden", reply
            answers.append(reply["message"].replace(str(port), "P"))
    await settle(client)
    assert listener.received() is None
    # An open port and a closed one get the same answer: the refusal comes before traffic.
    assert answers[:2] == answers[2:]


async def test_a_tokens_allow_cannot_be_escaped_through_the_path(
    sensors: SimulatedSensors, make_gateway: Any, listener: Listener
) -> None:
    config = policy(sensors, "coap://127.0.0.2:*/*")
    config["auth"] = {"tokens": [
        {"token": "narrow-secret-1", "name": "narrow", "scopes": ["read", "write"],
         "allow": ["coap://*:5683/*"]},
    ]}
    gateway: Gateway = await make_gateway(config)
    client = await open_client(gateway.url, "narrow-secret-1")
    try:
        reply = await client.call({"type": "request", "method": "PUT", "value": True,
                                   "uri": f"coap://127.0.0.2:{listener.port}/:5683/"})
        assert reply["error"] == "forbidden" and "'narrow'" in reply["message"], reply
        await settle(client)
        assert listener.received() is None
    finally:
        await client.close()


async def test_an_address_pattern_does_not_match_a_host_name(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any, listener: Listener
) -> None:
    gateway: Gateway = await make_gateway(policy(sensors, "coap://127.0.0.*:*/*"))
    client = await make_client(gateway.url)
    for host in ("127.0.0.2.attacker.example", "127.0.0.2.localhost"):
        reply = await client.call(
            {"type": "request", "method": "GET", "uri": f"coap://{host}:{listener.port}/x"}
        )
        assert reply["error"] == "forbidden", reply
    await settle(client)
    assert listener.received() is None


async def test_a_resolved_name_must_fall_within_the_address_patterns(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any
) -> None:
    # localhost resolves to 127.0.0.1, where the simulated sensors listen.
    uri = f"coap://localhost:{sensors.port}/temperature"
    config = gateway_config(sensors)
    config["policy"]["allow"] = ["coap://127.0.0.2:*/*", "coap://localhost:*/*"]
    outside = await make_gateway(config)
    client = await make_client(outside.url)
    reply = await client.call({"type": "request", "method": "GET", "uri": uri})
    assert reply["error"] == "forbidden" and "resolves to" in reply["message"], reply

    config["policy"]["allow"] = ["coap://127.0.0.*:*/*", "coap://[::1]:*/*",
                                 "coap://localhost:*/*"]
    inside = await make_gateway(config)
    client = await make_client(inside.url)
    reply = await client.call({"type": "request", "method": "GET", "uri": uri})
    assert reply["type"] == "response" and reply["code"] == "2.05", reply


@pytest.mark.parametrize(
    "host", ["0x7f000002", "0x7f.0.0x2", "0177.0.0.2", "127.2", "2130706434"]
)
async def test_numeric_host_spellings_are_bad_requests(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any, listener: Listener,
    host: str,
) -> None:
    gateway: Gateway = await make_gateway(policy(sensors, "coap://*:*/*"))
    client = await make_client(gateway.url)
    for frame in ({"type": "request", "method": "GET", "uri": f"coap://{host}:{listener.port}/x"},
                  {"type": "subscribe", "uri": f"coap://{host}:{listener.port}/x"}):
        reply = await client.call(frame)
        assert reply["error"] == "bad_request" and "IPv4" in reply["message"], reply
    await settle(client)
    assert listener.received() is None


@pytest.mark.parametrize(
    "host", ["a..lan", "a" * 64 + ".lan", "-a.lan", "a-.lan", "a_b.lan", "x." * 127 + "lan"]
)
async def test_bad_host_names_are_answered_at_parse_time(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any,
    caplog: pytest.LogCaptureFixture, host: str,
) -> None:
    gateway: Gateway = await make_gateway(policy(sensors, "coap://*:*/*"))
    client = await make_client(gateway.url)
    for frame in ({"type": "request", "method": "GET", "uri": f"coap://{host}:5683/x"},
                  {"type": "subscribe", "uri": f"coap://{host}:5683/x"}):
        reply = await client.call(frame)
        assert reply["type"] == "error" and reply["error"] == "bad_request", reply
    await settle(client)
    assert "Traceback" not in caplog.text and "never retrieved" not in caplog.text


async def test_every_task_started_for_a_frame_answers_it(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any,
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    gateway: Gateway = await make_gateway(policy(sensors, "coap://*:*/*"))
    client = await make_client(gateway.url)

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise UnicodeError("label empty or too long")  # what the IDNA codec raised

    monkeypatch.setattr(gateway.coap, "request", broken)
    monkeypatch.setattr(gateway, "_check_addresses", broken)
    monkeypatch.setattr(gateway.hub, "list_entries", lambda allowed: 1 / 0)
    for frame in ({"type": "request", "method": "GET", "name": "temperature"},
                  {"type": "subscribe", "uri": f"coap://localhost:{sensors.port}/x"},
                  {"type": "list"}):
        with caplog.at_level(logging.ERROR):
            reply = await client.call(frame)
        assert reply["type"] == "error" and reply["error"] == "internal_error", reply
    # The connection and the gateway go on.
    await settle(client)
    assert "never retrieved" not in caplog.text


async def test_a_narrowed_token_cannot_tell_a_hidden_name_from_a_missing_one(
    sensors: SimulatedSensors, make_gateway: Any
) -> None:
    config = gateway_config(sensors)
    config["auth"] = {"tokens": [
        {"token": "led-only-secret", "name": "led-only", "scopes": ["read", "write"],
         "allow": ["led"]},
    ]}
    gateway: Gateway = await make_gateway(config)
    client = await open_client(gateway.url, "led-only-secret")
    try:
        for kind in ("subscribe", "request"):
            base = {"type": kind, "method": "GET"} if kind == "request" else {"type": kind}
            hidden = await client.call({**base, "name": "temperature"})
            missing = await client.call({**base, "name": "no-such-sensor"})
            assert hidden["error"] == missing["error"] == "not_found", (hidden, missing)
            assert hidden["message"] == "no sensor named 'temperature'"
            assert missing["message"] == "no sensor named 'no-such-sensor'"
            assert "coap://" not in hidden["message"]
        assert (await client.subscribe(name="led"))["type"] == "subscribed"
    finally:
        await client.close()


async def test_list_shows_a_token_its_sensors_and_its_own_subscriptions_only(
    sensors: SimulatedSensors, make_gateway: Any
) -> None:
    config = gateway_config(sensors)
    config["auth"] = {"tokens": [
        {"token": "alice-secret-1", "name": "alice", "scopes": ["read", "write"]},
        {"token": "bob-secret-11", "name": "bob", "scopes": ["read", "write"]},
        {"token": "led-only-secret", "name": "led-only", "scopes": ["read"], "allow": ["led"]},
    ]}
    gateway: Gateway = await make_gateway(config)
    alice = await open_client(gateway.url, "alice-secret-1")
    alice_too = await open_client(gateway.url, "alice-secret-1")
    bob = await open_client(gateway.url, "bob-secret-11")
    narrow = await open_client(gateway.url, "led-only-secret")
    secret_uri = f"{sensors.base_uri}/temperature?key=alices-api-secret"
    try:
        await alice.subscribe(uri=secret_uri)

        def uris(frame: dict[str, Any]) -> list[str]:
            return [entry["uri"] for entry in frame["resources"]]

        configured = [f"{sensors.base_uri}/{n}" for n in ("temperature", "humidity", "status",
                                                          "led")]
        listed_by_alice = uris(await alice_too.call({"type": "list"}))  # same token
        listed_by_bob = uris(await bob.call({"type": "list"}))
        listed_narrow = uris(await narrow.call({"type": "list"}))
        assert secret_uri in listed_by_alice
        assert secret_uri not in listed_by_bob
        assert set(configured) <= set(listed_by_bob)
        assert listed_narrow == [f"{sensors.base_uri}/led"]
        # Once alice no longer watches it, it is gone from her list too.
        sub = next(e["sub"] for e in (await alice.call({"type": "list"}))["resources"]
                   if e["uri"] == secret_uri)
        assert (await alice.call({"type": "unsubscribe", "sub": sub}))["type"] == "unsubscribed"
        assert secret_uri not in uris(await alice.call({"type": "list"}))
    finally:
        for client in (alice, alice_too, bob, narrow):
            await client.close()


async def test_refusals_say_what_to_do(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any
) -> None:
    gateway: Gateway = await make_gateway(gateway_config(sensors))
    client = await make_client(gateway.url)
    reply = await client.call({"type": "subscribe", "name": "temprature"})
    assert reply["message"] == "no sensor named 'temprature' (did you mean 'temperature'?)"
    reply = await client.call({"type": "request", "method": "GET",
                               "uri": "coap://127.0.0.2:5683/x"})
    assert reply["error"] == "forbidden"
    assert "add a pattern such as 'coap://127.0.0.2:5683/*' to [policy] allow" in reply["message"]
