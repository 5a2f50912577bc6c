"""The "cond" scenario: what conditional notifications save a client (issue 17 §1).

A 20 Hz sensor (bench.fast_sensor, one resource, CBOR ``{"t": time, "n": count}``) observed
by the gateway, and groups of WebSocket clients on the same resource: without `cond`, with
`pmin = 1`, with `st` on the update counter (`path` /n, st = 10: a change every tenth
update), with `st` on the send time (/t, st = 0.5 s), and with both `pmin` and `st`. Per
client: the frames and bytes per second it receives (bytes as on the wire: the WebSocket
frame header and the payload; the server does not mask), against the group without `cond`
measured in the same window, and the gateway's CPU over the window.

The clients run in this process (at 20 Hz a handful of clients costs nothing); the sensor
and the gateway are child processes, as in the other scenarios.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Final

from websockets.asyncio.client import ClientConnection, connect

from .procs import BenchError, Fleet

SENSOR_RATE: Final = 20.0
"""Updates per second of the watched resource."""
GROUPS: Final[dict[str, dict[str, Any] | None]] = {
    "no cond": None,
    "pmin=1": {"pmin": 1},
    "st=10 on /n": {"st": 10, "path": "/n"},
    "st=0.5 on /t": {"st": 0.5, "path": "/t"},
    "pmin=1,st=10 on /n": {"pmin": 1, "st": 10, "path": "/n"},
}
"""Each group's `cond` (None: a plain subscription)."""


def wire_size(payload: str | bytes) -> int:
    """Bytes of an unmasked server-to-client WebSocket frame carrying `payload`."""
    size = len(payload.encode() if isinstance(payload, str) else payload)
    return size + (2 if size < 126 else 4 if size < 65536 else 10)


class Counter:
    """One client's received notify frames and their wire bytes, windowed."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames = 0
        self.bytes = 0
        self.first = asyncio.get_running_loop().create_future()

    async def read(self) -> None:
        async for message in self.ws:
            if '"notify"' not in message[:20]:
                continue
            self.frames += 1
            self.bytes += wire_size(message)
            if not self.first.done():
                self.first.set_result(None)

    def take(self) -> tuple[int, int]:
        counts, self.frames, self.bytes = (self.frames, self.bytes), 0, 0
        return counts


async def _subscribe(url: str, uri: str, cond: dict[str, Any] | None) -> Counter:
    ws = await connect(url, compression=None, open_timeout=10)
    frame: dict[str, Any] = {"type": "subscribe", "id": 1, "uri": uri}
    if cond is not None:
        frame["cond"] = cond
    await ws.send(json.dumps(frame))
    reply = json.loads(await asyncio.wait_for(ws.recv(), 10))
    if reply.get("type") != "subscribed":
        raise BenchError(f"subscribe with {cond} refused: {reply}")
    return Counter(ws)


async def conditions(bench: Any, fleet: Fleet) -> None:
    """Measure every group in the same windows; results go to `bench.runs`."""
    from .run import start_gateway, start_sensor  # bench.run imports this module

    s = bench.settings
    per_group = 2 if s.mode in ("quick", "smoke") else 5
    window = 5.0 if s.mode in ("quick", "smoke") else 20.0
    sensor = await start_sensor(fleet)
    gateway, url = await start_gateway(fleet, sensor)
    uri = f"{sensor.ready['ready']}/r/0"
    clients: dict[str, list[Counter]] = {}
    readers: list[asyncio.Task[None]] = []
    try:
        for name, cond in GROUPS.items():
            clients[name] = [await _subscribe(url, uri, cond) for _ in range(per_group)]
            readers += [asyncio.create_task(c.read(), name=f"cond client {name}")
                        for c in clients[name]]
        await sensor.call({"cmd": "rate", "rate": SENSOR_RATE}, 10)
        await asyncio.wait_for(
            asyncio.gather(*(c.first for group in clients.values() for c in group)), 10
        )
        await asyncio.sleep(max(s.warmup, 1.5))  # past the first pmin window
        for group in clients.values():
            for client in group:
                client.take()
        offered_before = (await sensor.call({"cmd": "stats"}, 10))["updates"]
        cpu_before, started = gateway.cpu(), time.monotonic()
        await asyncio.sleep(window)
        seconds = time.monotonic() - started
        cpu = gateway.cpu() - cpu_before
        offered = (await sensor.call({"cmd": "stats"}, 10))["updates"] - offered_before
        await sensor.call({"cmd": "rate", "rate": 0}, 10)
        rates: list[tuple[str, float, float]] = []
        for name, group in clients.items():
            counts = [c.take() for c in group]
            rates.append((name, sum(f for f, _ in counts) / len(group) / seconds,
                          sum(b for _, b in counts) / len(group) / seconds))
        plain_bytes = rates[0][2]
        rows: list[dict[str, Any]] = [
            {"group": name, "cond": GROUPS[name], "frames_per_s": round(frames, 2),
             "bytes_per_s": round(size, 1),
             "bytes_ratio": round(size / plain_bytes, 3) if plain_bytes else None}
            for name, frames, size in rates]
        bench.runs.append({
            "scenario": "cond", "system": "gateway", "window_s": round(seconds, 2),
            "sensor_updates_per_s": round(offered / seconds, 2),
            "clients_per_group": per_group, "gateway_cpu_s_per_s": round(cpu / seconds, 4),
            "groups": rows,
        })
    finally:
        for task in readers:
            task.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for group in clients.values():
            for client in group:
                await client.ws.close()


def cond_rows(runs: list[dict[str, Any]]) -> list[list[Any]]:
    """The report's table: one row per group of the (last) cond run."""
    found = [r for r in runs if r.get("scenario") == "cond"]
    if not found:
        return []
    run = found[-1]
    return [[g["group"], run["sensor_updates_per_s"], g["frames_per_s"], g["bytes_per_s"],
             g["bytes_ratio"]] for g in run["groups"]]


COND_HEADERS: Final = ["client's cond", "sensor updates/s", "frames/s per client",
                       "bytes/s per client", "bytes vs no cond"]
