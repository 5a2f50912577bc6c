"""Slow readers: WebSocket clients behind a slow link, for the 'slow readers' scenario.

    python -m bench.slow_reader

prints ``{"ready": …}`` and then takes JSON commands on stdin (see `bench.control`):

- ``connect``: open one client per entry of `rates` (frames each reads per second) to
  `url`, each with a receive buffer of `rcvbuf` bytes set before connecting, and subscribe
  each to `uri`;
- ``start`` / ``stop``: open and close the measurement; ``stop`` answers, per client, the
  age of the values it read (now - the ``"t"`` the sensor put in the value) as p50/p99 per
  `window` seconds, the mean step of `seq` between two frames read, frames read, and
  whether the gateway closed it.

On loopback a client reads as fast as the machine lets it; behind a real slow link the
backlog waits on the sender's side, in its socket and queues. A small receive buffer set
before connecting (so that the window the client advertises is small) and reads paced at
`rate` frames per second reproduce that: a client reads exactly one frame per tick, from a
plain socket, so nothing is buffered on its side beyond its kernel's receive buffer (what a
client library reads ahead is the one queue no gateway can bound). Keepalive pings are
answered.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from .control import command_loop, emit
from .loadgen import client_frame

HEAD_LIMIT = 16384


class SlowClient:
    def __init__(self, sock: socket.socket, rate: float, rest: bytes) -> None:
        self.sock = sock
        self.rate = rate
        self.buffer = bytearray(rest)
        self.loop = asyncio.get_running_loop()
        self.samples: list[tuple[float, float, int]] = []
        """(seconds since start, age of the value, seq) per notify read in the window."""
        self.window_start: float | None = None
        self.closed = ""
        self.reader: asyncio.Task[None] | None = None
        self.sampled = asyncio.Event()
        """Set at each sample taken (cleared by whoever waits for the next)."""

    @classmethod
    async def open(cls, url: str, rate: float, rcvbuf: int) -> SlowClient:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        sock = socket.socket()
        # Before connecting: the window scale and the first advertised window depend on it.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (host, port))
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        await loop.sock_sendall(sock, (
            f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n").encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = await loop.sock_recv(sock, 4096)
            if not chunk or len(head) > HEAD_LIMIT:
                raise ConnectionError("no handshake answer")
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 101"):
            raise ConnectionError(head.split(b"\r\n")[0].decode(errors="replace"))
        return cls(sock, rate, rest)

    async def _exactly(self, size: int) -> bytes:
        while len(self.buffer) < size:
            chunk = await self.loop.sock_recv(self.sock, size - len(self.buffer))
            if not chunk:
                raise ConnectionError("closed by the server")
            self.buffer += chunk
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def frame(self) -> tuple[int, bytes]:
        first, second = await self._exactly(2)
        length = second & 0x7F
        if length == 126:
            length = int.from_bytes(await self._exactly(2), "big")
        elif length == 127:
            length = int.from_bytes(await self._exactly(8), "big")
        return first & 0x0F, await self._exactly(length)

    async def message(self) -> dict[str, Any]:
        """The next text message; pings are answered on the way."""
        while True:
            opcode, payload = await self.frame()
            if opcode == 1:
                message: dict[str, Any] = json.loads(payload)
                return message
            if opcode == 9:
                await self.loop.sock_sendall(self.sock, client_frame(payload, 10))
            elif opcode == 8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                raise ConnectionError(f"closed by the server: {code} {payload[2:].decode()}")

    async def subscribe(self, uri: str) -> None:
        await self.loop.sock_sendall(self.sock, client_frame(json.dumps(
            {"type": "subscribe", "id": 1, "uri": uri}).encode()))
        while (message := await self.message())["type"] != "subscribed":
            if message["type"] == "error":
                raise RuntimeError(f"subscribe failed: {message}")

    async def read(self) -> None:
        """One message per 1/rate seconds, as a client on a slow link takes them."""
        period = 1 / self.rate
        due = time.monotonic()
        try:
            while True:
                message = await self.message()
                now = time.monotonic()
                if message.get("type") == "notify" and self.window_start is not None:
                    value = message.get("value") or {}
                    if isinstance(value, dict) and "t" in value:
                        self.samples.append((now - self.window_start, time.time() - value["t"],
                                             int(message.get("seq", 0))))
                        self.sampled.set()
                due = max(due + period, now)
                await asyncio.sleep(due - time.monotonic())
        except (ConnectionError, OSError) as exc:
            self.closed = str(exc) or type(exc).__name__

    def report(self, window: float, elapsed: float) -> dict[str, Any]:
        """Ages per whole `window` within the `elapsed` seconds measured (a last, partial
        window would rest on a few frames)."""
        windows = []
        start = 0.0
        while start + window <= elapsed:
            ages = sorted(a for t, a, _ in self.samples if start <= t < start + window)
            if ages:
                windows.append({
                    "from_s": start,
                    "frames": len(ages),
                    "p50_s": round(ages[len(ages) // 2], 3),
                    "p99_s": round(ages[min(len(ages) - 1, int(len(ages) * 0.99))], 3),
                })
            start += window
        seqs = [s for _, _, s in self.samples]
        return {
            "rate": self.rate,
            "frames": len(self.samples),
            "windows": windows,
            # 1: every update read, in order; n: the reader got one update in n.
            "mean_seq_step": round((seqs[-1] - seqs[0]) / (len(seqs) - 1), 2)
            if len(seqs) > 1 else None,
            "closed": self.closed,
        }


async def main_async(args: argparse.Namespace) -> None:
    clients: list[SlowClient] = []
    emit({"ready": "slow_reader", "pid": os.getpid()})

    async def handle(command: dict[str, Any]) -> dict[str, Any]:
        match command.get("cmd"):
            case "connect":
                for rate in command["rates"]:
                    client = await SlowClient.open(command["url"], float(rate),
                                                   int(command.get("rcvbuf", 4096)))
                    await client.subscribe(command["uri"])
                    client.reader = asyncio.create_task(client.read())
                    clients.append(client)
                return {"connected": len(clients)}
            case "start":
                now = time.monotonic()
                for client in clients:
                    client.samples.clear()
                    client.window_start = now
                return {}
            case "stop":
                elapsed = 0.0
                for client in clients:
                    if client.window_start is not None:
                        elapsed = time.monotonic() - client.window_start
                    client.window_start = None
                window = float(command.get("window", 10.0))
                return {"clients": [client.report(window, elapsed) for client in clients]}
        return {"ok": False, "error": f"unknown command {command.get('cmd')!r}"}

    try:
        await command_loop(handle, max_seconds=args.max_seconds)
    finally:
        for client in clients:
            if client.reader is not None:
                client.reader.cancel()
            with contextlib.suppress(OSError):
                client.sock.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seconds", type=float, default=900.0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
