"""Interop of the gateway's Resource Directory with CoAP software not written here.

- libcoap (Debian's libcoap3-bin): `coap-client-notls` registers a sensor at the gateway's
  directory and looks it up; `coap-server-notls` is that sensor (its `/time` is
  observable), and a WebSocket client receives its updates by name.
- aiocoap's own directory server (`aiocoap-rd`, installed with aiocoap): a gateway with
  `[discovery] rd` reads it into its catalogue.
- aiocoap's own RD client (`Registerer`) registering at the gateway is in tests/test_rd.py
  (`SimulatedSensors.register_at`), as is `coap-ws-gateway demo --rd`.

What each found is in docs/interop.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiocoap
import pytest
import pytest_asyncio

from tests.conftest import WAIT
from tests.optional import need
from tests.test_rd import rd_config, rd_uri, wait_catalog

CLIENT = "coap-client-notls"
SERVER = "coap-server-notls"


def libcoap() -> None:
    missing = [tool for tool in (CLIENT, SERVER) if shutil.which(tool) is None]
    need("libcoap", f"{' and '.join(missing)} not on PATH" if missing else None)


def free_udp_port() -> int:
    """A port nothing listens on now (the tools take a fixed port, not 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def run(*argv: str) -> str:
    """Run one command to its end (bounded), its standard output as text."""
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(WAIT):
            out, err = await process.communicate()
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    assert process.returncode == 0, (argv, out, err)
    return out.decode()


@contextlib.asynccontextmanager
async def serving(*argv: str, env: dict[str, str] | None = None) -> AsyncIterator[None]:
    process = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, **(env or {})},
    )
    try:
        yield
    finally:
        process.terminate()
        try:
            async with asyncio.timeout(WAIT):
                await process.wait()
        except TimeoutError:
            process.kill()
            await process.wait()


async def until_answers(uri: str) -> str:
    """GET `uri` with aiocoap until the server that was just started answers (it takes a
    moment to bind); its payload."""
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        async with asyncio.timeout(WAIT):
            while True:
                request = aiocoap.Message(code=aiocoap.GET, uri=uri)
                try:
                    async with asyncio.timeout(1):
                        response = await context.request(request).response
                except (TimeoutError, aiocoap.error.NetworkError):
                    continue  # not listening yet (an ICMP error, or nothing at all)
                if response.code.is_successful():
                    return str(response.payload.decode())
    finally:
        await context.shutdown()


@pytest_asyncio.fixture
async def libcoap_sensor() -> AsyncIterator[str]:
    libcoap()
    port = free_udp_port()
    async with serving(SERVER, "-A", "127.0.0.1", "-p", str(port), "-v", "0"):
        await until_answers(f"coap://127.0.0.1:{port}/.well-known/core")
        yield f"coap://127.0.0.1:{port}"


async def test_libcoap_registers_a_libcoap_sensor_and_a_websocket_client_watches_it(
    libcoap_sensor: str, make_gateway: Any, make_client: Any
) -> None:
    gateway = await make_gateway(rd_config(endpoints=["libcoap-*"]))
    client = await make_client(gateway.url)
    await client.call({"type": "watch"})
    rd = rd_uri(gateway)
    # The sensor's links, as a commissioning tool reads them: libcoap's client GETs them...
    links = await run(CLIENT, "-m", "get", f"{libcoap_sensor}/.well-known/core")
    assert "</time>" in links
    # ...and registers them at the gateway's directory, naming the sensor as the base.
    await run(CLIENT, "-m", "post", "-t", "40", "-e", links.strip(),
              f"{rd}/rd?ep=libcoap-1&lt=300&base={libcoap_sensor}")
    joined = await wait_catalog(client, lambda f: f["added"])
    added = {e["name"]: e for e in joined["added"]}
    assert added["libcoap-1/time"]["uri"] == f"{libcoap_sensor}/time"
    assert added["libcoap-1/time"]["observable"] is True
    assert added["libcoap-1/time"]["rt"] == "ticks"
    # libcoap's client finds it through both lookup interfaces.
    found = await run(CLIENT, "-m", "get", f"{rd}/rd-lookup/res?ep=libcoap-1&rt=ticks")
    assert f"<{libcoap_sensor}/time>" in found and f'anchor="{libcoap_sensor}"' in found
    found = await run(CLIENT, "-m", "get", f"{rd}/rd-lookup/ep?ep=libcoap-*")
    assert 'ep="libcoap-1"' in found
    # A WebSocket client receives the libcoap server's /time updates by name.
    sub = (await client.subscribe(name="libcoap-1/time"))["sub"]
    first = await client.next_notify(sub)
    second = await client.next_notify(sub)
    assert second["seq"] > first["seq"]
    # libcoap's /time answers carry no Content-Format option (docs/interop.md); the `ct=0`
    # it registered with decodes them as text.
    assert first["cf"] is None
    assert isinstance(second["value"], str) and second["value"]
    # Observed (the answer carried Observe: updates are notifications, not polls).
    listed = await client.call({"type": "list"})
    entry = next(e for e in listed["resources"] if e["name"] == "libcoap-1/time")
    assert entry["observable"] is True and entry["registrations"] == 1
    assert entry["ep"] == "libcoap-1"


