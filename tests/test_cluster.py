"""Several gateways as one cluster over a real NATS server (translator/cluster/).

Each gateway here is a real `Gateway` with its own NATS connection, CoAP endpoint and
WebSocket server; what one node knows reaches another only through NATS. The test that kills
a node runs it as a process of its own (SIGKILL leaves no chance to clean up). The sensor is
the simulated one: its registration and observer counts say what the constrained network
sees.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiocoap
import aiocoap.resource as resource
import cbor2
import pytest
import pytest_asyncio
import trustme
from websockets.asyncio.client import connect

from tests.conftest import CBOR_SUBPROTOCOL, WAIT, Client, gateway_config
from tests.natsserver import NatsServer, running_nats_server
from tests.test_coap_ws import CSM_BYTES, GET, CoapClient, proxy
from tests.test_encodings_e2e import CF_CBOR, CF_JSON, EXOTIC, Device, Settable
from translator.cluster.names import resource_key
from translator.core.coap_ws import CONTENT_FORMAT, CSM, OBSERVE, dotted, uint
from translator.gateway import Gateway
from translator.sim import SimulatedSensors, _bound_port

LEASE_TTL = 2.0
"""Short, so that failovers happen within a test's patience."""
HANDOVER = 4 * LEASE_TTL + WAIT
"""Seconds a takeover may take here: the lease's TTL, the check period, one registration,
and the loaded machine's delays."""
TEMPERATURE = "/temperature"


def cluster_mapping(
    sensors: SimulatedSensors, url: str, node: str, **cluster: Any
) -> dict[str, Any]:
    mapping = gateway_config(sensors)
    mapping["cluster"] = {
        "nats": [url], "node": node, "lease_ttl": LEASE_TTL, "interest_ttl": LEASE_TTL,
        **cluster,
    }
    return mapping


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    yield from running_nats_server(tmp_path)


@pytest_asyncio.fixture
async def make_node(
    sensors: SimulatedSensors, make_gateway: Callable[[dict[str, Any]], Any]
) -> Callable[..., Any]:
    async def make(
        server: NatsServer, node: str, *, wait_joined: bool = True, allow: tuple[str, ...] = (),
        limits: dict[str, Any] | None = None, history: dict[str, Any] | None = None,
    ) -> Gateway:
        mapping = cluster_mapping(sensors, server.url, node)
        mapping["policy"]["allow"].extend(allow)
        if limits:
            mapping.setdefault("limits", {}).update(limits)
        if history:
            mapping["history"] = history
        gateway: Gateway = await make_gateway(mapping)
        assert gateway.cluster is not None
        if wait_joined:
            async with asyncio.timeout(WAIT):
                await gateway.cluster.joined.wait()
        return gateway

    return make


async def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll a condition of state the test cannot await (counts at the sensor, NATS)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s")
        await asyncio.sleep(0.05)


async def notifies(client: Client, count: int, timeout: float = WAIT) -> list[dict[str, Any]]:
    return [await client.next_notify(timeout=timeout) for _ in range(count)]


def readyz(gateway: Gateway) -> str:
    url = f"http://127.0.0.1:{gateway.ws.port}/readyz"
    with urllib.request.urlopen(url, timeout=WAIT) as answer:
        text: str = answer.read().decode()
    return text


# -------------------------------------------------------------------------------------------


async def test_three_nodes_deliver_identical_frames_from_one_registration(
    nats_server: NatsServer, sensors: SimulatedSensors, make_node: Any, make_client: Any
) -> None:
    nodes = [await make_node(nats_server, f"n{i}") for i in range(3)]
    clients: list[Client] = [await make_client(node.url) for node in nodes]
    subscribed = [await c.subscribe(name="temperature") for c in clients]
    # The same resource is the same `sub` and epoch everywhere: a client may resume on any node.
    assert len({(s["sub"], s["epoch"]) for s in subscribed}) == 1, subscribed

    frames = [await notifies(c, 15) for c in clients]
    by_seq = [{f["seq"]: f for f in got} for got in frames]
    common = set(by_seq[0]) & set(by_seq[1]) & set(by_seq[2])
    assert len(common) >= 5, [sorted(b) for b in by_seq]
    for seq in common:
        assert by_seq[0][seq] == by_seq[1][seq] == by_seq[2][seq]
    for got in frames:
        seqs = [f["seq"] for f in got]
        assert seqs == sorted(set(seqs)), seqs  # each once, in order

    assert sensors.registrations(TEMPERATURE) == 1
    assert sensors.observer_count(TEMPERATURE) == 1
    owners = [n for n in nodes if n.cluster is not None and n.cluster.owned]
    assert len(owners) == 1
    # The operator's metrics say who registered: the owner, once.
    expositions = [n.metrics_registry.exposition().decode() for n in nodes]
    assert sum("coap_ws_gateway_registrations_total 1.0" in e for e in expositions) == 1
    assert sum("coap_ws_gateway_cluster_owned 1.0" in e for e in expositions) == 1
    assert all("coap_ws_gateway_cluster_degraded 0.0" in e for e in expositions)


