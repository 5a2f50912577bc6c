"""The "bandwidth" scenario: bytes per update on each side of the gateway, and CPU per frame.

For three payloads (a CBOR number, a SenML-CBOR pack of 4 records, a 1 KiB JSON document) it
measures the bytes per update the sensor sends (the CoAP message, without UDP/IP headers)
and the bytes a client receives on the wire for it (the WebSocket message with its frame
header, without TCP/IP headers), in each of the client's modes:

    json              the default: JSON text frames, complete notifies
    json_compact      JSON, `"compact": true` on subscribe
    cbor_compact      the coap-ws-gateway.v1.cbor subprotocol, compact
    json_deflate      JSON with permessage-deflate (context takeover)
    compact_deflate   JSON compact with permessage-deflate

and, with N clients in one mode at a time (N = 1000 by default), the gateway's CPU per
delivered frame and its RSS per connection. The ratios to the CoAP notification are the
issue's targets: compact CBOR <= 2.5, JSON + deflate <= 1.5, compact + deflate <= 1.0.

The sensor is a small raw-UDP CoAP notifier in this process (its message bytes are known
exactly); the gateway is a child process (its CPU and RSS are read from /proc); the clients
are raw TCP WebSocket clients in this process that do the handshake, send one subscribe and
then only count frames and bytes (they never decompress or decode: cheap enough for a
thousand in one process, and they see exactly the wire bytes).

    python -m bench.bandwidth [--clients N] [--rate HZ] [--window S] [--updates K]

prints a JSON object with the rows (`bench.run --only bandwidth` runs it as a scenario).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import random
import struct
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, cast

import cbor2

from .fast_sensor import (
    ACK,
    CON,
    CONTENT,
    CONTENT_FORMAT,
    EMPTY,
    GET,
    NON,
    NOT_FOUND,
    OBSERVE,
    RST,
    Message,
    MessageError,
    decode,
    encode,
    encode_uint,
)
from .loadgen import client_frame
from .procs import BenchError, Fleet, cpu_seconds, rss_bytes

CBOR_SUBPROTOCOL: Final = "coap-ws-gateway.v1.cbor"
CF_JSON, CF_CBOR, CF_SENML_CBOR = 50, 60, 112

MODES: Final[dict[str, dict[str, Any]]] = {
    "json": {"cbor": False, "compact": False, "deflate": False},
    "json_compact": {"cbor": False, "compact": True, "deflate": False},
    "cbor_compact": {"cbor": True, "compact": True, "deflate": False},
    "json_deflate": {"cbor": False, "compact": False, "deflate": True},
    "compact_deflate": {"cbor": False, "compact": True, "deflate": True},
}
TARGETS: Final = {"cbor_compact": 2.5, "json_deflate": 1.5, "compact_deflate": 1.0}
"""Bytes a client receives per update, at most this many times the CoAP notification."""


# -- the payloads ---------------------------------------------------------------------------------


class Payloads:
    """Each payload's next update: values that move as a real sensor's do."""

    def __init__(self, seed: int = 1) -> None:
        self.rng = random.Random(seed)
        self.temperature = 21.0
        self.channels = [3.3 + i / 10 for i in range(24)]

    def _walk(self, value: float, step: float) -> float:
        return round(value + self.rng.uniform(-step, step), 2)

    def cbor_number(self) -> tuple[int, bytes]:
        self.temperature = self._walk(self.temperature, 0.2)
        return CF_CBOR, cbor2.dumps(self.temperature)

    def senml4(self) -> tuple[int, bytes]:
        """RFC 8428 SenML-CBOR: base name and time in the first record, four readings."""
        self.temperature = self._walk(self.temperature, 0.2)
        pack = [
            {-2: "urn:dev:mac:0024befffe804ff1:", -3: round(time.time()), 0: "temp", 1: "Cel",
             2: self.temperature},
            {0: "hum", 1: "%RH", 2: self._walk(45.0, 3.0)},
            {0: "pres", 1: "Pa", 2: round(101325 + self.rng.uniform(-50, 50))},
            {0: "batt", 1: "%EL", 2: 87},
        ]
        return CF_SENML_CBOR, cbor2.dumps(pack)

    def json_1k(self) -> tuple[int, bytes]:
        """A 1 KiB JSON document of which a few numbers change per update."""
        for i in self.rng.sample(range(len(self.channels)), 3):
            self.channels[i] = self._walk(self.channels[i], 0.05)
        document = {
            "device": "plant-7/line-2/cabinet-4", "firmware": "2.14.3", "status": "running",
            "channels": [{"id": f"ch{i:02d}", "v": v, "unit": "V"}
                         for i, v in enumerate(self.channels)],
        }
        text = json.dumps(document, separators=(",", ":"))
        document["pad"] = "x" * max(0, 1024 - len(text) - 9)
        return CF_JSON, json.dumps(document, separators=(",", ":")).encode()


PAYLOADS: Final = {"cbor_number": Payloads.cbor_number, "senml_cbor_4": Payloads.senml4,
                   "json_1k": Payloads.json_1k}


# -- the sensor -----------------------------------------------------------------------------------


Address = tuple[str, int]


@dataclass(slots=True, eq=False)
class Observed:
    name: str
    observers: dict[tuple[Address, bytes], None] = field(default_factory=dict)
    observe: int = 2
    cf: int = CF_CBOR
    payload: bytes = b""
    message_bytes: list[int] = field(default_factory=list)
    """The size of each notification sent (CoAP message, no UDP/IP headers)."""


class Sensor(asyncio.DatagramProtocol):
    """Serves /<payload name> for each payload; `update()` notifies every observer (NON)."""

    def __init__(self) -> None:
        self.payloads = Payloads()
        self.resources = {f"/{name}": Observed(name) for name in PAYLOADS}
        for resource in self.resources.values():
            self._advance(resource)
        self.transport: asyncio.DatagramTransport | None = None
        self._mid = 0
        self._owners: dict[int, tuple[Observed, tuple[Address, bytes]]] = {}
        """Which observation a notification's message id belongs to (for RST)."""

    def _advance(self, resource: Observed) -> None:
        resource.cf, resource.payload = PAYLOADS[resource.name](self.payloads)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def _next_mid(self) -> int:
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    def _send(self, message: Message, addr: Address) -> int:
        data = encode(message)
        if self.transport is not None:
            self.transport.sendto(data, addr)
        return len(data)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        try:
            request = decode(data)
        except MessageError:
            return
        if request.mtype == RST:  # the observer is gone: forget it
            owner = self._owners.pop(request.mid, None)
            if owner is not None:
                owner[0].observers.pop(owner[1], None)
            return
        if request.code == EMPTY:
            if request.mtype == CON:  # CoAP ping
                self._send(Message(RST, EMPTY, request.mid), addr)
            return
        resource = self.resources.get(request.path)
        options: list[tuple[int, bytes]] = []
        payload = b""
        code = NOT_FOUND
        if resource is not None and request.code == GET:
            code = CONTENT
            observe = request.option_uint(OBSERVE)
            if observe == 0:
                resource.observers[(addr, request.token)] = None
                options.append((OBSERVE, encode_uint(resource.observe)))
                resource.observe += 1
            elif observe == 1:
                resource.observers.pop((addr, request.token), None)
            options.append((CONTENT_FORMAT, encode_uint(resource.cf)))
            payload = resource.payload
        mtype, mid = (ACK, request.mid) if request.mtype == CON else (NON, self._next_mid())
        self._send(Message(mtype, code, mid, request.token, options, payload), addr)

    def update(self, path: str) -> None:
        resource = self.resources[path]
        self._advance(resource)
        observe = encode_uint(resource.observe)
        resource.observe = (resource.observe + 1) & 0xFFFFFF
        for key in resource.observers:
            addr, token = key
            mid = self._next_mid()
            self._owners[mid] = (resource, key)
            message = Message(NON, CONTENT, mid, token,
                              [(OBSERVE, observe), (CONTENT_FORMAT, encode_uint(resource.cf))],
                              resource.payload)
            resource.message_bytes.append(self._send(message, addr))


