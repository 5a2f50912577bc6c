"""A minimal, cheap CoAP notifier on a plain asyncio UDP socket (RFC 7252 + RFC 7641).

Serves resources /r/0 … /r/K-1. A GET with Observe = 0 registers an observer (answered
2.05 with the Observe option); the sensor then sends NON 2.05 notifications at a fixed total
rate, round-robin over the observed resources, each with an incrementing 24-bit Observe
number and a CBOR payload ``{"t": <send time, time.time()>, "n": <update number>}`` (plus
``"p": "xxx…"`` padding with ``--pad``). GET with Observe = 1 and RST (matched by the message
id of a notification) deregister. Plain GET answers the current value; PUT/POST store it and
answer 2.04. `/.well-known/core` lists the resources.

It exists so that on a 2-core machine the sensor does not steal the gateway's core: one
notification costs a few microseconds (header and payload are packed by hand; no aiocoap).

    python -m bench.fast_sensor [--port 0] [--resources K] [--rate R] [--pad BYTES]

prints ``sensor on coap://127.0.0.1:PORT`` when ready, then takes JSON commands on stdin
(see `bench.control`): ``rate`` (notifications per second in total), ``stats``, ``reset``
(forget every observer), ``quit``.
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Final, cast

from .control import command_loop, emit, raise_nofile

# -- message format --------------------------------------------------------------------------

CON, NON, ACK, RST = 0, 1, 2, 3
GET, POST, PUT, DELETE = 0x01, 0x02, 0x03, 0x04
CONTENT, CHANGED = 0x45, 0x44  # 2.05, 2.04
BAD_REQUEST, NOT_FOUND, METHOD_NOT_ALLOWED = 0x80, 0x84, 0x85
EMPTY = 0x00

OBSERVE: Final = 6
URI_PATH: Final = 11
CONTENT_FORMAT: Final = 12
CF_CBOR: Final = 60
CF_LINK_FORMAT: Final = 40


class MessageError(ValueError):
    """Bytes that are not a well-formed CoAP message."""


@dataclass(slots=True)
class Message:
    mtype: int
    code: int
    mid: int
    token: bytes = b""
    options: list[tuple[int, bytes]] = field(default_factory=list)
    payload: bytes = b""

    def option(self, number: int) -> bytes | None:
        for num, value in self.options:
            if num == number:
                return value
        return None

    def option_uint(self, number: int) -> int | None:
        value = self.option(number)
        return None if value is None else int.from_bytes(value, "big")

    @property
    def path(self) -> str:
        return "/" + "/".join(v.decode("utf-8", "replace") for n, v in self.options
                              if n == URI_PATH)


def encode_uint(value: int) -> bytes:
    """The minimal big-endian form of an option's uint value (0 is empty)."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _nibble(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes((value - 13,))
    if value < 65805:
        return 14, struct.pack(">H", value - 269)
    raise MessageError(f"option delta or length {value} too large")


def encode_options(options: list[tuple[int, bytes]]) -> bytes:
    out = bytearray()
    previous = 0
    for number, value in sorted(options, key=lambda o: o[0]):  # stable: repeats keep order
        delta, delta_ext = _nibble(number - previous)
        length, length_ext = _nibble(len(value))
        out.append(delta << 4 | length)
        out += delta_ext + length_ext + value
        previous = number
    return bytes(out)


def encode(message: Message) -> bytes:
    if len(message.token) > 8:
        raise MessageError("token longer than 8 bytes")
    head = struct.pack(
        ">BBH", 0x40 | message.mtype << 4 | len(message.token), message.code, message.mid
    )
    out = head + message.token + encode_options(message.options)
    if message.payload:
        out += b"\xff" + message.payload
    return out


def decode(data: bytes) -> Message:
    if len(data) < 4:
        raise MessageError("shorter than the 4-byte header")
    first, code, mid = struct.unpack_from(">BBH", data)
    if first >> 6 != 1:
        raise MessageError(f"version {first >> 6}, not 1")
    mtype, tkl = first >> 4 & 3, first & 0x0F
    if tkl > 8:
        raise MessageError(f"token length {tkl}")
    if len(data) < 4 + tkl:
        raise MessageError("truncated token")
    token = data[4:4 + tkl]
    pos = 4 + tkl
    options: list[tuple[int, bytes]] = []
    number = 0
    payload = b""
    while pos < len(data):
        byte = data[pos]
        pos += 1
        if byte == 0xFF:
            payload = data[pos:]
            if not payload:
                raise MessageError("payload marker without payload")
            break
        delta, length = byte >> 4, byte & 0x0F
        delta, pos = _extended(data, delta, pos)
        length, pos = _extended(data, length, pos)
        number += delta
        if pos + length > len(data):
            raise MessageError("truncated option value")
        options.append((number, data[pos:pos + length]))
        pos += length
    return Message(mtype, code, mid, token, options, payload)


