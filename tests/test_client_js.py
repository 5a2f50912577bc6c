"""The JavaScript client (translator/static/client.js, issue 14 §2): how the gateway serves it,
and the client itself, run by `node --test` against a real gateway.

Each tests/js/*.test.mjs file runs in its own node process, against a gateway and simulated
sensors this test starts in-process. Node reaches the gateway directly and through a TCP
relay that this test can sever (a cut connection) or stall (a dead link that closes nothing).
What node needs done on this side (cut, stall, restart the gateway) it asks over a control
connection, one JSON line per command, answered once done: nothing waits by sleeping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any, Final

import pytest
from websockets.asyncio.client import connect

from translator.config import config_from_mapping
from translator.gateway import Gateway
from translator.sim import SimulatedSensors
from translator.web.front import (
    CLIENT_FILES,
    PLAIN_CSP,
    answer_request,
    parse_head,
    static_bytes,
)

from .conftest import WAIT, Client, gateway_config
from .optional import need

JS_DIR: Final = Path(__file__).parent / "js"
TOKEN: Final = "client-js-test-token"
NODE_WAIT: Final = 180.0
"""Seconds one node run may take (it takes a few; the machine may be shared and slow)."""

JS_FILES: Final[dict[str, dict[str, Any]]] = {
    "client.test.mjs": {},
    "reconnect.test.mjs": {},
    # Two frames of history per resource: a few updates while away overflow it.
    "overflow.test.mjs": {"history": {"size": 2}},
}
"""Each node test file, and what its gateway's configuration adds."""


# --- serving ---------------------------------------------------------------------------------


def answer(method: str, path: str) -> Any:
    head = parse_head(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    return answer_request(head)


@pytest.mark.parametrize(
    ("path", "content_type"),
    [("/client.js", "text/javascript; charset=utf-8"),
     ("/client.d.ts", "application/typescript; charset=utf-8")],
)
def test_the_client_and_its_types_are_served(path: str, content_type: str) -> None:
    got = answer("GET", path)
    headers = dict(got.headers)
    assert got.status == 200 and got.body == static_bytes(path.lstrip("/"))
    assert b"export class GatewayClient" in got.body
    assert headers["Content-Type"] == content_type
    assert headers["Content-Length"] == str(len(got.body))
    # The headers of every answer: not framed, not sniffed, no Referer, runs nothing itself.
    assert headers["Content-Security-Policy"] == PLAIN_CSP
    assert headers["X-Frame-Options"] == "DENY"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"
    # A page of another origin imports a module with CORS; the code holds no secret.
    assert headers["Access-Control-Allow-Origin"] == "*"
    headed = answer("HEAD", f"{path}?v=1")
    assert headed.status == 200 and headed.body == b"" and headed.headers == got.headers


@pytest.mark.parametrize("path", list(CLIENT_FILES))
@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_on_the_client_get_405(path: str, method: str) -> None:
    got = answer(method, path)
    assert got.status == 405 and ("Allow", "GET, HEAD") in got.headers
    assert b"GatewayClient" not in got.body


def test_nothing_else_of_static_is_served() -> None:
    for path in ("/client", "/static/client.js", "/client.js/", "/index.js"):
        assert answer("GET", path).status == 404, path


def test_the_types_name_every_method_of_the_client() -> None:
    source = static_bytes("client.js").decode()
    types = static_bytes("client.d.ts").decode()
    klass = source[source.index("export class GatewayClient"):]
    public = set(re.findall(r"^  ([a-z]\w*)\(", klass, re.MULTILINE)) - {"constructor"}
    assert public == {"onState", "subscribe", "request", "list", "watch", "close"}
    for name in public:
        assert re.search(rf"^  {name}\(", types, re.MULTILINE), name


# --- node against a real gateway -------------------------------------------------------------


def node_missing() -> str | None:
    node = shutil.which("node")
    if node is None:
        return "no node on PATH"
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=False)
    found = re.fullmatch(r"v(\d+)\..*", version.stdout.strip())
    if found is None or int(found.group(1)) < 20:
        return f"node {version.stdout.strip() or '?'} is older than 20"
    return None


def node_command(files: list[Path]) -> list[str]:
    node = shutil.which("node")
    assert node is not None
    major = int(subprocess.run([node, "--version"], capture_output=True, text=True,
                               check=True).stdout.strip()[1:].split(".")[0])
    # Node 20 has the global WebSocket behind a flag; 22 and later have it by default.
    flags = ["--experimental-websocket"] if major < 22 else []
    return [node, *flags, "--test", "--test-reporter=tap", *map(str, files)]