# -- the clients ----------------------------------------------------------------------------------


class RawClient(asyncio.Protocol):
    """A WebSocket client on a bare transport: handshake, one subscribe, then it counts the
    data frames it receives and their bytes on the wire (header included)."""

    def __init__(self, host: str, port: int, mode: dict[str, Any]) -> None:
        self.mode = mode
        key = base64.b64encode(os.urandom(16)).decode()
        lines = ["GET /ws HTTP/1.1", f"Host: {host}:{port}", "Upgrade: websocket",
                 "Connection: Upgrade", f"Sec-WebSocket-Key: {key}",
                 "Sec-WebSocket-Version: 13"]
        if mode["cbor"]:
            lines.append(f"Sec-WebSocket-Protocol: {CBOR_SUBPROTOCOL}")
        if mode["deflate"]:
            lines.append("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits")
        self.request = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.transport: asyncio.Transport | None = None
        self.opened: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.buffer = bytearray()
        self.head_done = False
        self.frames = 0
        self.frames_at_start = 0
        self.wire = 0
        self.compressed = 0
        self.changed = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if not self.head_done:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buffer[:end]).decode("latin-1")
            del self.buffer[:end + 4]
            self.head_done = True
            if not head.startswith("HTTP/1.1 101"):
                self.opened.set_exception(BenchError(f"handshake refused: {head[:80]!r}"))
                return
            lowered = head.lower()
            if self.mode["deflate"] and "permessage-deflate" not in lowered:
                self.opened.set_exception(BenchError("permessage-deflate was not negotiated"))
                return
            if self.mode["cbor"] and CBOR_SUBPROTOCOL not in head:
                self.opened.set_exception(BenchError("the CBOR subprotocol was not chosen"))
                return
            self.opened.set_result(head)
        buffer = self.buffer
        while len(buffer) >= 2:
            first, second = buffer[0], buffer[1] & 0x7F
            offset = 2
            if second == 126:
                if len(buffer) < 4:
                    break
                second, offset = struct.unpack_from("!H", buffer, 2)[0], 4
            elif second == 127:
                if len(buffer) < 10:
                    break
                second, offset = struct.unpack_from("!Q", buffer, 2)[0], 10
            total = offset + second
            if len(buffer) < total:
                break
            if first & 0x0F in (1, 2):  # data frames only (not pings, pongs, close)
                self.frames += 1
                self.wire += total
                if first & 0x40:
                    self.compressed += 1
            del buffer[:total]
        self.changed.set()

    def subscribe(self, uri: str) -> None:
        frame: dict[str, Any] = {"type": "subscribe", "uri": uri}
        if self.mode["compact"]:
            frame["compact"] = True
        if self.mode["cbor"]:
            data, opcode = cbor2.dumps(frame), 2
        else:
            data, opcode = json.dumps(frame).encode(), 1
        assert self.transport is not None
        self.transport.write(client_frame(data, opcode))

    async def wait_frames(self, count: int, timeout: float) -> None:
        async with asyncio.timeout(timeout):
            while self.frames < count:
                self.changed.clear()
                await self.changed.wait()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()