def _extended(data: bytes, nibble: int, pos: int) -> tuple[int, int]:
    if nibble < 13:
        return nibble, pos
    if nibble == 13:
        if pos + 1 > len(data):
            raise MessageError("truncated extended option field")
        return data[pos] + 13, pos + 1
    if nibble == 14:
        if pos + 2 > len(data):
            raise MessageError("truncated extended option field")
        return struct.unpack_from(">H", data, pos)[0] + 269, pos + 2
    raise MessageError("reserved option nibble 15")


def cbor_payload(t: float, n: int, pad: bytes = b"") -> bytes:
    """CBOR map {"t": float64, "n": uint32 (n mod 2**32)[, "p": text]}, packed by hand."""
    if pad:
        head = b"\xa3\x61t\xfb" + struct.pack(">d", t) + b"\x61n\x1a" + struct.pack(
            ">I", n & 0xFFFFFFFF
        )
        return head + b"\x61p\x79" + struct.pack(">H", len(pad)) + pad
    return b"\xa2\x61t\xfb" + struct.pack(">d", t) + b"\x61n\x1a" + struct.pack(
        ">I", n & 0xFFFFFFFF
    )


# -- the sensor ------------------------------------------------------------------------------

Address = tuple[str, int]


@dataclass(slots=True, eq=False)
class Resource:
    path: str
    observers: dict[tuple[Address, bytes], None] = field(default_factory=dict)
    observe: int = 2
    """The next Observe number (24 bits; 0 and 1 are left to the registration answer)."""
    updates: int = 0
    value: bytes = b""


