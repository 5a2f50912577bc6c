"""Issue 13 §3, §4, §6: the work one client can cause is bounded, its replies keep frame
order, and a stopping gateway arms nothing new. Real gateway, real clients, real sensors."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from translator.gateway import HELD_FRAMES_MAX, Gateway
from translator.sim import SimulatedSensors

from .conftest import gateway_config


def _config(sensors: SimulatedSensors, **limits: Any) -> dict[str, Any]:
    config = gateway_config(sensors)
    config["policy"]["allow"] = [*config["policy"]["allow"], "coap://*:*/*"]
    config["server"]["linger"] = 5
    if limits:
        config["limits"] = limits
    return config


async def test_a_pong_does_not_overtake_a_subscription_waiting_for_its_host_name(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any
) -> None:
    gateway: Gateway = await make_gateway(_config(sensors))
    client = await make_client(gateway.url)
    uri = f"coap://localhost:{sensors.port}/temperature"
    await client.send({"type": "subscribe", "id": "sub", "uri": uri})
    await client.send({"type": "ping", "id": "ping"})
    await client.send({"type": "unsubscribe", "id": "bad", "sub": "nope"})
    replies = [await client.wait_for(lambda f: f.get("id") is not None) for _ in range(3)]
    assert [r["id"] for r in replies] == ["sub", "ping", "bad"], replies
    assert replies[0]["type"] == "subscribed"


async def test_frames_behind_a_lookup_wait_in_order_within_a_bound(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    gateway: Gateway = await make_gateway(_config(sensors))
    resolved = asyncio.Event()
    check = gateway._check_addresses

    async def slow_resolver(*args: Any) -> None:  # a resolver that takes its time
        await resolved.wait()
        await check(*args)

    monkeypatch.setattr(gateway, "_check_addresses", slow_resolver)
    client = await make_client(gateway.url)
    await client.send({"type": "subscribe", "id": "sub",
                       "uri": f"coap://localhost:{sensors.port}/temperature"})
    extra = 8
    for number in range(HELD_FRAMES_MAX + extra):
        await client.send({"type": "ping", "id": number})
    # The frames past the bound are refused at once, the others wait.
    refused = [await client.wait_for(lambda f: f["type"] == "error") for _ in range(extra)]
    assert {r["error"] for r in refused} == {"limit"}
    assert [r["id"] for r in refused] == list(range(HELD_FRAMES_MAX, HELD_FRAMES_MAX + extra))
    resolved.set()
    subscribed = await client.wait_for(lambda f: f.get("id") == "sub")
    assert subscribed["type"] == "subscribed"
    pongs = [await client.wait_for(lambda f: f["type"] == "pong") for _ in range(HELD_FRAMES_MAX)]
    assert [p["id"] for p in pongs] == list(range(HELD_FRAMES_MAX))


async def test_lists_and_requests_share_the_in_flight_budget(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any
) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        gateway: Gateway = await make_gateway(_config(sensors, max_inflight=1))
        client = await make_client(gateway.url)
        uri = f"coap://127.0.0.1:{silent.getsockname()[1]}/x"
        await client.send({"type": "request", "id": "slow", "method": "GET", "uri": uri,
                           "timeout": 3, "confirmable": False})
        busy = await client.call({"type": "list"})
        assert busy["type"] == "error" and busy["error"] == "limit", busy
        assert "requests, lookups and lists" in busy["message"]
        timed_out = await client.wait_for(lambda f: f.get("id") == "slow")
        assert timed_out["error"] == "timeout"
        assert (await client.call({"type": "list"}))["type"] == "resources"
    finally:
        silent.close()


async def test_subscription_churn_keeps_the_upstream_observations_bounded(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any
) -> None:
    gateway: Gateway = await make_gateway(_config(sensors, max_subscriptions=2))
    client = await make_client(gateway.url)
    for index in range(30):
        sub = (await client.subscribe(uri=f"{sensors.base_uri}/temperature?n={index}"))["sub"]
        assert (await client.call({"type": "unsubscribe", "sub": sub}))["type"] == "unsubscribed"
        assert gateway.hub.observing_count <= 2
        # The CoAP side follows: an ended observation is deregistered at once.
        assert len(gateway.coap.observed) <= 2


async def test_stopping_arms_no_linger_and_starts_no_observation(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any
) -> None:
    gateway: Gateway = await make_gateway(_config(sensors))
    client = await make_client(gateway.url)
    await client.subscribe(name="temperature")
    await client.subscribe(uri=f"{sensors.base_uri}/humidity?x=1")
    await gateway.stop()
    # The clients went away during the stop; their resources would have lingered.
    assert gateway._lingers == {}
    assert gateway.coap.observed == ()
