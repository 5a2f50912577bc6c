"""What /metrics counts (issue 14 §5), each against a real gateway, sensor and clients:
totals that outlive the connections they happened on, registration failures, and the
datagrams the kernel dropped at the gateway's CoAP socket."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from typing import Any

import pytest
from websockets.asyncio.client import connect

from translator.coap.batch import readers_of
from translator.coap.kernel_drops import kernel_drops
from translator.gateway import Gateway
from translator.sim import SimulatedSensors

from .conftest import WAIT, gateway_config
from .test_gateway_e2e import stalled_socket
from .test_operations import get, value

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="the kernel's drop count is Linux's /proc"
)


async def scrape(gateway: Gateway) -> str:
    status, _, body = await get(gateway.ws.port, "/metrics")
    assert status == 200
    return body


async def test_coalesced_and_dropped_frames_outlive_the_slow_consumer_they_happened_to(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any
) -> None:
    config = gateway_config(sensors)
    config["limits"] = {"max_lag": 1.0}
    gateway = await make_gateway(config)
    stalled = await connect(
        gateway.url, sock=stalled_socket(gateway.ws.port), compression=None, max_queue=1
    )
    blob = f"{sensors.base_uri}/blob"
    await stalled.send(json.dumps({"type": "subscribe", "id": 1, "uri": blob}))
    normal = await make_client(gateway.url)
    sub = (await normal.subscribe(uri=blob))["sub"]
    await sensors.wait_observers("/blob", 1)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    for update in range(100_000):  # bounded in count and time
        sensors.set_blob(update.to_bytes(4, "big") * 256)
        await normal.next_notify(sub)
        if gateway.ws.slow_consumers_closed or loop.time() > deadline:
            break
    (dropped,) = [c for c in gateway.ws.connections if c.closing]
    async with asyncio.timeout(WAIT):
        await dropped.finished
    assert dropped not in gateway.ws.connections
    replaced = dropped.outbox.replaced
    assert replaced > 0

    body = await scrape(gateway)
    assert value(body, "coap_ws_gateway_connections") == 1
    assert value(body, "coap_ws_gateway_slow_consumer_closes_total") == 1
    # Counted although the connection they happened on is gone (the normal client reads
    # every frame, so it replaced none).
    assert value(body, "coap_ws_gateway_coalesced_frames_total") == replaced
    # Closed for its lag or its outbox's bounds: at least one frame was waiting.
    assert value(body, "coap_ws_gateway_slow_consumer_dropped_frames_total") >= 1
    stalled.transport.abort()


async def test_registration_failures_are_counted_apart_from_registrations(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any, closed_udp_port: int
) -> None:
    dead = f"coap://127.0.0.1:{closed_udp_port}"
    config = gateway_config(sensors)
    config["policy"]["allow"].append(f"{dead}/*")
    gateway = await make_gateway(config)
    client = await make_client(gateway.url)
    await client.subscribe(name="temperature")
    await client.next_notify()
    body = await scrape(gateway)
    assert value(body, "coap_ws_gateway_registrations_total") == 1
    assert value(body, "coap_ws_gateway_registration_failures_total") == 0

    await client.subscribe(uri=f"{dead}/x")  # ICMP port unreachable
    offline = await client.wait_for(
        lambda frame: frame.get("type") == "status" and frame.get("state") == "offline"
    )
    assert "unreachable" in offline["reason"]
    body = await scrape(gateway)
    assert value(body, "coap_ws_gateway_registrations_total") >= 2
    assert value(body, "coap_ws_gateway_registration_failures_total") >= 1
    assert value(body, "coap_ws_gateway_upstream_failures_total") >= 1


@linux_only
async def test_datagrams_the_kernel_drops_at_the_coap_socket_are_counted(
    sensors: SimulatedSensors, make_gateway: Any, make_client: Any
) -> None:
    """The gateway's CoAP socket gets a tiny receive buffer, then 300 datagrams while the
    event loop is busy (this test sends them without yielding, so nothing reads them): the
    buffer holds a handful, the kernel drops the rest, and /metrics says how many."""
    gateway = await make_gateway(gateway_config(sensors))
    body = await scrape(gateway)
    assert value(body, "coap_ws_gateway_udp_kernel_drops_total") == 0  # not even bound yet
    client = await make_client(gateway.url)
    await client.subscribe(name="temperature")  # the socket is bound by its first send
    await client.next_notify()
    body = await scrape(gateway)
    assert value(body, "coap_ws_gateway_udp_kernel_drops_total") == 0
    (reader,) = readers_of(gateway.coap.context)
    target = reader.sock
    target.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    address = target.getsockname()
    loopback = "::1" if target.family == socket.AF_INET6 else "127.0.0.1"
    sent = 300
    with socket.socket(target.family, socket.SOCK_DGRAM) as flood:
        for _ in range(sent):
            flood.sendto(b"\xff" * 512, (loopback, address[1]))
    dropped = kernel_drops([target])
    assert dropped is not None and sent - 50 <= dropped <= sent + 10  # + a sensor's
    body = await scrape(gateway)
    assert value(body, "coap_ws_gateway_udp_kernel_drops_total") == dropped


@linux_only
def test_kernel_drops_reads_the_socket_row_and_is_unknown_without_the_tables() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        assert kernel_drops([sock]) == 0
        assert kernel_drops([sock], tables=("/dev/null",)) == 0  # listed nowhere: not bound
        assert kernel_drops([sock], tables=("/nonexistent/udp",)) is None
    assert kernel_drops([]) is None