async def test_libcoap_client_gets_the_directory_s_refusals(make_gateway: Any) -> None:
    libcoap()
    gateway = await make_gateway(rd_config(endpoints=["libcoap-*"]))
    rd = rd_uri(gateway)
    # coap-client prints the code of an error response as "4.03 ..." on standard error and
    # exits 0 here; the directory is unchanged.
    process = await asyncio.create_subprocess_exec(
        CLIENT, "-m", "post", "-t", "40", "-e", "</x>", f"{rd}/rd?ep=intruder",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(WAIT):
        out, err = await process.communicate()
    assert b"4.03" in out + err, (out, err)
    assert gateway.registry.directory is not None and len(gateway.registry.directory) == 0


async def test_a_gateway_reads_aiocoap_rd(make_gateway: Any, make_client: Any) -> None:
    aiocoap_rd = Path(sys.executable).with_name("aiocoap-rd")
    assert aiocoap_rd.exists(), "aiocoap-rd comes with aiocoap"
    port = free_udp_port()
    directory = f"coap://127.0.0.1:{port}"
    # udp6 only: aiocoap's default server transports would also listen on TCP and WebSocket.
    async with serving(str(aiocoap_rd), "--bind", f"127.0.0.1:{port}",
                       env={"AIOCOAP_SERVER_TRANSPORT": "udp6"}):
        await until_answers(f"{directory}/.well-known/core")
        context = await aiocoap.Context.create_client_context(transports=["udp6"])
        try:
            register = aiocoap.Message(
                code=aiocoap.POST,
                uri=f"{directory}/resourcedirectory/?ep=node-a&base=coap://127.0.0.1:5700",
                payload=b'</temp>;rt="temperature";obs;ct=60,</hum>', content_format=40,
            )
            async with asyncio.timeout(WAIT):
                created = await context.request(register).response
            assert created.code == aiocoap.CREATED
        finally:
            await context.shutdown()
        gateway = await make_gateway({
            "server": {"host": "127.0.0.1", "port": 0},
            "discovery": {"rd": directory, "refresh": 3600},
        })
        client = await make_client(gateway.url)
        snapshot = await client.call({"type": "watch"})
        if not snapshot["added"]:
            snapshot = await wait_catalog(client, lambda f: f["added"])
        by_name = {e["name"]: e for e in snapshot["added"]}
        assert set(by_name) == {"node-a/temp", "node-a/hum"}
        assert by_name["node-a/temp"]["uri"] == "coap://127.0.0.1:5700/temp"
        assert by_name["node-a/temp"]["rt"] == "temperature"
        assert by_name["node-a/temp"]["cf"] == 60 and by_name["node-a/temp"]["source"] == directory
        assert gateway.registry.reads >= 1


if sys.platform != "linux":  # pragma: no cover
    pytestmark = pytest.mark.skip("the interop tools are run as Linux processes")
