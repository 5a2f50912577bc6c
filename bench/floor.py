"""The floor under any fan-out in this Python: the CPU cost of writing one frame to one client.

    python -m bench.floor [--clients 200] [--rounds 200] [--size 200]

A gateway (or the bare broadcast) that writes each update to each connection pays at least
one `send()` per client per update. This measures that cost alone, on loopback TCP, in two
forms: `socket.send` on a non-blocking socket, and asyncio's `transport.write` (what the
gateway and websockets use; it adds its checks and bookkeeping). Only the writing thread's
CPU time is counted, not the receivers' (which drain between rounds), so a noisy neighbour
changes the figures little. Also one update's burst of writes to 1000 clients read by
another process, at 10 updates/s (`bursts`): per frame, how long after the burst's start its
write returned, the least latency any server in this process adds, written by a Python loop,
by the same loop in C (bench/fastwrite.c, built with `cc` on first use; skipped without a
compiler) and by that C loop in two threads, so the interpreter's share and a second core's
effect show. And how often this machine stretches 5 ms of pure CPU work (`hiccups`), which
every burst of that length meets too. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import json
import multiprocessing
import os
import select
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

from bench.loadgen import NativeUnavailable, build_native


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


T = TypeVar("T", int, float)

WRITERS = ("python", "c", "c_2threads")
"""How `bursts` writes: a Python `os.write` loop, the same loop in C (bench/fastwrite.c),
and that C loop in two threads at once, each writing half of the clients."""
FASTWRITE_SOURCE = Path(__file__).with_name("fastwrite.c")


def _c_writer() -> Callable[..., int]:
    """`fw_write_each` of bench/fastwrite.c, built on first use (raises NativeUnavailable)."""
    library = build_native(FASTWRITE_SOURCE)
    try:
        write_each = ctypes.CDLL(str(library)).fw_write_each
    except OSError as exc:
        raise NativeUnavailable(f"cannot load {library}: {exc}") from exc
    write_each.argtypes = [ctypes.POINTER(ctypes.c_int), ctypes.c_long, ctypes.c_char_p,
                           ctypes.c_long, ctypes.POINTER(ctypes.c_int64)]
    write_each.restype = ctypes.c_long
    return cast(Callable[..., int], write_each)


def _burst_writers(fds: list[int], frame: bytes,
                   pool: ThreadPoolExecutor) -> tuple[dict[str, Callable[[], list[int]]], str]:
    """One callable per available writer: writes `frame` to every descriptor once and returns
    the CLOCK_MONOTONIC time (ns) at which each write returned; why C is missing, if it is."""

    def python_burst() -> list[int]:
        done: list[int] = []
        now, write, record = time.monotonic_ns, os.write, done.append
        for fd in fds:
            write(fd, frame)
            record(now())
        return done

    writers: dict[str, Callable[[], list[int]]] = {"python": python_burst}
    try:
        write_each = _c_writer()
    except NativeUnavailable as exc:
        return writers, str(exc)
    count, half = len(fds), len(fds) // 2
    every = (ctypes.c_int * count)(*fds)
    first, second = (ctypes.c_int * half)(*fds[:half]), (ctypes.c_int * (count - half))(*fds[half:])
    done = (ctypes.c_int64 * count)()
    done_first, done_second = (ctypes.c_int64 * half)(), (ctypes.c_int64 * (count - half))()

    def c_burst() -> list[int]:
        write_each(every, count, frame, len(frame), done)
        return list(done)

    def c_2threads_burst() -> list[int]:
        other = pool.submit(write_each, second, count - half, frame, len(frame), done_second)
        write_each(first, half, frame, len(frame), done_first)
        other.result()
        return [*done_first, *done_second]

    writers.update(c=c_burst, c_2threads=c_2threads_burst)
    return writers, ""


def bursts(clients: int = 1000, count: int = 50, size: int = 200,
           interval: float = 0.1) -> dict[str, Any]:
    """One update's burst of writes to `clients` loopback clients, one burst every `interval`
    seconds (the 10 updates/s case), by each of `WRITERS` in turn (so that all see the same
    machine): per frame, the time from the burst's start until its write returned (the least
    latency a server adds before that client can have the update, in this process on this
    machine), its p50/p99/p99.9 over all frames; the p90 of the bursts' lengths; CPU per write
    (the whole process's, so both threads of `c_2threads`)."""
    frame = frame_bytes(size)
    listener = socket.create_server(("127.0.0.1", 0), backlog=clients)
    ready = multiprocessing.get_context("spawn").Event()
    reader = multiprocessing.get_context("spawn").Process(
        target=_read_paced, args=(listener.getsockname()[1], clients, 0.001, ready),
        daemon=True)
    reader.start()
    servers = []
    pool = ThreadPoolExecutor(1, thread_name_prefix="floor-writer")
    try:
        for _ in range(clients):
            server, _ = listener.accept()
            server.setblocking(False)
            server.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            servers.append(server)
        if not ready.wait(30):
            raise RuntimeError("the reader did not connect")
        writers, missing = _burst_writers([server.fileno() for server in servers], frame, pool)
        frames: dict[str, list[int]] = {name: [] for name in writers}
        lengths: dict[str, list[int]] = {name: [] for name in writers}
        cpu = dict.fromkeys(writers, 0.0)
        order = list(writers)
        for i in range(count * len(order)):
            name = order[i % len(order)]
            time.sleep(interval)
            t0, c0 = time.monotonic_ns(), time.process_time()
            done = writers[name]()
            cpu[name] += time.process_time() - c0
            frames[name].extend(t - t0 for t in done)
            lengths[name].append(max(done) - t0)
        result: dict[str, Any] = {"burst_clients": clients, "burst_count": count}
        for name in writers:
            times, ends = sorted(frames[name]), sorted(lengths[name])
            result.update({
                f"burst_{name}_p50_ms": round(_at(times, 0.5) / 1e6, 2),
                f"burst_{name}_p99_ms": round(_at(times, 0.99) / 1e6, 2),
                f"burst_{name}_p999_ms": round(_at(times, 0.999) / 1e6, 2),
                f"burst_{name}_last_p90_ms": round(_at(ends, 0.9) / 1e6, 2),
                f"burst_{name}_us_per_write": round(1e6 * cpu[name] / (clients * count), 2),
            })
        if missing:
            result["burst_c_error"] = missing
        return result
    finally:
        pool.shutdown()
        for server in servers:
            server.close()
        listener.close()
        reader.join(5)
        if reader.is_alive():
            reader.kill()


def _at(ordered: Sequence[T], quantile: float) -> T:
    return ordered[min(len(ordered) - 1, int(len(ordered) * quantile))]


def _spin(iterations: int) -> int:
    total = 0
    for i in range(iterations):
        total += i
    return total


def hiccups(count: int = 200, chunk: float = 0.005, pause: float = 0.02) -> dict[str, Any]:
    """How often the machine stretches a fixed piece of pure CPU work: a Python loop with no
    system call, sized to take `chunk` seconds, run `count` times with `pause` between. Its
    wall time is the thread's CPU time (no other thread of this process runs), so a stretch
    is CPU taken from this process's virtual CPU without the kernel seeing it as anything
    but this thread running (on this machine: steal time is not reported). Any burst of
    writes of about that length meets the same stretches."""
    _spin(100_000)
    t0 = time.perf_counter()
    _spin(100_000)
    iterations = max(1, int(chunk / ((time.perf_counter() - t0) / 100_000)))
    walls = []
    for _ in range(count):
        time.sleep(pause)
        t0 = time.perf_counter()
        _spin(iterations)
        walls.append(time.perf_counter() - t0)
    walls.sort()
    median = walls[len(walls) // 2]
    return {
        "hiccup_count": count,
        "hiccup_p50_ms": round(1000 * median, 2),
        "hiccup_p99_ms": round(1000 * _at(walls, 0.99), 2),
        "hiccup_max_ms": round(1000 * walls[-1], 2),
        "hiccup_over_2x_median_pct": round(100 * sum(w > 2 * median for w in walls) / count, 1),
    }


def measure(clients: int = 200, rounds: int = 200, size: int = 200, burst_count: int = 50,
            hiccup_count: int = 200) -> dict[str, Any]:
    return {
        "clients": clients,
        "rounds": rounds,
        "frame_bytes": len(frame_bytes(size)),
        "socket_send_us": round(raw_send(clients, rounds, size), 2),
        "transport_write_us": round(asyncio.run(transport_write(clients, rounds, size)), 2),
        **bursts(count=burst_count, size=size),
        **hiccups(count=hiccup_count),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--size", type=int, default=200, help="payload bytes per frame")
    parser.add_argument("--bursts", type=int, default=50, help="bursts per writer")
    parser.add_argument("--hiccups", type=int, default=200, help="runs of pure CPU work")
    args = parser.parse_args()
    print(json.dumps(measure(args.clients, args.rounds, args.size, args.bursts, args.hiccups)),
          flush=True)


if __name__ == "__main__":
    main()
