"""Baseline: a bare aiocoap client observing and requesting from the same sensor (no WebSocket).

    python -m bench.bare_coap

Prints a JSON ready line, then takes JSON commands on stdin (see `bench.control`):

- ``observe``: observe every URI in `uris` (one aiocoap observation each, iterated with
  ``async for`` as the gateway does), waiting for each first answer. Each notification's
  payload is CBOR-decoded for the sensor's send time.
- ``start`` / ``stop``: a measurement window: notifications counted, latency histogram,
  this process's CPU time.
- ``cancel``: end every observation.
- ``requests``: `inflight` request loops sending `method` to `uri` back to back for
  `duration` seconds; round trips and latencies.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import time
from typing import Any

import aiocoap
import cbor2
from aiocoap.numbers.codes import Code

from .control import Histogram, command_loop, emit, raise_nofile

METHODS = {"GET": Code.GET, "PUT": Code.PUT, "POST": Code.POST}


class BareClient:
    def __init__(self, context: aiocoap.Context) -> None:
        self.context = context
        self.tasks: set[asyncio.Task[None]] = set()
        self.active = False
        self.count = 0
        self.total = 0
        self.latency = Histogram()
        self.started = time.monotonic()
        self.cpu = time.process_time()

    async def _observe(self, uri: str, first: asyncio.Future[None]) -> None:
        request = self.context.request(aiocoap.Message(code=Code.GET, uri=uri, observe=0))
        try:
            await request.response
            if not first.done():
                first.set_result(None)
            assert request.observation is not None
            async for notification in request.observation:
                self.total += 1
                if self.active:
                    self.count += 1
                    with contextlib.suppress(Exception):
                        self.latency.add(time.time() - cbor2.loads(notification.payload)["t"])
        except Exception as exc:
            if not first.done():
                first.set_exception(exc)
        finally:
            if request.observation is not None and not request.observation.cancelled:
                request.observation.cancel()

    async def observe(self, command: dict[str, Any]) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        firsts = []
        start = time.monotonic()
        for uri in command["uris"]:
            first: asyncio.Future[None] = loop.create_future()
            firsts.append(first)
            task = asyncio.create_task(self._observe(uri, first))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        async with asyncio.timeout(float(command.get("timeout", 60))):
            results = await asyncio.gather(*firsts, return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        return {
            "observing": len(results) - len(failed),
            "failed": len(failed),
            "errors": sorted({repr(f)[:200] for f in failed})[:3],
            "elapsed": time.monotonic() - start,
        }

    async def cancel(self) -> dict[str, Any]:
        tasks = list(self.tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        return {"cancelled": len(tasks)}

    def start(self) -> dict[str, Any]:
        self.active, self.count, self.latency = True, 0, Histogram()
        self.started, self.cpu = time.monotonic(), time.process_time()
        return {}

    def stop(self) -> dict[str, Any]:
        self.active = False
        return {
            "frames": self.count,
            "latency": self.latency.to_json(),
            "seconds": time.monotonic() - self.started,
            "cpu": time.process_time() - self.cpu,
        }

    async def requests(self, command: dict[str, Any]) -> dict[str, Any]:
        uri = command["uri"]
        code = METHODS[command["method"]]
        payload = bytes.fromhex(command.get("payload_hex", ""))
        inflight = int(command.get("inflight", 1))
        duration = float(command.get("duration", 3))
        timeout = float(command.get("timeout", 10))
        latency = Histogram()
        codes: dict[str, int] = {}
        deadline = time.monotonic() + duration

        async def worker() -> None:
            while time.monotonic() < deadline:
                message = aiocoap.Message(code=code, uri=uri, payload=payload)
                if payload:
                    message.opt.content_format = 60
                t0 = time.perf_counter()
                async with asyncio.timeout(timeout):
                    response = await self.context.request(message).response
                latency.add(time.perf_counter() - t0)
                dotted = str(response.code.dotted)
                codes[dotted] = codes.get(dotted, 0) + 1

        cpu0, t_start = time.process_time(), time.monotonic()
        await asyncio.gather(*(worker() for _ in range(inflight)))
        return {
            "round_trips": latency.count,
            "seconds": time.monotonic() - t_start,
            "latency": latency.to_json(),
            "codes": codes,
            "errors": {},
            "cpu": time.process_time() - cpu0,
        }


async def main_async(args: argparse.Namespace) -> None:
    raise_nofile()
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    client = BareClient(context)
    emit({"ready": "bare_coap", "pid": os.getpid()})

    async def handle(command: dict[str, Any]) -> dict[str, Any]:
        match command.get("cmd"):
            case "observe":
                return await client.observe(command)
            case "cancel":
                return await client.cancel()
            case "start":
                return client.start()
            case "stop":
                return client.stop()
            case "requests":
                return await client.requests(command)
        return {"ok": False, "error": f"unknown command {command.get('cmd')!r}"}

    try:
        await command_loop(handle, max_seconds=args.max_seconds)
    finally:
        await client.cancel()
        with contextlib.suppress(Exception):
            async with asyncio.timeout(3):
                await context.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seconds", type=float, default=900.0)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
