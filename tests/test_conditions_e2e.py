"""Conditional notifications end to end: a real simulated sensor, a real gateway, real
WebSocket clients. Each test fails when the condition is ignored (a frame that must not
arrive is caught by a plain subscriber's view of the same stream), and time-based ones keep
their windows short (`[limits] min_pmax` is lowered for them).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest_asyncio

from tests.conftest import Client, gateway_config
from translator.config import config_from_mapping
from translator.gateway import Gateway
from translator.sim import SimulatedSensors


@pytest_asyncio.fixture
async def sensors() -> AsyncIterator[SimulatedSensors]:
    """Sensors that change only when a test sets them (the random walk is an hour away)."""
    sim = SimulatedSensors("127.0.0.1", 0, interval=3600, seed=1)
    await sim.start()
    try:
        yield sim
    finally:
        await sim.stop()


@pytest_asyncio.fixture
async def gateway(sensors: SimulatedSensors, make_gateway: Any) -> Gateway:
    config = gateway_config(sensors)
    config["limits"] = {"min_pmax": 0.1}
    gw: Gateway = await make_gateway(config)
    return gw


async def subscribe(client: Client, name: str, cond: dict[str, Any] | None = None
                    ) -> tuple[str, dict[str, Any]]:
    """Subscribe; return the `sub` and the first notify (the current value)."""
    frame: dict[str, Any] = {"type": "subscribe", "name": name}
    if cond is not None:
        frame["cond"] = cond
    reply = await client.call(frame)
    assert reply["type"] == "subscribed", reply
    return reply["sub"], await client.next_notify(reply["sub"])


async def watched(gateway: Gateway, make_client: Any, name: str, cond: dict[str, Any]
                  ) -> tuple[Client, Client, str]:
    """A plain client and a conditional one on `name`, both past the current value."""
    plain, conditional = await make_client(gateway.url), await make_client(gateway.url)
    sub, _ = await subscribe(plain, name)
    await subscribe(conditional, name, cond)
    return plain, conditional, sub


async def test_st_small_change_does_not_arrive_large_one_does(
    sensors: SimulatedSensors, gateway: Gateway, make_client: Any
) -> None:
    sensors.set_temperature(20.0)
    plain, conditional, sub = await watched(gateway, make_client, "temperature", {"st": 1})
    sensors.set_temperature(20.4)
    small = await plain.wait_for(lambda f: f["type"] == "notify" and f["value"] == 20.4)
    sensors.set_temperature(21.5)
    frame = await conditional.next_notify(sub)
    # Had `st` been ignored, the next frame would be the small change (sent to both at once).
    assert frame["value"] == 21.5 and frame["seq"] == small["seq"] + 1
    assert "cond_error" not in frame and "repeat" not in frame


async def test_gt_crossing_only(
    sensors: SimulatedSensors, gateway: Gateway, make_client: Any
) -> None:
    sensors.set_temperature(20.0)
    plain, conditional, sub = await watched(gateway, make_client, "temperature", {"gt": 25})
    for value in (24.0, 26.0, 27.0, 24.5):
        sensors.set_temperature(value)
        await plain.wait_for(lambda f, v=value: f["type"] == "notify" and f["value"] == v)
    values = [(await conditional.next_notify(sub))["value"] for _ in range(2)]
    assert values == [26.0, 24.5]
    sensors.set_temperature(30.0)
    assert (await conditional.next_notify(sub))["value"] == 30.0


async def test_pmin_sends_the_last_word_when_the_window_ends(
    sensors: SimulatedSensors, gateway: Gateway, make_client: Any
) -> None:
    plain, conditional, sub = await watched(gateway, make_client, "temperature",
                                            {"pmin": 0.5})
    for value in (30.0, 31.0, 32.0):
        sensors.set_temperature(value)
        last = await plain.wait_for(lambda f, v=value: f["type"] == "notify" and f["value"] == v)
    # No more updates: only the timer can bring the newest value, and nothing before it.
    frame = await conditional.next_notify(sub)
    assert (frame["value"], frame["seq"]) == (32.0, last["seq"])
    assert gateway.hub.resource(last["uri"]).watches  # type: ignore[union-attr]


async def test_pmax_repeat_has_the_same_seq_ts_and_value(
    sensors: SimulatedSensors, gateway: Gateway, make_client: Any
) -> None:
    client = await make_client(gateway.url)
    sub, first = await subscribe(client, "temperature", {"pmax": 0.2})
    repeat = await client.next_notify(sub)
    assert repeat.pop("repeat") is True
    assert repeat == first
    assert (await client.next_notify(sub))["repeat"] is True


async def test_edge_sends_rising_edges_only(
    sensors: SimulatedSensors, gateway: Gateway, make_client: Any
) -> None:
    sensors.set_led(False)
    plain, conditional, sub = await watched(gateway, make_client, "led",
                                            {"edge": True, "path": "/on"})
    sensors.set_led(True)
    assert (await conditional.next_notify(sub))["value"] == {"on": True}
    sensors.set_led(False)
    falling = await plain.wait_for(lambda f: f["type"] == "notify" and f["value"] == {"on": False})
    sensors.set_led(True)
    frame = await conditional.next_notify(sub)
    assert frame["value"] == {"on": True} and frame["seq"] == falling["seq"] + 1


async def test_a_value_the_condition_cannot_apply_to_arrives_with_cond_error(
    sensors: SimulatedSensors, gateway: Gateway, make_client: Any
) -> None:
    client = await make_client(gateway.url)
    sub, first = await subscribe(client, "humidity", {"st": 1, "path": "/0/nothing"})
    assert "not found" in first["cond_error"] and isinstance(first["value"], list)
    sensors.set_humidity(50.0)
    frame = await client.next_notify(sub)
    assert "cond_error" in frame and frame["seq"] == first["seq"] + 1
    # SenML packs are arrays: /0/v selects the first record's value.
    sub, good = await subscribe(client, "humidity", {"st": 1, "path": "/0/v"})
    assert "cond_error" not in good and good["value"][0]["v"] == 50.0


async def test_invalid_conditions_get_bad_request_and_the_connection_stays(
    gateway: Gateway, make_client: Any
) -> None:
    client = await make_client(gateway.url)
    for cond, parameter in (({"pmin": 0}, "cond.pmin"), ({"pmax": 0.01}, "cond.pmax"),
                            ({"band": True}, "cond.band"), ({"epmax": 3}, "cond.epmax"),
                            ({"path": "0/v"}, "cond.path"), ({"edge": 1}, "cond.edge")):
        reply = await client.call({"type": "subscribe", "name": "temperature", "cond": cond})
        assert reply["type"] == "error" and reply["error"] == "bad_request", reply
        assert f"'{parameter}'" in reply["message"]
    assert gateway.hub.subscription_count == 0
    assert (await client.call({"type": "ping"}))["type"] == "pong"


async def test_unsubscribe_and_disconnect_cancel_the_timer(
    sensors: SimulatedSensors, gateway: Gateway, make_client: Any
) -> None:
    client = await make_client(gateway.url)
    sub, _ = await subscribe(client, "temperature", {"pmax": 5})
    assert gateway._wake is not None
    reply = await client.call({"type": "unsubscribe", "sub": sub})
    assert reply["type"] == "unsubscribed"
    assert gateway._wake is None and len(gateway.hub._wakes) == 0
    other = await make_client(gateway.url)
    await subscribe(other, "humidity", {"pmax": 5, "pmin": 1})
    assert gateway._wake is not None
    await other.close()
    await sensors.wait_observers("/humidity", 0)   # the gateway has seen the disconnect
    assert gateway._wake is None and len(gateway.hub._wakes) == 0


async def test_plain_subscribers_of_the_same_resource_get_every_update(
    sensors: SimulatedSensors, gateway: Gateway, make_client: Any
) -> None:
    plain, conditional, sub = await watched(gateway, make_client, "temperature", {"st": 100})
    seqs = []
    for value in (1.0, 2.0, 3.0):
        sensors.set_temperature(value)
        seqs.append((await plain.next_notify(sub))["seq"])
    assert seqs == [seqs[0], seqs[0] + 1, seqs[0] + 2]
    assert [f for f in conditional.seen if f["type"] == "notify"][1:] == []


async def test_pmax_repeats_take_from_the_connections_rate_budget(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any
) -> None:
    config = gateway_config(sensors)
    # One token, refilled at a crawl: the subscribe takes 0.5, each repeat 0.1.
    config["limits"] = {"min_pmax": 0.1, "rate": 0.001, "burst": 1}
    gateway = await make_gateway(config)
    client = await make_client(gateway.url)
    sub, _ = await subscribe(client, "temperature", {"pmax": 0.1})
    for _ in range(5):
        assert (await client.next_notify(sub))["repeat"] is True
    # Had the repeats been free, half the bucket would be left for this ping.
    reply = await client.call({"type": "ping"})
    assert reply["type"] == "error" and reply["error"] == "rate_limited", reply


async def test_shutdown_cancels_the_timer(sensors: SimulatedSensors, make_client: Any) -> None:
    config = gateway_config(sensors)
    config["limits"] = {"min_pmax": 0.1}
    gateway = Gateway(config_from_mapping(config))
    await gateway.start()
    try:
        client = await make_client(gateway.url)
        await subscribe(client, "temperature", {"pmax": 0.2, "pmin": 0.1})
        assert gateway._wake is not None
    finally:
        await gateway.stop()
    assert gateway._wake is None