async def test_foreign_junk_on_a_resource_subject_is_dropped_and_nothing_breaks(
    nats_server: NatsServer, sensors: SimulatedSensors, make_node: Any, make_client: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import nats

    nodes = [await make_node(nats_server, f"n{i}") for i in range(2)]
    clients: list[Client] = [await make_client(node.url) for node in nodes]
    for c in clients:
        await c.subscribe(name="temperature")
        await c.next_notify()
    uri = f"{sensors.base_uri}{TEMPERATURE}"
    nc = await nats.connect(nats_server.url)
    try:
        for junk in (b"not json", b"[1]", b'{"type":"notify"}', b'{"type":"status"}',
                     b'{"type":"notify","seq":"x"}', b"\xff\xfe"):
            await nc.publish(f"coapws.r.{resource_key(uri)}", junk)
        await nc.flush()
    finally:
        await nc.close()
    for c in clients:
        before = (await c.next_notify())["seq"]
        assert (await c.next_notify())["seq"] > before
    assert "dropped a malformed frame" in caplog.text
    assert sensors.registrations(TEMPERATURE) == 1


async def test_a_request_goes_from_the_clients_node_straight_to_the_sensor(
    nats_server: NatsServer, sensors: SimulatedSensors, make_node: Any, make_client: Any
) -> None:
    """A PUT from a client on the node that does not observe the resource reaches the sensor
    once, from that node; every node's watchers see its effect with the same `seq`; and the
    node's own policy answers what it does not allow, cluster or not."""
    nodes = [await make_node(nats_server, f"n{i}") for i in range(2)]
    watchers: list[Client] = [await make_client(node.url) for node in nodes]
    subs = [(await w.subscribe(name="led"))["sub"] for w in watchers]
    for watcher, sub in zip(watchers, subs, strict=True):
        assert (await watcher.next_notify(sub))["value"] == {"on": False}
    owner = next(i for i, node in enumerate(nodes) if node.cluster and node.cluster.owned)
    commander = await make_client(nodes[1 - owner].url)
    before = sensors.requests_seen["/led"]

    reply = await commander.call(
        {"type": "request", "method": "PUT", "name": "led", "value": {"on": True}}
    )
    assert reply["type"] == "response" and reply["code"] == "2.04", reply
    assert sensors.led_on is True
    assert sensors.requests_seen["/led"] == before + 1  # once, not once per node
    updates = [await w.next_notify(sub) for w, sub in zip(watchers, subs, strict=True)]
    assert all(u["value"] == {"on": True} for u in updates), updates
    assert updates[0] == {**updates[1], "sub": updates[0]["sub"]}
    assert sensors.registrations("/led") == 1

    refused = await commander.call(
        {"type": "request", "method": "GET", "uri": "coap://192.0.2.1/elsewhere"}
    )
    assert refused["type"] == "error" and refused["error"] == "forbidden", refused


async def test_late_subscriber_on_another_node_gets_the_latest_value_at_once(
    nats_server: NatsServer, sensors: SimulatedSensors, make_node: Any, make_client: Any
) -> None:
    first, second = [await make_node(nats_server, f"n{i}") for i in range(2)]
    early = await make_client(first.url)
    await early.subscribe(name="led")  # changes only when told to
    value = await early.next_notify()
    late = await make_client(second.url)
    await late.subscribe(name="led")
    got = await late.next_notify(timeout=WAIT)
    assert got == value
    assert sensors.registrations("/led") == 1


async def left_behind(
    node: Gateway, make_client: Any, keeper: Client
) -> tuple[dict[str, Any], int]:
    """A client of `node` watches the temperature, leaves after a few updates, and updates go
    on (`keeper`, also on `node`, keeps the observation): its `subscribed` and last `seq`."""
    client = await make_client(node.url)
    subscribed = await client.subscribe(name="temperature")
    since = (await notifies(client, 3))[-1]["seq"]
    await client.close()
    await keeper.wait_for(lambda f: f["type"] == "notify" and f["seq"] >= since + 10)
    return subscribed, since


async def resume(client: Client, subscribed: dict[str, Any], since: int) -> dict[str, Any]:
    return await client.call({"type": "subscribe", "name": "temperature",
                              "since": {"epoch": subscribed["epoch"], "seq": since}})


@pytest.mark.parametrize("slow_read", [False, True], ids=["read", "slow-read"])
async def test_a_client_resumes_on_a_node_that_never_watched_with_no_gap_and_no_duplicate(
    nats_server: NatsServer, make_node: Any, make_client: Any, slow_read: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    history = {"size": 200}  # 10 s of the simulated temperature: the test's own pace aside
    first = await make_node(nats_server, "n0", history=history)
    second = await make_node(nats_server, "n1", history=history)
    keeper: Client = await make_client(first.url)
    await keeper.subscribe(name="temperature")
    subscribed, since = await left_behind(first, make_client, keeper)
    resource = second.hub.resource(subscribed["uri"])
    assert resource is None or resource.last_notify is None  # the second never watched it
    assert second.cluster is not None
    if slow_read:
        # The read's answer comes late: updates are published after what it read and before
        # the second node joins the resource's subject. They must not be skipped.
        read = second.cluster.retained

        async def slowly(uri: str) -> Any:
            kept = await read(uri)
            assert kept
            newest = json.loads(kept[-1].text)["seq"]
            await keeper.wait_for(lambda f: f["type"] == "notify" and f["seq"] >= newest + 3)
            return kept

        monkeypatch.setattr(second.cluster, "retained", slowly)

    again: Client = await make_client(second.url)
    reply = await resume(again, subscribed, since)
    assert reply["type"] == "subscribed" and reply["recovered"] is True, reply
    assert reply["epoch"] == subscribed["epoch"] and again.seen == [reply]  # nothing before
    got: list[dict[str, Any]] = []
    while sum(not f.get("replay") for f in got) < 10:
        got.append(await again.next_notify())
        assert len(got) < 500
    # Every update after `since`, each once, in order: the replayed ones first, then live.
    assert [f["seq"] for f in got] == list(range(since + 1, since + 1 + len(got)))
    replayed = sum(bool(f.get("replay")) for f in got)
    assert replayed >= 10 and all(f.get("replay") for f in got[:replayed])
    assert [f for f in again.seen if f["type"] != "notify"] == [reply]
    # The same frames the first node's client got.
    await keeper.wait_for(lambda f: f["type"] == "notify" and f["seq"] >= got[-1]["seq"])
    kept = {f["seq"]: f for f in keeper.seen if f["type"] == "notify"}
    for frame in got:
        assert {k: v for k, v in frame.items() if k != "replay"} == kept[frame["seq"]]


async def test_a_resume_older_than_the_stream_keeps_gets_the_latest_value(
    nats_server: NatsServer, make_node: Any, make_client: Any
) -> None:
    history = {"size": 4}
    first = await make_node(nats_server, "n0", history=history)
    second = await make_node(nats_server, "n1", history=history)
    keeper: Client = await make_client(first.url)
    await keeper.subscribe(name="temperature")
    subscribed, since = await left_behind(first, make_client, keeper)
    again: Client = await make_client(second.url)
    reply = await resume(again, subscribed, since)
    assert reply["type"] == "subscribed" and reply["recovered"] is False, reply
    latest = await again.next_notify()
    assert "replay" not in latest and latest["seq"] >= since + 10
    following = await again.next_notify()
    assert following["seq"] > latest["seq"] and "replay" not in following


async def test_a_resume_on_a_node_cut_off_from_nats_gets_the_latest_value_without_error(
    nats_server: NatsServer, make_node: Any, make_client: Any
) -> None:
    first = await make_node(nats_server, "n0")
    second = await make_node(nats_server, "n1")
    keeper: Client = await make_client(first.url)
    await keeper.subscribe(name="temperature")
    subscribed, since = await left_behind(first, make_client, keeper)
    nats_server.stop()
    again: Client = await make_client(second.url)
    reply = await resume(again, subscribed, since)
    assert reply["type"] == "subscribed" and reply["recovered"] is False, reply
    # It observes by itself once it counts as cut off: values come, none replayed.
    got = await notifies(again, 3, timeout=HANDOVER)
    assert not any(f.get("replay") for f in got)
    assert not [f for f in again.seen if f["type"] == "error"]
    pong = await again.call({"type": "ping"})
    assert pong["type"] == "pong"


async def test_last_unsubscribe_anywhere_ends_the_observation_at_the_sensor(
    nats_server: NatsServer, sensors: SimulatedSensors, make_node: Any, make_client: Any
) -> None:
    nodes = [await make_node(nats_server, f"n{i}") for i in range(3)]
    clients: list[Client] = [await make_client(node.url) for node in nodes]
    subs = [await c.subscribe(name="temperature") for c in clients]
    for c in clients:
        await c.next_notify()
    # Unsubscribe on the owner first: the others still watch, the observation stays.
    owner = next(i for i, n in enumerate(nodes) if n.cluster and n.cluster.owned)
    order = [owner, *(i for i in range(3) if i != owner)]
    for i in order[:-1]:
        reply = await clients[i].call({"type": "unsubscribe", "sub": subs[i]["sub"]})
        assert reply["type"] == "unsubscribed"
    last = clients[order[-1]]
    before = (await last.next_notify())["seq"]
    assert (await last.next_notify())["seq"] > before
    assert sensors.observer_count(TEMPERATURE) == 1
    reply = await last.call({"type": "unsubscribe", "sub": subs[order[-1]]["sub"]})
    assert reply["type"] == "unsubscribed"
    await sensors.wait_observers(TEMPERATURE, 0, timeout=HANDOVER)
    await wait_until(lambda: not any(n.cluster and n.cluster.owned for n in nodes),
                     HANDOVER, "every lease given up")


async def test_owner_leaving_hands_over_with_seq_continuing(
    nats_server: NatsServer, sensors: SimulatedSensors, make_node: Any, make_client: Any
) -> None:
    nodes = [await make_node(nats_server, f"n{i}") for i in range(2)]
    clients: list[Client] = [await make_client(node.url) for node in nodes]
    for c in clients:
        await c.subscribe(name="temperature")
        await c.next_notify()
    owner_index = next(i for i, n in enumerate(nodes) if n.cluster and n.cluster.owned)
    survivor = clients[1 - owner_index]
    last_seq = (await survivor.next_notify())["seq"]
    await nodes[owner_index].stop()
    # The survivor registers again (its own registration), and numbering goes on.
    await wait_until(lambda: sensors.registrations(TEMPERATURE) == 2, HANDOVER, "takeover")
    after = await survivor.next_notify(timeout=HANDOVER)
    assert after["seq"] > last_seq
    await sensors.wait_observers(TEMPERATURE, 1, timeout=HANDOVER)


async def test_a_node_cut_off_from_nats_serves_what_it_observes_and_rejoins(
    nats_server: NatsServer, sensors: SimulatedSensors, make_node: Any, make_client: Any
) -> None:
    nats_server.stop()
    node = await make_node(nats_server, "alone", wait_joined=False)
    client = await make_client(node.url)
    await client.subscribe(name="temperature")
    got = await notifies(client, 3)  # observed by itself, NATS or not
    assert [f["seq"] for f in got] == sorted({f["seq"] for f in got})
    assert node.cluster is not None and node.cluster.problem is not None
    assert "degraded" in await asyncio.to_thread(readyz, node)

    nats_server.start()
    async with asyncio.timeout(HANDOVER):
        await node.cluster.joined.wait()
    assert await asyncio.to_thread(readyz, node) == "ready\n"
    # It holds the lease now: one observation at the sensor, and values still come.
    await wait_until(lambda: node.cluster is not None and TEMPERATURE in " ".join(
        node.cluster.owned), HANDOVER, "lease taken")
    await notifies(client, 3)
    assert sensors.observer_count(TEMPERATURE) == 1


async def test_a_cut_off_node_ends_what_its_clients_no_longer_watch(
    nats_server: NatsServer, sensors: SimulatedSensors, make_node: Any, make_client: Any
) -> None:
    nats_server.stop()
    node = await make_node(nats_server, "alone", wait_joined=False)
    client = await make_client(node.url)
    sub = await client.subscribe(name="temperature")
    await client.next_notify(timeout=HANDOVER)
    reply = await client.call({"type": "unsubscribe", "sub": sub["sub"]})
    assert reply["type"] == "unsubscribed"
    await sensors.wait_observers(TEMPERATURE, 0, timeout=HANDOVER)


async def test_nats_restarted_mid_stream(
    nats_server: NatsServer, sensors: SimulatedSensors, make_node: Any, make_client: Any
) -> None:
    nodes = [await make_node(nats_server, f"n{i}") for i in range(2)]
    clients: list[Client] = [await make_client(node.url) for node in nodes]
    for c in clients:
        await c.subscribe(name="temperature")
        await c.next_notify()
    nats_server.restart()
    for node in nodes:
        assert node.cluster is not None
        async with asyncio.timeout(HANDOVER):
            await node.cluster.joined.wait()
    # Both keep receiving, in order, and the sensor ends up with one observation again.
    await sensors.wait_observers(TEMPERATURE, 1, timeout=HANDOVER)
    for c in clients:
        got = await notifies(c, 5, timeout=HANDOVER)
        seqs = [f["seq"] for f in got]
        assert seqs == sorted(set(seqs)), seqs


async def test_churn_across_nodes_leaves_no_leases_interest_or_subscriptions(
    nats_server: NatsServer, sensors: SimulatedSensors, make_node: Any, make_client: Any
) -> None:
    import nats

    # Without the per-connection rate limit (50/s): on a quiet machine the churn is faster,
    # and what is tested here is what NATS holds afterwards, not the limit.
    nodes = [await make_node(nats_server, f"n{i}", limits={"rate": 0}) for i in range(3)]
    clients: list[Client] = [await make_client(node.url) for node in nodes]
    baseline = await asyncio.to_thread(nats_server.client_subscriptions)
    cycles, deadline = 0, time.monotonic() + 20
    while cycles < 500 and time.monotonic() < deadline:
        c = clients[cycles % 3]
        sub = await c.subscribe(name=("temperature", "humidity")[cycles % 2])
        reply = await c.call({"type": "unsubscribe", "sub": sub["sub"]})
        assert reply["type"] == "unsubscribed"
        cycles += 1
    assert cycles >= 30, cycles
    await sensors.wait_observers(TEMPERATURE, 0, timeout=HANDOVER)
    await sensors.wait_observers("/humidity", 0, timeout=HANDOVER)
    for node in nodes:
        assert node.cluster is not None
        await wait_until(lambda n=node: not n.cluster._joined and not n.cluster.owned,  # type: ignore[misc]
                         HANDOVER, "the node let go")
    # NATS itself holds no subscription more than before the churn.
    await wait_until(lambda: nats_server.client_subscriptions() == baseline, HANDOVER,
                     f"the nodes' subscriptions back to {baseline}")
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        for bucket in ("coapws_leases", "coapws_interest"):
            kv = await js.key_value(bucket)
            with pytest.raises(nats.js.errors.NoKeysError):
                await kv.keys()
    finally:
        await nc.close()


class TcpCut:
    """A TCP relay between one node and NATS that the test can cut and restore: a partition
    of that node alone (the others keep their connections)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def cut(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers |= {writer, up_writer}

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


async def test_a_partitioned_owner_keeps_its_clients_and_gives_way_on_return(
    nats_server: NatsServer, sensors: SimulatedSensors, make_gateway: Any, make_client: Any
) -> None:
    relay = TcpCut(nats_server.port)
    await relay.open()
    cut_off: Gateway = await make_gateway(cluster_mapping(sensors, relay.url, "cut"))
    other: Gateway = await make_gateway(cluster_mapping(sensors, nats_server.url, "other"))
    for node in (cut_off, other):
        assert node.cluster is not None
        async with asyncio.timeout(WAIT):
            await node.cluster.joined.wait()
    near, far = await make_client(cut_off.url), await make_client(other.url)
    await near.subscribe(name="temperature")  # first: the cut-off node owns it
    await near.next_notify()
    await wait_until(lambda: bool(cut_off.cluster and cut_off.cluster.owned), WAIT, "owner")
    await far.subscribe(name="temperature")
    last = (await far.next_notify())["seq"]

    await relay.cut()
    # The rest of the cluster takes over (stale, then online from the new owner)...
    status = await far.wait_for(lambda f: f["type"] == "status", timeout=HANDOVER)
    assert status["state"] == "stale", status
    got = await far.next_notify(timeout=HANDOVER)
    assert got["seq"] > last
    assert other.cluster is not None and other.cluster.owned
    # ...while the cut-off node keeps serving its own clients what it observes itself.
    await notifies(near, 3, timeout=HANDOVER)
    assert cut_off.cluster is not None and cut_off.cluster.problem is not None
    assert "degraded" in await asyncio.to_thread(readyz, cut_off)

    await relay.open()
    async with asyncio.timeout(HANDOVER):
        await cut_off.cluster.joined.wait()
    # Back: it gives the resource up to the node that holds the lease, and its clients get
    # the cluster's frames again; the sensor ends with one observation.
    await wait_until(lambda: cut_off.cluster is not None and not cut_off.cluster.owned,
                     HANDOVER, "the returning node gave way")
    await sensors.wait_observers(TEMPERATURE, 1, timeout=HANDOVER)
    rejoined = time.time()

    async def fresh(client: Client) -> dict[int, dict[str, Any]]:
        got: dict[int, dict[str, Any]] = {}
        while len(got) < 4:
            frame = await client.next_notify(timeout=HANDOVER)
            if frame["ts"] > rejoined:
                got[frame["seq"]] = frame
        return got

    near_frames, far_frames = await fresh(near), await fresh(far)
    shared = set(near_frames) & set(far_frames)
    assert shared, (sorted(near_frames), sorted(far_frames))
    for seq in shared:
        assert near_frames[seq] == far_frames[seq]


# -- separate processes ----------------------------------------------------------------------


class NodeProcess:
    """`coap-ws-gateway serve` as a cluster node in a process of its own."""

    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url


@pytest_asyncio.fixture
async def spawn_node(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[asyncio.subprocess.Process] = []

    async def spawn(sensors: SimulatedSensors, server: NatsServer, node: str) -> NodeProcess:
        config = tmp_path / f"{node}.toml"
        base = sensors.base_uri
        config.write_text(
            '[server]\nhost = "127.0.0.1"\nport = 0\nlinger = 0\n'
            f'[[sensors]]\nname = "temperature"\nuri = "{base}/temperature"\n'
            f'[policy]\nallow = ["{base}/*"]\n'
            f'[cluster]\nnats = ["{server.url}"]\nnode = "{node}"\n'
            f"lease_ttl = {LEASE_TTL}\ninterest_ttl = {LEASE_TTL}\n"
        )
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "translator", "serve", "--config", str(config),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        started.append(process)
        assert process.stdout is not None
        async with asyncio.timeout(WAIT * 2):
            while True:
                line = (await process.stdout.readline()).decode()
                if not line:
                    raise AssertionError(f"node {node} exited before listening")
                if line.startswith("listening on "):
                    return NodeProcess(process, line.split()[-1])

    try:
        yield spawn
    finally:
        for process in started:
            if process.returncode is None:
                process.kill()
                await process.wait()


async def lease_holder(server: NatsServer, uri: str) -> str:
    """The node that holds `uri`'s lease, read from NATS as an operator would."""
    import nats

    nc = await nats.connect(server.url)
    try:
        kv = await nc.jetstream().key_value("coapws_leases")
        entry = await kv.get(resource_key(uri))
        assert entry.value is not None
        return entry.value.decode()
    finally:
        await nc.close()


async def test_sigkill_of_the_owner_hands_over_within_the_lease_ttl(
    nats_server: NatsServer, sensors: SimulatedSensors, spawn_node: Any, make_client: Any
) -> None:
    nodes = [await spawn_node(sensors, nats_server, f"p{i}") for i in range(3)]
    clients: list[Client] = [await make_client(n.url) for n in nodes]
    for c in clients:
        await c.subscribe(name="temperature")
        await c.next_notify(timeout=HANDOVER)
    assert sensors.registrations(TEMPERATURE) == 1
    owner = await lease_holder(nats_server, f"{sensors.base_uri}{TEMPERATURE}")
    victim = int(owner.removeprefix("p"))
    survivors = [c for i, c in enumerate(clients) if i != victim]
    last = [(await c.next_notify())["seq"] for c in survivors]

    nodes[victim].process.send_signal(signal.SIGKILL)
    await nodes[victim].process.wait()
    killed_at = time.monotonic()
    # Every survivor sees the resource go stale, then online again from the new owner,
    # with `seq` going on from where it was: no client action.
    for c in survivors:
        status = await c.wait_for(lambda f: f["type"] == "status", timeout=HANDOVER)
        assert status["state"] == "stale", status
        online = await c.wait_for(lambda f: f["type"] == "status", timeout=HANDOVER)
        assert online["state"] == "online", [
            (f["type"], f.get("seq"), f.get("state"), f.get("reason")) for f in c.seen[-12:]
        ]
    got = [await c.next_notify(timeout=HANDOVER) for c in survivors]
    handover = time.monotonic() - killed_at
    assert all(g["seq"] > s for g, s in zip(got, last, strict=True)), (got, last)
    assert got[0] == got[1] or got[0]["seq"] != got[1]["seq"]
    # Exactly one more registration: the new owner's.
    assert sensors.registrations(TEMPERATURE) == 2
    assert handover < LEASE_TTL + WAIT, handover


# -- every kind of client on a node that does not own the resource ------------------------
# (the owner's frames cross NATS with the sensor's bytes: translator/cluster/wire.py)


@pytest_asyncio.fixture
async def device() -> AsyncIterator[Device]:
    resources = {"exotic": Settable(EXOTIC, CF_CBOR), "counter": Settable(cbor2.dumps(0), CF_CBOR)}
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


async def owner_and_other(
    make_node: Callable[..., Any], nats_server: NatsServer, device: Device,
    make_client: Callable[..., Any], *paths: str,
) -> tuple[Gateway, Gateway]:
    """Two nodes, (owner, other); a plain client on the first watches `paths`, so that the
    first owns them."""
    allow = (f"coap://127.0.0.1:{device.port}/*",)
    first = await make_node(nats_server, "n0", allow=allow)
    other = await make_node(nats_server, "n1", allow=allow)
    watcher: Client = await make_client(first.url)
    for path in paths:
        sub = (await watcher.subscribe(uri=device.uri(path)))["sub"]
        await watcher.next_notify(sub)
    assert first.cluster is not None and other.cluster is not None
    for path in paths:
        assert device.uri(path) in first.cluster.owned
    return first, other


async def test_cbor_and_compact_clients_on_a_non_owner_get_the_sensors_item_and_diffs(
    nats_server: NatsServer, device: Device, make_node: Any, make_client: Any
) -> None:
    _, other = await owner_and_other(
        make_node, nats_server, device, make_client, "exotic", "counter"
    )
    cbor: Client = await make_client(other.url, subprotocols=[CBOR_SUBPROTOCOL])
    assert cbor.cbor
    # The latest value at once (from the stream), then an update (a live relay): both with
    # the sensor's CBOR item (a tag, bignums and bytes the JSON mapping cannot carry).
    await cbor.subscribe(uri=device.uri("exotic"))
    got = await cbor.next_notify()
    assert got["value"] == cbor2.loads(EXOTIC)
    assert isinstance(got["value"][0], cbor2.CBORTag) and got["value"][1] == 2**70
    device.resources["exotic"].set(EXOTIC)
    later = await cbor.wait_for(lambda f: f["type"] == "notify" and f["seq"] > got["seq"])
    assert later["value"] == cbor2.loads(EXOTIC)

    # Compact, in CBOR, on the node that does not own the resource.
    full: Client = await make_client(other.url, subprotocols=[CBOR_SUBPROTOCOL])
    reply = await cbor.call({"type": "subscribe", "uri": device.uri("counter"),
                             "compact": True})
    await full.subscribe(uri=device.uri("counter"))
    sub = reply["sub"]
    first_counter = await cbor.next_notify(sub)
    assert {"uri", "code", "cf", "max_age"} <= set(first_counter)  # complete
    await full.next_notify(sub)
    counter = device.resources["counter"]
    counter.set(cbor2.dumps(1))
    second = await cbor.wait_for(
        lambda f: f["type"] == "notify" and f["sub"] == sub and f["seq"] > first_counter["seq"])
    assert set(second) == {"type", "sub", "seq", "value", "ts"} and second["value"] == 1
    reference = await full.wait_for(
        lambda f: f["type"] == "notify" and f["seq"] == second["seq"])
    assert {k: reference[k] for k in second} == second
    counter.set(b"2", CF_JSON)  # a change of content-format is said
    third = await cbor.wait_for(
        lambda f: f["type"] == "notify" and f["sub"] == sub and f["seq"] > second["seq"])
    assert third["cf"] == CF_JSON and third["value"] == 2 and "uri" not in third
    assert other.cluster is not None and not other.cluster.owned


async def test_a_conditional_subscription_on_a_non_owner_gets_what_its_condition_lets_through(
    nats_server: NatsServer, device: Device, make_node: Any, make_client: Any
) -> None:
    _, other = await owner_and_other(
        make_node, nats_server, device, make_client, "counter"
    )
    uri = device.uri("counter")
    plain: Client = await make_client(other.url)
    conditional: Client = await make_client(other.url)
    await plain.subscribe(uri=uri)
    assert (await plain.next_notify())["value"] == 0
    reply = await conditional.call({"type": "subscribe", "uri": uri, "cond": {"st": 2}})
    assert (await conditional.next_notify(reply["sub"]))["value"] == 0
    counter = device.resources["counter"]
    sent = [1, 3, 4, 10]
    for value in sent:
        counter.set(cbor2.dumps(value))
        await plain.wait_for(lambda f, v=value: f["type"] == "notify" and f["value"] == v)
    got = []
    while not got or got[-1] != 10:
        got.append((await conditional.next_notify(reply["sub"]))["value"])
    assert got == [3, 10]  # changes of at least 2 since the last one sent
    assert other.cluster is not None and uri not in other.cluster.owned


async def coap_client(gateway: Gateway) -> CoapClient:
    ws = await connect(gateway.coap_ws_url, subprotocols=["coap"],  # type: ignore[list-item]
                       open_timeout=WAIT)
    client = CoapClient(ws)
    assert (await client.recv()).code == CSM
    await client.send(CSM_BYTES)
    return client


async def test_an_rfc_8323_observer_on_a_non_owner_gets_the_sensors_bytes(
    nats_server: NatsServer, sensors: SimulatedSensors, device: Device, make_node: Any,
    make_client: Any,
) -> None:
    owner, other = await owner_and_other(
        make_node, nats_server, device, make_client, "exotic"
    )
    uri = device.uri("exotic")
    # On the node that does not own the resource, and on the owner (whose representation
    # also comes with its own relayed notify in a cluster).
    coaps = [await coap_client(other), await coap_client(owner)]
    try:
        tokens = [coap.token() for coap in coaps]
        seqs = []
        for coap, token in zip(coaps, tokens, strict=True):
            answer = await coap.request(GET, (OBSERVE, b""), proxy(uri), token=token)
            assert dotted(answer.code) == "2.05" and answer.first(OBSERVE) is not None
            assert answer.first(CONTENT_FORMAT) == uint(CF_CBOR)
            assert answer.payload == EXOTIC  # the sensor's bytes, from the owner over NATS
            seqs.append(int.from_bytes(answer.first(OBSERVE) or b"", "big"))
        changed = EXOTIC[:-4] + cbor2.dumps(b"new")
        device.resources["exotic"].set(changed)
        for coap, token, seq in zip(coaps, tokens, seqs, strict=True):
            note = await coap.wait_for(lambda m, t=token: m.token == t)
            assert note.payload == changed
            assert int.from_bytes(note.first(OBSERVE) or b"", "big") > seq
    finally:
        for coap in coaps:
            await coap.ws.close()
    assert other.cluster is not None and uri not in other.cluster.owned


# -- NATS over TLS, the server verifying the node's certificate ------------------------------


@pytest.fixture
def tls_files(tmp_path: Path) -> dict[str, str]:
    """A CA, the NATS server's certificate for 127.0.0.1, and a node's client certificate."""
    ca = trustme.CA()
    files = {name: str(tmp_path / f"{name}.pem") for name in (
        "ca", "server_cert", "server_key", "node_cert", "node_key", "other_ca")}
    ca.cert_pem.write_to_path(files["ca"])
    trustme.CA().cert_pem.write_to_path(files["other_ca"])
    for who, name in (("server", "127.0.0.1"), ("node", "gateway-node.example")):
        cert = ca.issue_cert(name)
        cert.cert_chain_pems[0].write_to_path(files[f"{who}_cert"])
        cert.private_key_pem.write_to_path(files[f"{who}_key"])
    return files


@pytest.fixture
def tls_nats_server(tmp_path: Path, tls_files: dict[str, str]) -> Iterator[NatsServer]:
    yield from running_nats_server(tmp_path, (
        "--tls", "--tlscert", tls_files["server_cert"], "--tlskey", tls_files["server_key"],
        "--tlsverify", "--tlscacert", tls_files["ca"],
    ))


async def test_a_node_joins_over_tls_with_its_certificate_and_not_without(
    tls_nats_server: NatsServer, tls_files: dict[str, str], sensors: SimulatedSensors,
    make_gateway: Callable[[dict[str, Any]], Any], make_client: Any,
) -> None:
    url = f"tls://127.0.0.1:{tls_nats_server.port}"

    async def node(name: str, **tls: str) -> Gateway:
        gateway: Gateway = await make_gateway(cluster_mapping(sensors, url, name, **tls))
        return gateway

    trusted = await node("n0", tls_ca=tls_files["ca"], tls_cert=tls_files["node_cert"],
                         tls_key=tls_files["node_key"])
    no_certificate = await node("n1", tls_ca=tls_files["ca"])
    wrong_ca = await node("n2", tls_ca=tls_files["other_ca"], tls_cert=tls_files["node_cert"],
                          tls_key=tls_files["node_key"])
    assert trusted.cluster is not None
    async with asyncio.timeout(WAIT):
        await trusted.cluster.joined.wait()
    client = await make_client(trusted.url)
    sub = (await client.subscribe(name="temperature"))["sub"]
    await notifies(client, 2)
    await wait_until(lambda: trusted.cluster is not None and TEMPERATURE in " ".join(
        trusted.cluster.owned), HANDOVER, "lease taken over TLS")
    assert (await client.call({"type": "unsubscribe", "sub": sub}))["type"] == "unsubscribed"
    # The server refuses a node without a client certificate, and a node refuses a server
    # its CA did not sign: both serve by themselves, degraded, and say so.
    for refused, why in ((no_certificate, "certificate required"),
                         (wrong_ca, "certificate verify failed")):
        assert refused.cluster is not None and not refused.cluster.joined.is_set()
        alone = await make_client(refused.url)
        sub = (await alone.subscribe(name="temperature"))["sub"]
        await notifies(alone, 2, timeout=HANDOVER)
        assert why in (refused.cluster.problem or "")
        assert why in await asyncio.to_thread(readyz, refused)
        # (Read up to the reply, so that the client's queue does not hold its close back.)
        assert (await alone.call({"type": "unsubscribe", "sub": sub}))["type"] == "unsubscribed"
    connections = await asyncio.to_thread(tls_nats_server.client_subscriptions)
    assert [name for name in connections if "coap-ws-gateway" in name] == [
        "coap-ws-gateway n0"], connections