async def open_clients(host: str, port: int, mode: dict[str, Any], n: int,
                       uri: str) -> list[RawClient]:
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(50)

    async def one() -> RawClient:
        async with gate:
            _, client = await loop.create_connection(
                lambda: RawClient(host, port, mode), host, port)
            async with asyncio.timeout(30):
                await client.opened
            client.subscribe(uri)
            await client.wait_frames(2, 30)  # subscribed, then the cached notify
            return client

    return list(await asyncio.gather(*(one() for _ in range(n))))


# -- the gateway ----------------------------------------------------------------------------------


async def measure_memory(sensor: Sensor, gateway_pid: int, host: str, port: int,
                         sensor_uri: str, clients: int) -> dict[str, Any]:
    """RSS per connection, plain and compressed, each group kept open on top of the last:
    a first plain group absorbs the heap's growth, then a compressed group and a second
    plain group are measured with a few updates each (so zlib's buffers are touched)."""
    path = "/cbor_number"
    groups: list[list[RawClient]] = []
    rss: list[int] = [rss_bytes(gateway_pid)]
    try:
        for mode in ("json", "json_deflate", "json"):
            groups.append(await open_clients(host, port, MODES[mode], clients,
                                             sensor_uri + path))
            await _updates(sensor, path, 5, 20.0)
            await asyncio.sleep(0.5)
            rss.append(rss_bytes(gateway_pid))
    finally:
        for group in groups:
            for client in group:
                client.close()
    await asyncio.sleep(1.0)
    plain = (rss[3] - rss[2]) / clients
    compressed = (rss[2] - rss[1]) / clients
    return {"clients": clients, "plain_bytes_per_connection": round(plain),
            "deflate_bytes_per_connection": round(compressed),
            "deflate_extra_bytes_per_connection": round(compressed - plain)}


