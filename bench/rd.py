"""The Resource Directory scenario of `make bench`: registrations per second and memory per
registration, the gateway's directory against aiocoap's (`aiocoap-rd`) in the same run.

    python -m bench.rd --baseline        # a child: aiocoap's directory, ready line on stdout
    python -m bench.rd [--count N]       # alone: both systems, the table on stdout

Each system runs as a child process on 127.0.0.1. The harness registers `count` endpoints
(`ep=node-N`, four links each, ~130 bytes of link-format) over UDP from `CLIENTS` aiocoap
client contexts with `CONCURRENCY` requests in flight each, and reports:

- registrations/s: created (2.01) registrations over the wall time of the burst;
- updates/s: registration updates (empty POST to the location) over their wall time;
- bytes/registration: the directory's RSS after the burst minus before it, over `count`
  (the gateway's includes the catalogue entries and the names of the four resources).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any

import aiocoap

from .procs import BenchError, Child, Fleet, cpu_seconds

CLIENTS = 4
CONCURRENCY = 16
LINKS = (b'</temperature>;rt="temperature";ct=60;obs,</humidity>;rt="humidity";ct=110;obs,'
         b'</status>;ct=0,</led>;ct=60;obs')
REQUEST_TIMEOUT = 20.0


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def gateway_config(directory: Path, port: int, count: int) -> Path:
    path = directory / "gateway-rd.toml"
    path.write_text(f"""# written by bench/rd.py
log_level = "warning"

[server]
host = "127.0.0.1"
port = 0

[coap]
listen = ["127.0.0.1:{port}"]

[rd]
allow_from = ["127.0.0.0/8"]
max_registrations = {count + 100}
""")
    return path


async def start(fleet: Fleet, system: str, count: int) -> tuple[Child, str]:
    """The directory under test and its base URI."""
    if system == "gateway":
        port = _free_udp_port()
        child = await fleet.python(
            "gateway-rd", "translator", "serve", "--config",
            str(gateway_config(fleet.log_dir, port, count)),
            ready_pattern=r"listening on (ws://\S+)",
        )
        return child, f"coap://127.0.0.1:{port}"
    child = await fleet.python("aiocoap-rd", "bench.rd", "--baseline")
    return child, str(child.ready["ready"])


async def _post(context: Any, uri: str, payload: bytes = b"") -> aiocoap.Message:
    message = aiocoap.Message(code=aiocoap.POST, uri=uri, payload=payload)
    if payload:
        message.opt.content_format = 40
    async with asyncio.timeout(REQUEST_TIMEOUT):
        response: aiocoap.Message = await context.request(message).response
    return response


async def registration_path(context: Any, base: str) -> str:
    """The registration interface, found as a registrant finds it (RFC 9176 §4.3)."""
    message = aiocoap.Message(code=aiocoap.GET, uri=f"{base}/.well-known/core?rt=core.rd")
    async with asyncio.timeout(REQUEST_TIMEOUT):
        response = await context.request(message).response
    text: str = response.payload.decode()
    href = text.split(">", 1)[0].lstrip("<")
    if not href.startswith("/"):
        raise BenchError(f"{base} lists no registration interface: {text!r}")
    return href


async def burst(base: str, path: str, count: int, offset: int = 0) -> dict[str, Any]:
    """Register `count` endpoints, then update each once; rates and failures."""
    contexts = [await aiocoap.Context.create_client_context(transports=["udp6"])
                for _ in range(CLIENTS)]
    locations: list[str] = []
    failures: dict[str, int] = {}
    try:
        numbers = iter(range(offset, offset + count))

        async def register(context: Any) -> None:
            for n in numbers:
                response = await _post(context, f"{base}{path}?ep=node-{n}&lt=3600", LINKS)
                if response.code != aiocoap.CREATED:
                    failures[str(response.code)] = failures.get(str(response.code), 0) + 1
                    continue
                locations.append("/" + "/".join(response.opt.location_path))

        started = time.monotonic()
        await asyncio.gather(*(register(contexts[i % CLIENTS])
                               for i in range(CLIENTS * CONCURRENCY)))
        registered = time.monotonic() - started
        pending = iter(locations)

        async def update(context: Any) -> None:
            for location in pending:
                response = await _post(context, f"{base}{location}")
                if response.code != aiocoap.CHANGED:
                    failures[f"update {response.code}"] = failures.get(
                        f"update {response.code}", 0) + 1

        started = time.monotonic()
        await asyncio.gather(*(update(contexts[i % CLIENTS])
                               for i in range(CLIENTS * CONCURRENCY)))
        updated = time.monotonic() - started
    finally:
        for context in contexts:
            await context.shutdown()
    return {
        "registered": len(locations),
        "registrations_per_s": round(len(locations) / registered, 1),
        "updates_per_s": round(len(locations) / updated, 1),
        "failures": failures,
    }


async def measure(fleet: Fleet, system: str, count: int, warmup: int = 200) -> dict[str, Any]:
    child, base = await start(fleet, system, count + warmup)
    context = await aiocoap.Context.create_client_context(transports=["udp6"])
    try:
        path = await registration_path(context, base)
    finally:
        await context.shutdown()
    # A first burst warms the process up (imports, allocator arenas) before RSS is read.
    await burst(base, path, warmup, offset=10**6)
    await asyncio.sleep(0.5)  # let the process settle before reading RSS
    before, cpu_before = child.rss(), cpu_seconds(child.pid)
    result = await burst(base, path, count)
    cpu = cpu_seconds(child.pid) - cpu_before
    await asyncio.sleep(0.5)
    after = child.rss()
    if result["registered"] < count * 0.99:
        raise BenchError(f"{system}: only {result['registered']} of {count} registered "
                         f"({result['failures']})")
    result.update(
        scenario="rd", system=system, count=count, registration_path=path,
        bytes_per_registration=round((after - before) / max(1, result["registered"])),
        # A registration and an update each: the directory's own CPU for both.
        cpu_ms_per_registration=round(cpu * 1000 / max(1, result["registered"]), 3),
    )
    return result


# -- the baseline child: aiocoap's directory -----------------------------------------------------


async def serve_baseline() -> None:
    """aiocoap's `aiocoap-rd` directory (its StandaloneResourceDirectory) on udp6 at an
    OS-chosen port: the same code as the command, without its TCP and WebSocket listeners."""
    from aiocoap.cli.rd import StandaloneResourceDirectory

    context = await aiocoap.Context.create_server_context(
        None, bind=("127.0.0.1", 0), transports=["udp6"])
    context.serversite = StandaloneResourceDirectory(context=context)
    port = next(
        stack.sock.getsockname()[1] for stack in _udp_stacks(context)
    )
    print(json.dumps({"ready": f"coap://127.0.0.1:{port}"}), flush=True)
    await asyncio.Event().wait()


def _udp_stacks(context: Any) -> Any:
    from translator.compat import udp_stacks

    return udp_stacks(context)


async def main_async(args: argparse.Namespace) -> int:
    if args.baseline:
        await serve_baseline()
        return 0
    import tempfile

    rows = []
    with tempfile.TemporaryDirectory(prefix="coap-ws-bench-rd-") as directory:
        for system in ("gateway", "aiocoap_rd"):
            async with Fleet(Path(directory) / system) as fleet:
                rows.append(await measure(fleet, system, args.count))
    for row in rows:
        print(json.dumps(row))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", action="store_true",
                        help="serve aiocoap's directory (a child of the harness)")
    parser.add_argument("--count", type=int, default=2000)
    return asyncio.run(main_async(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
