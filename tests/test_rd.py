"""The gateway as a Resource Directory (RFC 9176), end to end: real aiocoap clients and
sensors register over UDP on loopback, real WebSocket clients find and watch them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiocoap
import pytest
import pytest_asyncio

from tests.conftest import WAIT, Client
from translator.config import ConfigError, config_from_mapping
from translator.core.codecs import parse_link_format
from translator.gateway import Gateway
from translator.sim import SimulatedSensors


def rd_config(**rd: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "linger": 0},
        "coap": {"listen": ["127.0.0.1:0"]},
        "rd": {"allow_from": ["127.0.0.1"], "endpoints": ["node-*"], **rd},
    }


def rd_uri(gateway: Gateway) -> str:
    assert gateway.registry.server is not None
    host, port = gateway.registry.server.addresses[0]
    return f"coap://{host}:{port}"


@pytest_asyncio.fixture
async def coap() -> AsyncIterator[aiocoap.Context]:
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    yield context
    await context.shutdown()


async def ask(
    context: Any, code: aiocoap.Code, uri: str, payload: bytes = b"", cf: int | None = 40
) -> aiocoap.Message:
    message = aiocoap.Message(code=code, uri=uri, payload=payload)
    if cf is not None and payload:
        message.opt.content_format = cf
    async with asyncio.timeout(WAIT):
        response: aiocoap.Message = await context.request(message).response
    return response


async def wait_catalog(client: Client, predicate: Any) -> dict[str, Any]:
    return await client.wait_for(lambda f: f["type"] == "catalog" and predicate(f))


def names(entries: list[dict[str, Any]]) -> set[str]:
    return {entry["name"] for entry in entries}


async def test_enabling_the_directory_without_allow_from_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as caught:
        config_from_mapping({"coap": {"listen": ["127.0.0.1:0"]}})
    assert caught.value.key == "rd.allow_from"


async def test_registered_sensors_join_the_catalogue_and_are_subscribable_by_name(
    make_gateway: Any, make_client: Any
) -> None:
    gateway = await make_gateway(rd_config())
    client = await make_client(gateway.url)
    snapshot = await client.call({"type": "watch"})
    assert snapshot["snapshot"] is True and snapshot["added"] == []
    async with SimulatedSensors("127.0.0.1", 0, interval=0.05, seed=1) as sensors:
        # aiocoap's own RD client, from the sensors' socket: discovery of /rd through
        # /.well-known/core?rt=core.rd, then POST /rd?ep=node-1 with the sensors' links.
        registerer = sensors.register_at(rd_uri(gateway), "node-1", lt=120)
        try:
            joined = await wait_catalog(client, lambda f: f["added"])
            added = {e["name"]: e for e in joined["added"]}
            assert "node-1/temperature" in added
            entry = added["node-1/temperature"]
            assert entry["uri"] == f"{sensors.base_uri}/temperature"
            assert entry["ep"] == "node-1" and entry["source"] == "rd"
            assert entry["observable"] is True
            listed = await client.call({"type": "list"})
            by_name = {e["name"]: e for e in listed["resources"]}
            assert by_name["node-1/humidity"]["ep"] == "node-1"
            sub = (await client.subscribe(name="node-1/temperature"))["sub"]
            notify = await client.next_notify(sub)
            assert notify["uri"] == f"{sensors.base_uri}/temperature"
            response = await client.call({"type": "request", "method": "GET",
                                          "name": "node-1/status"})
            assert response["code"] == "2.05"
        finally:
            await registerer.shutdown()
        removed = await wait_catalog(client, lambda f: f["removed"])
        assert "node-1/temperature" in names(removed["removed"])
        assert removed["removed"][0]["reason"] == "the endpoint removed its registration"
        # Subscribers heard it first (the status goes out before the catalogue change).
        status = [f for f in client.seen if f["type"] == "status" and f["sub"] == sub][-1]
        assert status["state"] == "offline"
        assert status["reason"] == "the endpoint removed its registration"
    # The name is gone; a URI of the gone sensor is not reachable through the directory.
    gone = await client.call({"type": "subscribe", "name": "node-1/temperature"})
    assert gone["type"] == "error" and gone["error"] == "not_found"
    gone = await client.call({"type": "subscribe", "uri": notify["uri"]})
    assert gone["type"] == "error" and gone["error"] == "forbidden"


async def test_subscription_resumes_when_the_endpoint_registers_from_a_new_address(
    make_gateway: Any, make_client: Any
) -> None:
    gateway = await make_gateway(rd_config())
    client = await make_client(gateway.url)
    await client.call({"type": "watch"})
    first = SimulatedSensors("127.0.0.1", 0, interval=0.05, seed=1)
    await first.start()
    registerer = first.register_at(rd_uri(gateway), "node-1", lt=120)
    await wait_catalog(client, lambda f: f["added"])
    sub = (await client.subscribe(name="node-1/temperature"))["sub"]
    await client.next_notify(sub)
    # The sensor goes away without deregistering and comes back at another port.
    await registerer.shutdown()
    await first.stop()
    offline = await client.wait_for(lambda f: f["type"] == "status" and f["sub"] == sub)
    assert offline["state"] == "offline"
    async with SimulatedSensors("127.0.0.1", 0, interval=0.05, seed=2) as second:
        assert second.port != first.port
        again = second.register_at(rd_uri(gateway), "node-1", lt=120)
        try:
            await second.wait_observers("/temperature", 1)
            online = await client.wait_for(
                lambda f: f["type"] == "status" and f["sub"] == sub and f["state"] == "online"
            )
            assert online["reason"] == "the sensor answers again"
            moved = await client.next_notify(sub)
            assert moved["uri"] == f"{second.base_uri}/temperature"
            assert first.observer_count("/temperature") == 0
        finally:
            await again.shutdown()


async def test_an_expired_registration_takes_its_resources_offline(
    make_gateway: Any, make_client: Any, coap: Any
) -> None:
    gateway = await make_gateway(rd_config(min_lifetime=1))
    client = await make_client(gateway.url)
    await client.call({"type": "watch"})
    async with SimulatedSensors("127.0.0.1", 0, interval=0.05, seed=1) as sensors:
        response = await sensors.request(aiocoap.Message(
            code=aiocoap.POST, uri=f"{rd_uri(gateway)}/rd?ep=node-7&lt=2",
            payload=b"</temperature>;obs;ct=60", content_format=40,
        ))
        assert str(response.code) == "2.01 Created", response.payload
        sub = (await client.subscribe(name="node-7/temperature"))["sub"]
        await client.next_notify(sub)
        status = await client.wait_for(
            lambda f: f["type"] == "status" and f["sub"] == sub, timeout=WAIT + 3
        )
        assert status["state"] == "offline"
        assert status["reason"] == "the registration of 'node-7' expired (lifetime 2 s)"
        await sensors.wait_observers("/temperature", 0)
        removed = await wait_catalog(client, lambda f: f["removed"])
        assert names(removed["removed"]) == {"node-7/temperature"}


async def test_update_renews_and_delete_removes(
    make_gateway: Any, make_client: Any, coap: Any
) -> None:
    gateway = await make_gateway(rd_config())
    base = rd_uri(gateway)
    created = await ask(coap, aiocoap.POST, f"{base}/rd?ep=node-2&base=coap://127.0.0.1:9",
                        b'</t>;rt="temperature"')
    assert created.code == aiocoap.CREATED
    location = "/" + "/".join(created.opt.location_path)
    assert (await ask(coap, aiocoap.POST, f"{base}{location}?lt=600")).code == aiocoap.CHANGED
    assert gateway.registry.directory is not None
    [reg] = gateway.registry.directory.registrations()
    assert reg.lt == 600
    read = await ask(coap, aiocoap.GET, f"{base}{location}")
    assert parse_link_format(read.payload.decode())[0]["href"] == "/t"
    assert (await ask(coap, aiocoap.DELETE, f"{base}{location}")).code == aiocoap.DELETED
    assert (await ask(coap, aiocoap.DELETE, f"{base}{location}")).code == aiocoap.NOT_FOUND
    assert len(gateway.registry.catalog) == 0


async def test_lookups_and_well_known_core(make_gateway: Any, coap: Any) -> None:
    gateway = await make_gateway(rd_config())
    base = rd_uri(gateway)
    for ep, links in (("node-1", b'</t>;rt="temperature";obs'), ("node-2", b'</h>;rt="humidity"')):
        created = await ask(coap, aiocoap.POST, f"{base}/rd?ep={ep}&d=lab", links)
        assert created.code == aiocoap.CREATED
    wkc = parse_link_format((await ask(coap, aiocoap.GET,
                                       f"{base}/.well-known/core?rt=core.rd*")).payload.decode())
    assert {link["rt"] for link in wkc} == {"core.rd", "core.rd-lookup-ep", "core.rd-lookup-res"}
    only = parse_link_format((await ask(coap, aiocoap.GET,
                                        f"{base}/.well-known/core?rt=core.rd")).payload.decode())
    assert [link["href"] for link in only] == ["/rd"]
    eps = parse_link_format((await ask(coap, aiocoap.GET,
                                       f"{base}/rd-lookup/ep?d=lab")).payload.decode())
    assert {e["ep"] for e in eps} == {"node-1", "node-2"}
    res = parse_link_format((await ask(coap, aiocoap.GET,
                                       f"{base}/rd-lookup/res?rt=hum*")).payload.decode())
    assert len(res) == 1 and res[0]["href"].endswith("/h") and "anchor" in res[0]
    assert (await ask(coap, aiocoap.PUT, f"{base}/rd", b"</x>")).code == aiocoap.METHOD_NOT_ALLOWED
    assert (await ask(coap, aiocoap.GET, f"{base}/elsewhere")).code == aiocoap.NOT_FOUND
    assert (await ask(coap, aiocoap.GET, f"{base}/rd-lookup/res?page=x&count=1")).code == \
        aiocoap.BAD_REQUEST


@pytest.mark.parametrize(
    ("query", "payload", "cf", "code"),
    [
        ("ep=intruder", b"</t>", 40, aiocoap.FORBIDDEN),  # [rd] endpoints
        ("ep=node-1&base=coap://[ff02::1]", b"</t>", 40, aiocoap.FORBIDDEN),  # multicast
        ("ep=node-1&base=coap://255.255.255.255", b"</t>", 40, aiocoap.FORBIDDEN),
        ("ep=node-1", b"<coap://10.0.0.1/x>", 40, aiocoap.FORBIDDEN),  # outside its base
        ("ep=node-1&lt=soon", b"</t>", 40, aiocoap.BAD_REQUEST),
        ("lt=60", b"</t>", 40, aiocoap.BAD_REQUEST),  # no ep
        ("ep=node-1", b"<t", 40, aiocoap.BAD_REQUEST),
        ("ep=node-1", b"</a>,</b>,</c>", 40, aiocoap.REQUEST_ENTITY_TOO_LARGE),  # max_links
        ("ep=node-1", b"</" + b"x" * 300 + b">", 40, aiocoap.REQUEST_ENTITY_TOO_LARGE),
        ("ep=node-1", b'{"t": 1}', 50, aiocoap.UNSUPPORTED_CONTENT_FORMAT),
    ],
)
async def test_bad_registrations_get_their_code_and_change_nothing(
    make_gateway: Any, make_client: Any, coap: Any, query: str, payload: bytes, cf: int,
    code: aiocoap.Code,
) -> None:
    gateway = await make_gateway(rd_config(max_links=2, max_payload=256))
    client = await make_client(gateway.url)
    await client.call({"type": "watch"})
    base = rd_uri(gateway)
    kept = await ask(coap, aiocoap.POST, f"{base}/rd?ep=node-0", b"</k>")
    assert kept.code == aiocoap.CREATED
    await wait_catalog(client, lambda f: f["added"])
    response = await ask(coap, aiocoap.POST, f"{base}/rd?{query}", payload, cf)
    assert response.code == code, response.payload
    assert response.payload  # a diagnostic says why
    assert gateway.registry.directory is not None
    assert [r.ep for r in gateway.registry.directory.registrations()] == ["node-0"]
    assert set(gateway.registry.catalog.names) == {"node-0/k"}
    # No catalog frame was sent for it: the next one the client gets is for a later change.
    await ask(coap, aiocoap.POST, f"{base}/rd?ep=node-9", b"</n>")
    following = await wait_catalog(client, lambda f: True)
    assert names(following["added"]) == {"node-9/n"}


async def test_a_full_directory_answers_5_03_with_max_age(
    make_gateway: Any, coap: Any
) -> None:
    gateway = await make_gateway(rd_config(max_registrations=1))
    base = rd_uri(gateway)
    assert (await ask(coap, aiocoap.POST, f"{base}/rd?ep=node-1", b"</a>")).code == aiocoap.CREATED
    full = await ask(coap, aiocoap.POST, f"{base}/rd?ep=node-2", b"</a>")
    assert full.code == aiocoap.SERVICE_UNAVAILABLE and full.opt.max_age == 60
    # The registered endpoint may still register again (same location).
    assert (await ask(coap, aiocoap.POST, f"{base}/rd?ep=node-1", b"</b>")).code == aiocoap.CREATED
    metrics = gateway.metrics(None).body.decode()
    assert 'coap_ws_gateway_rd_refused_total{code="5.03"} 1.0' in metrics
    assert "coap_ws_gateway_rd_registrations 1.0" in metrics
    assert "coap_ws_gateway_catalogued 1.0" in metrics


async def test_sources_outside_allow_from_are_refused(make_gateway: Any, coap: Any) -> None:
    gateway = await make_gateway(rd_config(allow_from=["10.0.0.0/8"]))
    base = rd_uri(gateway)
    for code, path in ((aiocoap.POST, "/rd?ep=node-1"), (aiocoap.GET, "/rd-lookup/res")):
        response = await ask(coap, code, base + path, b"</a>" if code == aiocoap.POST else b"")
        assert response.code == aiocoap.FORBIDDEN
    assert gateway.registry.directory is not None and len(gateway.registry.directory) == 0


async def test_a_block_wise_registration_larger_than_max_payload_stops_at_once(
    make_gateway: Any, coap: Any
) -> None:
    gateway = await make_gateway(rd_config(max_payload=100, max_links=100))
    base = rd_uri(gateway)
    links = ",".join(f"</r{n}>" for n in range(40)).encode()  # ~250 bytes: 16-byte blocks
    message = aiocoap.Message(code=aiocoap.POST, uri=f"{base}/rd?ep=node-1", payload=links,
                              content_format=40)
    message.opt.block1 = aiocoap.optiontypes.BlockOption.BlockwiseTuple(0, True, 0)
    message.payload = links[:16]
    async with asyncio.timeout(WAIT):
        first = await coap.request(message, handle_blockwise=False).response
    assert first.code == aiocoap.CONTINUE
    message = aiocoap.Message(code=aiocoap.POST, uri=f"{base}/rd?ep=node-1",
                              payload=links[96:112], content_format=40)
    message.opt.block1 = aiocoap.optiontypes.BlockOption.BlockwiseTuple(6, True, 0)
    async with asyncio.timeout(WAIT):
        seventh = await coap.request(message, handle_blockwise=False).response
    assert seventh.code == aiocoap.REQUEST_ENTITY_TOO_LARGE and seventh.opt.size1 == 100


async def test_simple_registration_reads_the_endpoints_links(
    make_gateway: Any, make_client: Any
) -> None:
    gateway = await make_gateway(rd_config())
    client = await make_client(gateway.url)
    await client.call({"type": "watch"})
    async with SimulatedSensors("127.0.0.1", 0, interval=0.05, seed=1) as sensors:
        response = await sensors.request(aiocoap.Message(
            code=aiocoap.POST, uri=f"{rd_uri(gateway)}/.well-known/rd?ep=node-5"
        ))
        assert response.code == aiocoap.CHANGED, response.payload
        joined = await wait_catalog(client, lambda f: f["added"])
        assert {"node-5/temperature", "node-5/led"} <= names(joined["added"])


async def test_a_second_gateway_reads_the_first_ones_directory(
    make_gateway: Any, make_client: Any, coap: Any
) -> None:
    first = await make_gateway(rd_config())
    await ask(coap, aiocoap.POST, f"{rd_uri(first)}/rd?ep=node-1&base=coap://127.0.0.1:9",
              b'</t>;rt="temperature";obs,</u>')
    second = await make_gateway({
        "server": {"host": "127.0.0.1", "port": 0},
        "discovery": {"rd": rd_uri(first), "refresh": 3600},
        "rd": {"name_template": "{ep}:{path}"},
    })
    client = await make_client(second.url)
    snapshot = await client.call({"type": "watch"})
    if not snapshot["added"]:  # the first read has not finished yet
        snapshot = await wait_catalog(client, lambda f: f["added"])
    assert names(snapshot["added"]) == {"node-1:t", "node-1:u"}
    assert {e["source"] for e in snapshot["added"]} == {rd_uri(first)}
    listed = await client.call({"type": "list"})
    entry = next(e for e in listed["resources"] if e["name"] == "node-1:t")
    assert entry["ep"] == "node-1" and entry["rt"] == "temperature"
    # Gone from the directory: gone from the catalogue at the next read.
    [reg] = first.registry.directory.registrations() if first.registry.directory else []
    assert (await ask(coap, aiocoap.DELETE, f"{rd_uri(first)}/{reg.id}")).code == aiocoap.DELETED
    change = await second.registry.read_directory(rd_uri(first))
    assert {e.name for e, _ in change.removed} == {"node-1:t", "node-1:u"}
    removed = await wait_catalog(client, lambda f: f["removed"])
    assert removed["removed"][0]["reason"] == f"no longer registered at {rd_uri(first)}"


async def test_demo_with_sensors_that_register_themselves(make_client: Any) -> None:
    from tests.test_cli import start_process

    demo = await start_process("demo", "--rd", "--port", "0")
    try:
        assert any(line.startswith("resource directory on coap://") for line in demo.lines)
        client = await make_client(demo.url)
        snapshot = await client.call({"type": "watch"})
        catalogue = names(snapshot["added"])
        while "demo/temperature" not in catalogue:  # the sensors register right after
            catalogue |= names((await wait_catalog(client, lambda f: f["added"]))["added"])
        sub = (await client.subscribe(name="demo/temperature"))["sub"]
        assert isinstance((await client.next_notify(sub))["value"], float)
        listed = await client.call({"type": "list"})
        assert {e.get("ep") for e in listed["resources"]} == {"demo"}
        await client.close()
    finally:
        assert await demo.terminate() == 0
    assert demo.process.stdout is not None
    assert "Traceback" not in (await demo.process.stdout.read()).decode()


async def test_a_block_wise_registration_within_max_payload_is_assembled(
    make_gateway: Any, coap: Any
) -> None:
    gateway = await make_gateway(rd_config(max_links=100))
    links = ",".join(f'</sensor/{n:03d}>;rt="temperature";ct=60;obs' for n in range(60))
    assert 1024 < len(links) <= 4096  # more than one block of aiocoap's 1024 bytes
    created = await ask(coap, aiocoap.POST, f"{rd_uri(gateway)}/rd?ep=node-big", links.encode())
    assert created.code == aiocoap.CREATED, created.payload
    assert len(gateway.registry.catalog) == 60
    assert gateway.registry.uri_for_name("node-big/sensor/059") is not None
    # The lookup answer is larger than a block too: served block-wise (Block2).
    found = await ask(coap, aiocoap.GET, f"{rd_uri(gateway)}/rd-lookup/res?ep=node-big")
    assert len(found.payload) > 1024
    assert len(parse_link_format(found.payload.decode())) == 60


async def test_ipv6_listen_and_source_base(make_gateway: Any, coap: Any) -> None:
    gateway = await make_gateway({
        "server": {"host": "127.0.0.1", "port": 0},
        "coap": {"listen": ["[::1]:0"]},
        "rd": {"allow_from": ["::1/128"]},
    })
    assert gateway.registry.server is not None
    host, port = gateway.registry.server.addresses[0]
    assert host == "::1" and port > 0
    created = await ask(coap, aiocoap.POST, f"coap://[::1]:{port}/rd?ep=v6", b"</t>")
    assert created.code == aiocoap.CREATED
    uri = gateway.registry.uri_for_name("v6/t")
    assert uri is not None and uri.startswith("coap://[::1]:") and uri.endswith("/t")
