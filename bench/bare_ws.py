"""Baseline: a bare websockets server broadcasting notify-shaped frames (no CoAP, no hub).

    python -m bench.bare_ws [--rate R]

Speaks just enough of the gateway's protocol for the load generator: a `subscribe` is
answered `subscribed` and makes the connection a receiver. A ticker builds one frame per
update, shaped like the gateway's `notify` (the same keys, a `value` of ``{"t": send time,
"n": update number}``), serializes it once and hands it to `websockets.broadcast`, which frames
and writes it for each connection in turn: the idiomatic bare fan-out. When it falls behind it
skips ticks rather than queueing, so its latency is the cost of one broadcast.

Prints a JSON ready line with its ``ws://HOST:PORT/ws`` URL, then takes JSON commands on
stdin: ``rate`` (updates per second), ``stats``, ``quit``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from typing import Any

from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.exceptions import ConnectionClosed

from .control import command_loop, emit, raise_nofile


class BareServer:
    def __init__(self, rate: float, pad: int = 0) -> None:
        self.rate = rate
        self.pad = "x" * pad
        self.receivers: set[ServerConnection] = set()
        self.connections = 0
        self.updates = 0
        self.ticks = 0
        """Updates offered at `rate` (built or skipped because a broadcast was still running)."""
        self.uri = "coap://127.0.0.1:5683/r/0"

    async def handler(self, ws: ServerConnection) -> None:
        self.connections += 1
        try:
            async for message in ws:
                frame = json.loads(message)
                if frame.get("type") == "subscribe":
                    self.uri = frame.get("uri") or self.uri
                    await ws.send(json.dumps(
                        {"type": "subscribed", "id": frame.get("id"), "sub": "s1",
                         "uri": self.uri}, separators=(",", ":")))
                    self.receivers.add(ws)
        except ConnectionClosed:
            pass
        finally:
            self.receivers.discard(ws)
            self.connections -= 1

    def frame(self) -> str:
        self.updates += 1
        now = time.time()
        value: dict[str, Any] = {"t": now, "n": self.updates}
        if self.pad:
            value["p"] = self.pad
        return json.dumps({
            "type": "notify", "sub": "s1", "uri": self.uri, "seq": self.updates,
            "code": "2.05", "cf": 60, "value": value, "ts": round(now, 6), "max_age": 60,
        }, separators=(",", ":"), ensure_ascii=False)

    async def run(self, deadline: float) -> None:
        """Broadcast at `rate`; when behind, skip the missed ticks (newest value only)."""
        base, ticks = time.monotonic(), 0
        while time.monotonic() < deadline:
            rate = self.rate
            if rate <= 0 or not self.receivers:
                base, ticks = time.monotonic(), 0
                await asyncio.sleep(0.01)
                continue
            now = time.monotonic()
            due = int((now - base) * rate) - ticks
            if due > 0:
                broadcast(self.receivers, self.frame())
                ticks += due
                self.ticks += due
            wait = base + (ticks + 1) / rate - time.monotonic()
            # The event loop sleeps in whole milliseconds: below that, just yield.
            await asyncio.sleep(wait if wait > 0.001 else 0)

    def set_rate(self, rate: float) -> None:
        self.rate = rate


async def main_async(args: argparse.Namespace) -> None:
    raise_nofile()
    bare = BareServer(args.rate, args.pad)
    async with serve(
        bare.handler, args.host, args.port, compression=None, max_size=65536
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        emit({"ready": f"ws://{args.host}:{port}/ws", "pid": os.getpid()})
        runner = asyncio.create_task(bare.run(time.monotonic() + args.max_seconds))

        async def handle(command: dict[str, Any]) -> dict[str, Any]:
            match command.get("cmd"):
                case "rate":
                    bare.set_rate(float(command["rate"]))
                    return {}
                case "stats":
                    return {"updates": bare.ticks, "built": bare.updates,
                            "connections": bare.connections,
                            "receivers": len(bare.receivers)}
            return {"ok": False, "error": f"unknown command {command.get('cmd')!r}"}

        await command_loop(handle, max_seconds=args.max_seconds)
        runner.cancel()
        server.close(close_connections=False)
        for ws in list(server.connections):
            ws.transport.abort()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--rate", type=float, default=0.0)
    parser.add_argument("--pad", type=int, default=0)
    parser.add_argument("--max-seconds", type=float, default=900.0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
