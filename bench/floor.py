"""The floor under any fan-out in this Python: the CPU cost of writing one frame to one client.

    python -m bench.floor [--clients 200] [--rounds 200] [--size 200]

A gateway (or the bare broadcast) that writes each update to each connection pays at least
one `send()` per client per update. This measures that cost alone, on loopback TCP, in two
forms: `socket.send` on a non-blocking socket, and asyncio's `transport.write` (what the
gateway and websockets use; it adds its checks and bookkeeping). Only the writing thread's
CPU time is counted, not the receivers' (which drain between rounds), so a noisy neighbour
changes the figures little. Also the wall time of one update's burst of `os.write` to 1000
clients at 10 updates/s (`bursts`), the least time after which the last of them can have
it. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import select
import socket
import time
from typing import Any, cast


def frame_bytes(size: int) -> bytes:
    """An unmasked server text frame with a `size`-byte payload."""
    if size < 126:
        return bytes((0x81, size)) + b"x" * size
    return bytes((0x81, 126)) + size.to_bytes(2, "big") + b"x" * size


def raw_send(clients: int, rounds: int, size: int) -> float:
    """Microseconds of CPU per `socket.send` of one frame."""
    frame = frame_bytes(size)
    listener = socket.create_server(("127.0.0.1", 0))
    pairs = []
    try:
        for _ in range(clients):
            client = socket.create_connection(listener.getsockname())
            server, _ = listener.accept()
            for sock in (client, server):
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            pairs.append((server, client))
        spent = 0.0
        for _ in range(rounds):
            t0 = time.thread_time()
            for server, _ in pairs:
                server.send(frame)
            spent += time.thread_time() - t0
            for _, client in pairs:
                try:
                    while client.recv(1 << 16):
                        pass
                except BlockingIOError:
                    pass
        return 1e6 * spent / (clients * rounds)
    finally:
        for server, client in pairs:
            server.close()
            client.close()
        listener.close()


class _Sink(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        pass


async def transport_write(clients: int, rounds: int, size: int) -> float:
    """Microseconds of CPU per asyncio `transport.write` of one frame."""
    frame = frame_bytes(size)
    loop = asyncio.get_running_loop()
    accepted: list[asyncio.Transport] = []
    all_accepted = asyncio.Event()

    class Accept(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.append(cast(asyncio.Transport, transport))
            if len(accepted) == clients:
                all_accepted.set()

    server = await loop.create_server(Accept, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    sinks = [await loop.create_connection(_Sink, "127.0.0.1", port) for _ in range(clients)]
    await asyncio.wait_for(all_accepted.wait(), 30)
    spent = 0.0
    try:
        for _ in range(rounds):
            t0 = time.thread_time()
            for transport in accepted:
                transport.write(frame)
            spent += time.thread_time() - t0
            for _ in range(3):  # let the sinks read
                await asyncio.sleep(0)
        return 1e6 * spent / (clients * rounds)
    finally:
        for transport in accepted:
            transport.abort()
        for transport, _ in sinks:
            transport.abort()
        server.close()


def _read_paced(port: int, clients: int, pace: float, ready: Any) -> None:
    """The receiving side of `bursts`, in its own process: reads every socket that is ready,
    then waits `pace` seconds, like the load generator."""
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(clients)]
    poller = select.epoll()
    for sock in socks:
        sock.setblocking(False)
        poller.register(sock.fileno(), select.EPOLLIN)
    ready.set()
    while True:
        for fd, _ in poller.poll(1.0):
            try:
                if not os.read(fd, 1 << 16):
                    return
            except BlockingIOError:
                pass
        time.sleep(pace)


def bursts(clients: int = 1000, count: int = 40, size: int = 200,
           interval: float = 0.1) -> dict[str, float]:
    """Wall time of one update's burst of writes to `clients` loopback clients, one burst
    every `interval` seconds (the 10 updates/s case), with a bare `os.write` loop: the least
    time after which the last client can have the update, in this Python on this machine."""
    frame = frame_bytes(size)
    listener = socket.create_server(("127.0.0.1", 0), backlog=clients)
    ready = multiprocessing.get_context("spawn").Event()
    reader = multiprocessing.get_context("spawn").Process(
        target=_read_paced, args=(listener.getsockname()[1], clients, 0.001, ready),
        daemon=True)
    reader.start()
    servers = []
    try:
        for _ in range(clients):
            server, _ = listener.accept()
            server.setblocking(False)
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            servers.append(server)
        if not ready.wait(30):
            raise RuntimeError("the reader did not connect")
        fds = [server.fileno() for server in servers]
        walls, cpu = [], 0.0
        for _ in range(count):
            time.sleep(interval)
            t0, c0 = time.perf_counter(), time.thread_time()
            for fd in fds:
                os.write(fd, frame)
            walls.append(time.perf_counter() - t0)
            cpu += time.thread_time() - c0
        walls.sort()
        return {
            "burst_clients": clients,
            "burst_p50_ms": round(1000 * walls[len(walls) // 2], 2),
            "burst_p90_ms": round(1000 * walls[int(len(walls) * 0.9)], 2),
            "burst_us_per_write": round(1e6 * cpu / (clients * count), 2),
        }
    finally:
        for server in servers:
            server.close()
        listener.close()
        reader.join(5)
        if reader.is_alive():
            reader.kill()


def measure(clients: int = 200, rounds: int = 200, size: int = 200) -> dict[str, Any]:
    return {
        "clients": clients,
        "rounds": rounds,
        "frame_bytes": len(frame_bytes(size)),
        "socket_send_us": round(raw_send(clients, rounds, size), 2),
        "transport_write_us": round(asyncio.run(transport_write(clients, rounds, size)), 2),
        **bursts(size=size),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--size", type=int, default=200, help="payload bytes per frame")
    args = parser.parse_args()
    print(json.dumps(measure(args.clients, args.rounds, args.size)), flush=True)


if __name__ == "__main__":
    main()