def gateway_toml(directory: Path, sensor_port: int, deflate: tuple[int, int]) -> Path:
    """The gateway's configuration; `deflate`: its window bits and memory level."""
    path = directory / f"gateway-bandwidth-{deflate[0]}-{deflate[1]}.toml"
    path.write_text(f"""# written by bench/bandwidth.py
log_level = "warning"

[server]
host = "127.0.0.1"
port = 0
linger = 0.0
compression = "deflate"
deflate_window_bits = {deflate[0]}
deflate_memory_level = {deflate[1]}

[policy]
allow = ["coap://127.0.0.1:{sensor_port}/*"]

[limits]
max_subscriptions = 10000
max_connections = 25000
max_connections_per_ip = 25000
rate = 0.0
ping_interval = 0
""")
    return path


# -- the measurements -----------------------------------------------------------------------------


async def _updates(sensor: Sensor, path: str, count: int, rate: float) -> None:
    for _ in range(count):
        sensor.update(path)
        await asyncio.sleep(1 / rate)


async def measure_bytes(sensor: Sensor, host: str, port: int, sensor_uri: str,
                        updates: int, rate: float) -> list[dict[str, Any]]:
    """Per payload: one client per mode, `updates` updates; bytes per update each side."""
    rows = []
    for name in PAYLOADS:
        path = f"/{name}"
        uri = sensor_uri + path
        clients = {mode: (await open_clients(host, port, MODES[mode], 1, uri))[0]
                   for mode in MODES}
        resource = sensor.resources[path]
        resource.message_bytes.clear()
        before = {mode: (c.frames, c.wire) for mode, c in clients.items()}
        await _updates(sensor, path, updates, rate)
        for mode, client in clients.items():
            await client.wait_frames(before[mode][0] + updates, 30)
        coap = sum(resource.message_bytes) / len(resource.message_bytes)
        row: dict[str, Any] = {"payload": name, "coap_bytes": round(coap, 1),
                               "payload_bytes": len(resource.payload)}
        for mode, client in clients.items():
            per_update = (client.wire - before[mode][1]) / updates
            row[f"{mode}_bytes"] = round(per_update, 1)
            row[f"{mode}_ratio"] = round(per_update / coap, 2)
            client.close()
        rows.append(row)
    return rows