class FastSensor(asyncio.DatagramProtocol):
    def __init__(self, resources: int, rate: float, pad: int = 0) -> None:
        self.resources = {f"/r/{i}": Resource(f"/r/{i}") for i in range(resources)}
        self.rate = rate
        self.pad = b"x" * pad
        self.transport: asyncio.DatagramTransport | None = None
        self._mid = 0
        self._mid_owner: list[tuple[Resource, tuple[Address, bytes]] | None] = [None] * 65536
        self._observed: list[Resource] = []
        self._dirty = False
        self._next = 0
        self.sent = 0
        self.updates = 0
        self.skipped = 0
        self.registrations = 0
        self.deregistrations = 0
        self.requests = 0
        self.malformed = 0
        self._base = time.monotonic()
        self._base_count = 0

    # -- receiving ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: Address) -> None:
        try:
            message = decode(data)
        except MessageError:
            self.malformed += 1
            return
        if message.mtype == RST:
            self._reset(message.mid)
        elif message.code == EMPTY:
            if message.mtype == CON:  # CoAP ping
                self._send(Message(RST, EMPTY, message.mid), addr)
        elif message.code <= 0x1F and message.mtype in (CON, NON):
            self._request(message, addr)

    def error_received(self, exc: Exception) -> None:
        pass

    def _request(self, request: Message, addr: Address) -> None:
        self.requests += 1
        resource = self.resources.get(request.path)
        options: list[tuple[int, bytes]] = []
        payload = b""
        if request.path == "/.well-known/core" and request.code == GET:
            code = CONTENT
            options.append((CONTENT_FORMAT, encode_uint(CF_LINK_FORMAT)))
            payload = ",".join(f"<{p}>;obs;ct=60" for p in list(self.resources)[:50]).encode()
        elif resource is None:
            code = NOT_FOUND
        elif request.code == GET:
            code = CONTENT
            observe = request.option_uint(OBSERVE)
            key = (addr, request.token)
            if observe == 0:
                if key not in resource.observers:
                    self.registrations += 1
                resource.observers[key] = None
                self._dirty = True
                options.append((OBSERVE, encode_uint(resource.observe)))
                resource.observe = (resource.observe + 1) & 0xFFFFFF
            elif observe == 1 and resource.observers.pop(key, 0) is None:
                self.deregistrations += 1
                self._dirty = True
            options.append((CONTENT_FORMAT, encode_uint(CF_CBOR)))
            payload = resource.value or cbor_payload(time.time(), resource.updates, self.pad)
        elif request.code in (PUT, POST):
            resource.value = request.payload
            code = CHANGED
        else:
            code = METHOD_NOT_ALLOWED
        if request.mtype == CON:
            reply = Message(ACK, code, request.mid, request.token, options, payload)
        else:
            reply = Message(NON, code, self._next_mid(), request.token, options, payload)
        self._send(reply, addr)

    def _reset(self, mid: int) -> None:
        owner = self._mid_owner[mid]
        if owner is None:
            return
        resource, key = owner
        self._mid_owner[mid] = None
        if resource.observers.pop(key, 0) is None:
            self.deregistrations += 1
            self._dirty = True

    # -- sending -----------------------------------------------------------------------------

    def _next_mid(self) -> int:
        self._mid = (self._mid + 1) & 0xFFFF
        return self._mid

    def _send(self, message: Message, addr: Address) -> None:
        if self.transport is not None:
            self.transport.sendto(encode(message), addr)

    def _notify(self, resource: Resource) -> None:
        """One update of `resource`: a NON notification to each of its observers."""
        transport = self.transport
        if transport is None:
            return
        resource.updates += 1
        self.updates += 1
        observe = encode_uint(resource.observe)
        resource.observe = (resource.observe + 1) & 0xFFFFFF
        # Observe (6) then Content-Format (12, delta 6, one byte 60): built by hand.
        tail = (
            bytes((0x60 | len(observe),)) + observe + b"\x61\x3c\xff"
            + cbor_payload(time.time(), resource.updates, self.pad)
        )
        owners = self._mid_owner
        for key in resource.observers:
            addr, token = key
            self._mid = mid = (self._mid + 1) & 0xFFFF
            owners[mid] = (resource, key)
            transport.sendto(
                struct.pack(">BBH", 0x50 | len(token), CONTENT, mid) + token + tail, addr
            )
            self.sent += 1

    def reset(self) -> None:
        for resource in self.resources.values():
            resource.observers.clear()
        self._dirty = True

    def set_rate(self, rate: float) -> None:
        self.rate = rate
        self._base = time.monotonic()
        self._base_count = 0

    async def run(self, deadline: float) -> None:
        """Send updates at `rate` per second in total until `deadline` (monotonic)."""
        while time.monotonic() < deadline:
            if self._dirty:
                self._observed = [r for r in self.resources.values() if r.observers]
                self._dirty = False
                self._next = 0
            rate = self.rate
            if rate <= 0 or not self._observed:
                self._base, self._base_count = time.monotonic(), 0
                await asyncio.sleep(0.01)
                continue
            now = time.monotonic()
            due = int((now - self._base) * rate) - self._base_count
            burst = max(1, int(rate * 0.02))
            if due > burst:  # behind (a stall): never catch up in a burst, count the loss
                self.skipped += due - burst
                self._base_count += due - burst
                due = burst
            observed = self._observed
            for _ in range(max(0, due)):
                if self._next >= len(observed):
                    self._next = 0
                self._notify(observed[self._next])
                self._next += 1
            self._base_count += max(0, due)
            await asyncio.sleep(min(0.005, max(0.0005, 1 / rate)))

    def stats(self) -> dict[str, Any]:
        return {
            "sent": self.sent,
            "updates": self.updates,
            "skipped": self.skipped,
            "observers": sum(len(r.observers) for r in self.resources.values()),
            "registrations": self.registrations,
            "deregistrations": self.deregistrations,
            "requests": self.requests,
            "malformed": self.malformed,
        }


async def main_async(args: argparse.Namespace) -> None:
    raise_nofile()
    loop = asyncio.get_running_loop()
    sensor = FastSensor(args.resources, args.rate, args.pad)
    transport, _ = await loop.create_datagram_endpoint(
        lambda: sensor, local_addr=(args.host, args.port)
    )
    try:
        host, port = transport.get_extra_info("sockname")[:2]
        emit({"ready": f"coap://{host}:{port}", "pid": _pid()})
        runner = asyncio.create_task(sensor.run(time.monotonic() + args.max_seconds))

        async def handle(command: dict[str, Any]) -> dict[str, Any]:
            match command.get("cmd"):
                case "rate":
                    sensor.set_rate(float(command["rate"]))
                    return {}
                case "stats":
                    return sensor.stats()
                case "reset":
                    sensor.reset()
                    return {}
            return {"ok": False, "error": f"unknown command {command.get('cmd')!r}"}

        await command_loop(handle, max_seconds=args.max_seconds)
        runner.cancel()
    finally:
        transport.close()


def _pid() -> int:
    import os

    return os.getpid()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--resources", type=int, default=1, help="serve /r/0 … /r/K-1")
    parser.add_argument("--rate", type=float, default=0.0, help="notifications/s in total")
    parser.add_argument("--pad", type=int, default=0, help="padding bytes in each payload")
    parser.add_argument("--max-seconds", type=float, default=900.0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