class Relay:
    """A TCP relay to the gateway that can cut every connection it carries (`sever`), refuse
    new ones for a while (`refusing`), or stall the ones it carries without closing them
    (`stall`: what a dead link looks like to both ends)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.refusing = False
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._stalled: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        self.sever()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def sever(self) -> int:
        """Reset every connection (both sides see it at once); how many there were."""
        count = len(self._pairs)
        for client, upstream in self._pairs:
            client.transport.abort()
            upstream.transport.abort()
        self._pairs.clear()
        return count

    def stall(self) -> int:
        """Stop carrying bytes on the connections open now; they stay open."""
        for client, upstream in self._pairs:
            self._stalled.update((client, upstream))
        return len(self._pairs)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.refusing:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self._pairs.add(pair)
        for source, sink in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await source.read(65536):
                if sink in self._stalled:
                    continue  # swallowed: the peer waits for bytes that never come
                sink.write(data)
                await sink.drain()
        with contextlib.suppress(OSError):
            sink.close()


class Keeper:
    """A client of the gateway's own that stays subscribed to `temperature`: it keeps the
    observation (and so the updates) going while node is away, and counts them."""

    def __init__(self) -> None:
        self.client: Client | None = None
        self.seq = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def start(self, url: str) -> None:
        ws = await connect(f"{url}?access_token={TOKEN}", compression=None, open_timeout=WAIT)
        self.client = Client(ws)
        await self.client.subscribe(name="temperature")
        self.seq = 0
        self._task = asyncio.create_task(self._read())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.client is not None:
            await self.client.close()

    async def _read(self) -> None:
        assert self.client is not None
        with contextlib.suppress(Exception):
            async for message in self.client.ws:
                frame = json.loads(message)
                if frame["type"] == "notify":
                    async with self._changed:
                        self.seq = frame["seq"]
                        self._changed.notify_all()

    async def updates(self, count: int) -> list[int]:
        """Wait until the resource has moved `count` updates past where it is now."""
        start = self.seq
        async with asyncio.timeout(WAIT), self._changed:
            await self._changed.wait_for(lambda: self.seq >= start + count)
        return list(range(start + 1, self.seq + 1))


class Harness:
    """The gateway, relay and keeper one node file runs against, and the control channel."""

    def __init__(self, sensors: SimulatedSensors, mapping: dict[str, Any]) -> None:
        self.sensors = sensors
        self.mapping = mapping
        self.gateway: Gateway | None = None
        self.relay: Relay | None = None
        self.keeper = Keeper()
        self.commands: list[str] = []

    async def start_gateway(self) -> Gateway:
        gateway = Gateway(config_from_mapping(self.mapping))
        await gateway.start()
        self.gateway = gateway
        # A restart comes back on the same port: node's client knows no other address.
        self.mapping["server"]["port"] = gateway.ws.port
        await self.keeper.start(gateway.url)
        return gateway

    async def stop(self) -> None:
        await self.keeper.stop()
        if self.relay is not None:
            await self.relay.stop()
        if self.gateway is not None:
            await self.gateway.stop()

    async def serve_control(self, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                command = json.loads(line)
                self.commands.append(command["do"])
                reply = await self.execute(command)
                writer.write(json.dumps(reply).encode() + b"\n")
                await writer.drain()
        writer.close()

    async def execute(self, command: dict[str, Any]) -> dict[str, Any]:
        assert self.relay is not None and self.gateway is not None
        match command["do"]:
            case "cut":
                # Cut what node holds, and keep it out until `updates` more updates happened
                # at the gateway: those it must get replayed (or be told it cannot).
                self.relay.refusing = True
                severed = self.relay.sever()
                missed = await self.keeper.updates(command.get("updates", 0))
                self.relay.refusing = False
                return {"severed": severed, "missed": missed}
            case "stall":
                return {"stalled": self.relay.stall()}
            case "restart":
                await self.keeper.stop()
                await self.gateway.stop()
                await self.start_gateway()
                return {"port": self.gateway.ws.port}
        return {"error": f"unknown command {command['do']!r}"}


def silent_udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    return sock


def test_every_node_test_file_runs() -> None:
    assert sorted(p.name for p in JS_DIR.glob("*.test.mjs")) == sorted(JS_FILES)


@pytest.mark.parametrize("js_file", list(JS_FILES))
async def test_the_client_in_node(js_file: str, sensors: SimulatedSensors) -> None:
    need("node", node_missing())
    silent = silent_udp_socket()  # a sensor that is up and never answers
    silent_uri = f"coap://127.0.0.1:{silent.getsockname()[1]}/x"
    mapping = gateway_config(sensors, linger=30)
    mapping["policy"]["allow"].append(silent_uri)
    mapping["auth"] = {"tokens": [{"token": TOKEN, "name": "js", "scopes": ["read", "write"]}]}
    mapping.update(JS_FILES[js_file])
    harness = Harness(sensors, mapping)
    control = await asyncio.start_server(harness.serve_control, "127.0.0.1", 0)
    try:
        gateway = await harness.start_gateway()
        harness.relay = Relay(gateway.ws.port)
        relay_port = await harness.relay.start()
        env = {
            **os.environ,
            "GATEWAY_URL": gateway.url,
            "RELAY_URL": f"ws://127.0.0.1:{relay_port}/ws",
            "GATEWAY_HTTP": f"http://127.0.0.1:{gateway.ws.port}",
            "GATEWAY_TOKEN": TOKEN,
            "SILENT_URI": silent_uri,
            "CONTROL_PORT": str(control.sockets[0].getsockname()[1]),
        }
        process = await asyncio.create_subprocess_exec(
            *node_command([JS_DIR / js_file]), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        try:
            async with asyncio.timeout(NODE_WAIT):
                output, _ = await process.communicate()
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        text = output.decode(errors="replace")
        print(text)
        assert process.returncode == 0, f"node failed ({process.returncode}):\n{text}"
        assert re.search(r"^# fail 0$", text, re.MULTILINE), text
    finally:
        control.close()
        await harness.stop()
        silent.close()