async def measure_cpu(sensor: Sensor, gateway_pid: int, host: str, port: int, sensor_uri: str,
                      clients: int, rate: float, window: float,
                      payloads: tuple[str, ...]) -> list[dict[str, Any]]:
    """Per payload and mode: `clients` clients, `rate` updates/s for `window` seconds; the
    gateway's CPU per delivered frame and its RSS per connection."""
    rows = []
    for name in payloads:
        path = f"/{name}"
        for mode in MODES:
            group = await open_clients(host, port, MODES[mode], clients, sensor_uri + path)
            await _updates(sensor, path, max(1, int(rate / 2)), rate)  # warm-up
            frames0 = sum(c.frames for c in group)
            for client in group:
                client.frames_at_start = client.frames
            cpu0, t0 = cpu_seconds(gateway_pid), time.monotonic()
            updates = max(1, int(rate * window))
            await _updates(sensor, path, updates, rate)
            # The last updates' frames, on a busy machine (a shortfall is reported).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await asyncio.gather(*(c.wait_frames(c.frames_at_start + updates, 5.0)
                                           for c in group))
            cpu1, t1 = cpu_seconds(gateway_pid), time.monotonic()
            frames = sum(c.frames for c in group) - frames0
            compressed = sum(c.compressed for c in group)
            rows.append({
                "payload": name, "mode": mode, "clients": clients, "rate": rate,
                "seconds": round(t1 - t0, 2), "frames": frames,
                "expected_frames": clients * max(1, int(rate * window)),
                "cpu_us_per_frame": round(1e6 * (cpu1 - cpu0) / frames, 2) if frames else None,
                "server_cpu_pct": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
                "compressed_frames": compressed,
            })
            for client in group:
                client.close()
            await asyncio.sleep(1.0)  # let the gateway forget them
    return rows


async def run(clients: int, rate: float, window: float, updates: int,
              cpu_payloads: tuple[str, ...], fleet: Fleet | None = None,
              deflate: tuple[int, int] = (12, 5)) -> dict[str, Any]:
    """The whole scenario; the gateway is a child of `fleet` (or of a fleet of its own),
    with `deflate` as its `deflate_window_bits` and `deflate_memory_level`."""
    if fleet is None:
        async with Fleet(Path(tempfile.mkdtemp(prefix="coap-ws-bandwidth-"))) as own:
            return await run(clients, rate, window, updates, cpu_payloads, own, deflate)
    loop = asyncio.get_running_loop()
    transport, sensor = await loop.create_datagram_endpoint(
        Sensor, local_addr=("127.0.0.1", 0))
    sensor_port = transport.get_extra_info("sockname")[1]
    sensor_uri = f"coap://127.0.0.1:{sensor_port}"
    try:
        gateway = await fleet.start(
            "gateway", [sys.executable, "-m", "translator", "serve", "--config",
                        str(gateway_toml(fleet.log_dir, sensor_port, deflate))],
            ready_pattern=r"listening on (ws://\S+)")
        url = gateway.ready["ready"]
        host, port = url.split("//")[1].split("/")[0].rsplit(":", 1)
        byte_rows = await measure_bytes(sensor, host, int(port), sensor_uri, updates,
                                        rate=20.0)
        # Memory before the CPU windows: their thousands of connections grow the heap, and
        # memory freed when they close is reused without showing in RSS.
        memory = await measure_memory(sensor, gateway.pid, host, int(port), sensor_uri,
                                      max(1, clients // 2))
        cpu_rows = await measure_cpu(sensor, gateway.pid, host, int(port), sensor_uri,
                                     clients, rate, window, cpu_payloads)
        await fleet.stop(gateway)
    finally:
        transport.close()
    return {"deflate": {"window_bits": deflate[0], "memory_level": deflate[1]},
            "bytes": byte_rows, "cpu": cpu_rows, "memory": memory, "targets": TARGETS}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bandwidth",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=10.0, help="updates/s in the CPU windows")
    parser.add_argument("--window", type=float, default=4.0)
    parser.add_argument("--updates", type=int, default=40,
                        help="updates per payload in the bytes measurement")
    parser.add_argument("--cpu-payloads", default="cbor_number,json_1k",
                        help="payloads of the CPU windows, comma-separated ('' for none)")
    parser.add_argument("--deflate", default="12:5", metavar="BITS:LEVEL",
                        help="the gateway's deflate_window_bits and deflate_memory_level")
    args = parser.parse_args(argv)
    bits, level = (int(part) for part in args.deflate.split(":"))
    result = asyncio.run(run(args.clients, args.rate, args.window, args.updates,
                             tuple(p for p in args.cpu_payloads.split(",") if p),
                             deflate=(bits, level)))
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
