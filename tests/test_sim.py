"""Tests for translator.sim: the simulated CoAP sensors, exercised over real UDP on loopback.

Every wait is event driven and bounded by asyncio.timeout; nothing sleeps to let time pass.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.types import CON
from aiocoap.util.linkformat import parse as parse_link_format

from translator.sim import SimulatedSensors, run_sensors

FAST = 0.05  # random-walk interval for tests that want changing values
STILL = 3600.0  # interval for tests that want values to change only when they say so
BOUND = 5.0  # upper bound for anything a test waits for


@pytest.fixture
async def sensors() -> AsyncIterator[SimulatedSensors]:
    async with SimulatedSensors(interval=FAST, seed=1) as sim:
        yield sim


@pytest.fixture
async def client() -> AsyncIterator[Any]:
    ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        yield ctx
    finally:
        await ctx.shutdown()


async def request(ctx: Any, code: Any, uri: str, **kwargs: Any) -> Any:
    async with asyncio.timeout(BOUND):
        return await ctx.request(aiocoap.Message(code=code, uri=uri, **kwargs)).response


def observe(ctx: Any, uri: str) -> Any:
    return ctx.request(aiocoap.Message(code=aiocoap.GET, uri=uri, observe=0))


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


# -- binding -----------------------------------------------------------------------------------


async def test_port_zero_reads_back_the_bound_port(sensors: SimulatedSensors) -> None:
    assert sensors.port != 0
    assert sensors.base_uri == f"coap://127.0.0.1:{sensors.port}"


async def test_port_before_start_is_an_error() -> None:
    with pytest.raises(RuntimeError):
        _ = SimulatedSensors().port


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback")
async def test_ipv6_host_is_bracketed_and_reachable(client: Any) -> None:
    async with SimulatedSensors("::1", interval=STILL) as sim:
        assert sim.base_uri == f"coap://[::1]:{sim.port}"
        response = await request(client, aiocoap.GET, sim.base_uri + "/status")
        assert response.code == aiocoap.CONTENT


async def test_two_instances_on_port_zero_do_not_collide(client: Any) -> None:
    async with (
        SimulatedSensors(interval=STILL) as one,
        SimulatedSensors(interval=STILL) as two,
    ):
        assert one.port != two.port
        one.set_temperature(10.5)
        two.set_temperature(30.25)
        r1 = await request(client, aiocoap.GET, one.base_uri + "/temperature")
        r2 = await request(client, aiocoap.GET, two.base_uri + "/temperature")
        assert (cbor2.loads(r1.payload), cbor2.loads(r2.payload)) == (10.5, 30.25)
        assert (one.requests_seen["/temperature"], two.requests_seen["/temperature"]) == (1, 1)


# -- plain GETs --------------------------------------------------------------------------------


async def test_get_temperature_is_a_cbor_number(sensors: SimulatedSensors, client: Any) -> None:
    response = await request(client, aiocoap.GET, sensors.base_uri + "/temperature")
    assert response.code == aiocoap.CONTENT
    assert response.opt.content_format == 60
    value = cbor2.loads(response.payload)
    assert isinstance(value, float)
    assert 15 < value < 27


async def test_get_humidity_is_senml_json(sensors: SimulatedSensors, client: Any) -> None:
    response = await request(client, aiocoap.GET, sensors.base_uri + "/humidity")
    assert response.code == aiocoap.CONTENT
    assert response.opt.content_format == 110
    [record] = json.loads(response.payload)
    assert {k: record[k] for k in ("bn", "n", "u")} == {
        "bn": "urn:dev:sim:humidity:",
        "n": "rh",
        "u": "%RH",
    }
    assert 0 <= record["v"] <= 100


async def test_get_status_is_text(sensors: SimulatedSensors, client: Any) -> None:
    response = await request(client, aiocoap.GET, sensors.base_uri + "/status")
    assert response.code == aiocoap.CONTENT
    assert response.opt.content_format == 0
    text = response.payload.decode("utf-8")
    assert text.startswith("ok uptime=")
    assert text.endswith("s")


async def test_status_is_not_observable(sensors: SimulatedSensors, client: Any) -> None:
    response = await observe(client, sensors.base_uri + "/status").response
    assert response.code == aiocoap.CONTENT
    assert response.opt.observe is None
    with pytest.raises(KeyError):
        sensors.observer_count("/status")


async def test_get_led_is_cbor_map(sensors: SimulatedSensors, client: Any) -> None:
    response = await request(client, aiocoap.GET, sensors.base_uri + "/led")
    assert response.code == aiocoap.CONTENT
    assert response.opt.content_format == 60
    assert cbor2.loads(response.payload) == {"on": False}
    assert sensors.led_on is False


async def test_unknown_path_is_not_found_and_counted(
    sensors: SimulatedSensors, client: Any
) -> None:
    response = await request(client, aiocoap.GET, sensors.base_uri + "/nope")
    assert response.code == aiocoap.NOT_FOUND
    assert sensors.requests_seen["/nope"] == 1


async def test_requests_seen_counts_every_method(sensors: SimulatedSensors, client: Any) -> None:
    await request(client, aiocoap.GET, sensors.base_uri + "/status")
    await request(client, aiocoap.GET, sensors.base_uri + "/status")
    await request(client, aiocoap.POST, sensors.base_uri + "/status")  # 4.05, still a request
    assert sensors.requests_seen["/status"] == 3
    assert sensors.requests_seen["/led"] == 0


async def test_well_known_core_lists_the_resources(
    sensors: SimulatedSensors, client: Any
) -> None:
    response = await request(client, aiocoap.GET, sensors.base_uri + "/.well-known/core")
    assert response.code == aiocoap.CONTENT
    assert response.opt.content_format == 40
    links = {
        link.href: dict(link.attr_pairs)
        for link in parse_link_format(response.payload.decode("utf-8")).links
    }
    assert set(links) == {"/temperature", "/humidity", "/status", "/led", "/blob"}
    assert links["/blob"] == {"rt": "blob", "if": "sensor", "ct": "42", "obs": None}
    assert links["/temperature"] == {"rt": "temperature-c", "if": "sensor", "ct": "60", "obs": None}
    assert links["/humidity"] == {"rt": "humidity-rh", "if": "sensor", "ct": "110", "obs": None}
    assert links["/led"]["ct"] == "60"
    assert "obs" in links["/led"]
    assert links["/status"]["ct"] == "0"
    assert "obs" not in links["/status"]
    assert all("rt" in attrs for attrs in links.values())


# -- observation -------------------------------------------------------------------------------


async def test_observe_temperature_gets_changing_values(
    sensors: SimulatedSensors, client: Any
) -> None:
    req = observe(client, sensors.base_uri + "/temperature")
    async with asyncio.timeout(BOUND):
        first = await req.response
        assert first.opt.observe is not None
        values = [cbor2.loads(first.payload)]
        async for notification in req.observation:
            assert notification.opt.content_format == 60
            values.append(cbor2.loads(notification.payload))
            if len(values) >= 3 and len(set(values)) >= 2:
                break
    req.observation.cancel()
    assert sensors.registrations("/temperature") == 1


async def test_observe_humidity_gets_changing_values(
    sensors: SimulatedSensors, client: Any
) -> None:
    req = observe(client, sensors.base_uri + "/humidity")
    async with asyncio.timeout(BOUND):
        values = [json.loads((await req.response).payload)[0]["v"]]
        async for notification in req.observation:
            values.append(json.loads(notification.payload)[0]["v"])
            if len(values) >= 3 and len(set(values)) >= 2:
                break
    req.observation.cancel()


async def test_set_temperature_notifies_observers_now(client: Any) -> None:
    async with SimulatedSensors(interval=STILL) as sim:
        req = observe(client, sim.base_uri + "/temperature")
        async with asyncio.timeout(BOUND):
            await req.response
            notifications = aiter(req.observation)
            await sim.wait_observers("/temperature", 1)
            sim.set_temperature(23.5)
            assert cbor2.loads((await anext(notifications)).payload) == 23.5
            sim.set_temperature(-4.0)
            assert cbor2.loads((await anext(notifications)).payload) == -4.0
        assert sim.temperature == -4.0
        req.observation.cancel()


async def test_observer_count_follows_client_shutdown() -> None:
    # confirm_every=None: only NON notifications, so the RST path below cannot be what ends it.
    async with SimulatedSensors(interval=FAST, confirm_every=None) as sim:
        ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            assert sim.observer_count("/temperature") == 0
            req = observe(ctx, sim.base_uri + "/temperature")
            async with asyncio.timeout(BOUND):
                await req.response
            await sim.wait_observers("/temperature", 1)
            assert sim.observer_count("/temperature") == 1
        finally:
            await ctx.shutdown()
        # The client's socket is closed now; the next notification draws an ICMP port
        # unreachable, which aiocoap's udp6 transport reads from the error queue and turns into
        # the end of every exchange with that peer, observations included.
        await sim.wait_observers("/temperature", 0)
        assert sim.registrations("/temperature") == 1


async def test_local_cancel_alone_does_not_reach_the_server_with_non_notifications(
    client: Any,
) -> None:
    async with SimulatedSensors(interval=FAST, confirm_every=None) as sim:
        leaver_ctx = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            leaver = observe(leaver_ctx, sim.base_uri + "/temperature")
            stayer = observe(client, sim.base_uri + "/temperature")
            async with asyncio.timeout(BOUND):
                await leaver.response
                await stayer.response
                await anext(aiter(leaver.observation))  # see the RST test for why
            await sim.wait_observers("/temperature", 2)

            leaver.observation.cancel()
            # The remaining observer is the clock: five more notifications to it mean five
            # more (NON) notifications went to the cancelled one too, and were dropped there.
            async with asyncio.timeout(BOUND):
                received = 0
                async for _ in stayer.observation:
                    received += 1
                    if received == 5:
                        break
            assert sim.observer_count("/temperature") == 2
        finally:
            await leaver_ctx.shutdown()
        await sim.wait_observers("/temperature", 1)
        stayer.observation.cancel()


async def test_local_cancel_reaches_the_server_via_rst_to_a_con_notification(
    client: Any,
) -> None:
    async with SimulatedSensors(interval=FAST, confirm_every=0.2) as sim:
        req = observe(client, sim.base_uri + "/temperature")
        async with asyncio.timeout(BOUND):
            await req.response
            # Not cancelling straight after the first response: aiocoap runs the client side
            # of an observation in a task that only starts on the next loop iteration, and
            # cancel() before that start leaves the token registered for good.
            await anext(aiter(req.observation))
        await sim.wait_observers("/temperature", 1)
        req.observation.cancel()
        # The next CON notification (at most 0.2 s away) is answered with a RST by the client,
        # which no longer knows the token; the client context stays up throughout.
        await sim.wait_observers("/temperature", 0)


class _RawClient(asyncio.DatagramProtocol):
    """A bare UDP CoAP client: it controls token and socket, which aiocoap's client doesn't."""

    def __init__(self) -> None:
        self.received: asyncio.Queue[Any] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.received.put_nowait(aiocoap.Message.decode(data))


async def test_get_with_observe_1_on_the_same_token_deregisters() -> None:
    """RFC 7641 section 3.6 active deregistration.

    aiocoap's client cannot send it (every request gets a fresh token), so a raw socket does.
    """
    async with SimulatedSensors(interval=FAST, confirm_every=None) as sim:
        loop = asyncio.get_running_loop()
        transport, raw = await loop.create_datagram_endpoint(
            _RawClient, remote_addr=("127.0.0.1", sim.port)
        )

        def get(observe_value: int, mid: int) -> None:
            msg = aiocoap.Message(
                code=aiocoap.GET, uri_path=("temperature",), observe=observe_value
            )
            msg.mtype, msg.mid, msg.token = CON, mid, b"\x42"
            transport.sendto(msg.encode())

        try:
            async with asyncio.timeout(BOUND):
                get(0, mid=1)
                registered = await raw.received.get()
                assert (registered.mid, registered.opt.observe) == (1, 0)
                await sim.wait_observers("/temperature", 1)

                get(1, mid=2)
                await sim.wait_observers("/temperature", 0)
                while (answer := await raw.received.get()).mid != 2:
                    pass  # notifications sent before the deregistration arrived
                assert answer.code == aiocoap.CONTENT
                assert answer.opt.observe is None
        finally:
            transport.close()


async def test_wait_observers_times_out(sensors: SimulatedSensors) -> None:
    with pytest.raises(TimeoutError):
        await sensors.wait_observers("/humidity", 1, timeout=0.05)


async def test_registrations_count_every_accepted_observe(
    sensors: SimulatedSensors, client: Any
) -> None:
    reqs = [observe(client, sensors.base_uri + "/humidity") for _ in range(3)]
    async with asyncio.timeout(BOUND):
        for req in reqs:
            await req.response
    await sensors.wait_observers("humidity", 3)  # the leading slash is optional
    assert sensors.registrations("/humidity") == 3
    assert sensors.registrations("/temperature") == 0
    for req in reqs:
        req.observation.cancel()


async def test_stop_ends_observations_and_tasks(client: Any) -> None:
    sim = SimulatedSensors(interval=FAST)
    await sim.start()
    try:
        req = observe(client, sim.base_uri + "/temperature")
        async with asyncio.timeout(BOUND):
            await req.response
        await sim.wait_observers("/temperature", 1)
    finally:
        await sim.stop()
    await sim.wait_observers("/temperature", 0)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("sim-sensors")]
    await sim.stop()  # idempotent
    req.observation.cancel()


# -- the LED -----------------------------------------------------------------------------------


async def test_put_led_cbor_changes_state_and_notifies_observers(
    sensors: SimulatedSensors, client: Any
) -> None:
    uri = sensors.base_uri + "/led"
    req = observe(client, uri)
    async with asyncio.timeout(BOUND):
        assert cbor2.loads((await req.response).payload) == {"on": False}
        notifications = aiter(req.observation)
        await sensors.wait_observers("/led", 1)

        put = await request(
            client, aiocoap.PUT, uri, payload=cbor2.dumps({"on": True}), content_format=60
        )
        assert put.code == aiocoap.CHANGED
        assert sensors.led_on is True
        assert cbor2.loads((await anext(notifications)).payload) == {"on": True}

    got = await request(client, aiocoap.GET, uri)
    assert cbor2.loads(got.payload) == {"on": True}
    req.observation.cancel()


async def test_put_led_json(sensors: SimulatedSensors, client: Any) -> None:
    uri = sensors.base_uri + "/led"
    for on in (True, False):
        put = await request(
            client, aiocoap.PUT, uri, payload=json.dumps({"on": on}).encode(), content_format=50
        )
        assert put.code == aiocoap.CHANGED
        assert sensors.led_on is on
        assert cbor2.loads((await request(client, aiocoap.GET, uri)).payload) == {"on": on}


@pytest.mark.parametrize(
    ("content_format", "body"),
    [
        (60, b"\xff\x00"),  # not CBOR
        (60, cbor2.dumps([True])),  # not a map
        (60, cbor2.dumps({"on": 1})),  # not a boolean
        (60, cbor2.dumps({"on": True, "colour": "red"})),  # unexpected key
        (60, cbor2.dumps({})),  # missing key
        (50, b"{on: true}"),  # not JSON
        (50, b'{"on": "yes"}'),
        (50, b""),
    ],
)
async def test_put_led_bad_body_is_bad_request(
    sensors: SimulatedSensors, client: Any, content_format: int, body: bytes
) -> None:
    response = await request(
        client, aiocoap.PUT, sensors.base_uri + "/led", payload=body, content_format=content_format
    )
    assert response.code == aiocoap.BAD_REQUEST
    assert response.payload  # a diagnostic text
    response.payload.decode("utf-8")
    assert sensors.led_on is False


@pytest.mark.parametrize("content_format", [0, 110, None])
async def test_put_led_wrong_content_format(
    sensors: SimulatedSensors, client: Any, content_format: int | None
) -> None:
    response = await request(
        client,
        aiocoap.PUT,
        sensors.base_uri + "/led",
        payload=cbor2.dumps({"on": True}),
        content_format=content_format,
    )
    assert response.code == aiocoap.UNSUPPORTED_CONTENT_FORMAT
    assert sensors.led_on is False


# -- construction details and the runner ------------------------------------------------------


def test_seed_makes_the_walk_reproducible() -> None:
    a, b = SimulatedSensors(seed=7), SimulatedSensors(seed=7)
    assert (a.temperature, a.humidity) == (b.temperature, b.humidity)
    for _ in range(50):
        assert a._step(a.temperature, 21.0, 0.2, -40, 85) == b._step(
            b.temperature, 21.0, 0.2, -40, 85
        )


def test_walk_step_always_changes_and_stays_in_range() -> None:
    sim = SimulatedSensors(seed=3)
    value = 99.99
    for _ in range(1000):
        new = sim._step(value, 45.0, 0.5, 0, 100)
        assert new != value
        assert 0 <= new <= 100
        value = new


@pytest.mark.parametrize("interval", [0, -1, float("nan"), float("inf")])
def test_interval_must_be_positive(interval: float) -> None:
    with pytest.raises(ValueError):
        SimulatedSensors(interval=interval)


@pytest.mark.parametrize("confirm_every", [-1.0, float("nan")])
def test_confirm_every_must_not_be_negative(confirm_every: float) -> None:
    with pytest.raises(ValueError):
        SimulatedSensors(confirm_every=confirm_every)


async def test_run_sensors_serves_until_cancelled(client: Any) -> None:
    started: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    on_started: Callable[[str], None] = started.set_result
    task = asyncio.create_task(
        run_sensors("127.0.0.1", 0, FAST, on_started=on_started), name="test-run-sensors"
    )
    try:
        async with asyncio.timeout(BOUND):
            uri = await started
        assert uri.startswith("coap://127.0.0.1:")
        response = await request(client, aiocoap.GET, uri + "/status")
        assert response.payload.startswith(b"ok uptime=")
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
