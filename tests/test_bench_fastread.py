"""The load generator's native reader (bench/fastread.c) against its Python one.

Both read the same byte streams off real loopback TCP sockets, through the real `Poller`,
cut at every boundary; they must agree on counts, other frames, pongs, closes and losses,
and the native histograms must bucket exactly like `Histogram.add`. Skipped where the C
file cannot be built (no compiler): the Python reader is then the one in use.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import select
import socket
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from bench.control import _FLOOR, BUCKETS_PER_E, Histogram
from bench.loadgen import (
    MAX_FRAME,
    FastReader,
    LoadGen,
    NativeReader,
    NativeUnavailable,
    choose_reader,
)

from .conftest import WAIT
from .optional import need

KINDS = ["python", "native"]


def native_or_skip() -> NativeReader:
    try:
        return NativeReader()
    except NativeUnavailable as exc:
        need("cc", f"the native reader cannot be built: {exc}")
        raise


def server_frame(payload: bytes, opcode: int = 1, *, form: int | None = None,
                 masked: bool = False) -> bytes:
    """An unmasked server frame; `form` forces the 7-bit, 16-bit (126) or 64-bit (127)
    length encoding."""
    length = len(payload)
    if form is None:
        form = length if length < 126 else 126 if length < 65536 else 127
    mask_bit = 0x80 if masked else 0
    head = bytes((0x80 | opcode,))
    if form == 126:
        head += bytes((mask_bit | 126,)) + length.to_bytes(2, "big")
    elif form == 127:
        head += bytes((mask_bit | 127,)) + length.to_bytes(8, "big")
    else:
        head += bytes((mask_bit | length,))
    return head + (b"\x00\x00\x00\x00" if masked else b"") + payload


def notify(t: float, pad: int = 0) -> bytes:
    return (b'{"type":"notify","sub":1,"uri":"coap://x/r/0","seq":3,"t":'
            + repr(t).encode() + b',"value":"' + b"x" * pad + b'"}')


def client_frames(data: bytes) -> list[tuple[int, bytes]]:
    """Decode the masked client frames the reader wrote (pongs, close answers)."""
    frames = []
    pos = 0
    while pos < len(data):
        opcode, length = data[pos] & 0x0F, data[pos + 1] & 0x7F
        assert data[pos + 1] & 0x80, "client frames are masked"
        pos += 2
        if length == 126:
            length, pos = int.from_bytes(data[pos:pos + 2], "big"), pos + 2
        elif length == 127:
            length, pos = int.from_bytes(data[pos:pos + 8], "big"), pos + 8
        mask, pos = data[pos:pos + 4], pos + 4
        body = data[pos:pos + length]
        frames.append((opcode, bytes(b ^ mask[i % 4] for i, b in enumerate(body))))
        pos += length
    return frames


class Rig:
    """A `LoadGen` whose `Poller` is driven by hand, and loopback connections to it."""

    def __init__(self, kind: str) -> None:
        native = native_or_skip() if kind == "native" else None
        # a long pace: after a round run by the loop, nothing is read until `poll`
        self.gen = LoadGen(pace=3600.0, native=native)
        self.peers: list[socket.socket] = []

    async def connect(self) -> tuple[FastReader, socket.socket]:
        with socket.create_server(("127.0.0.1", 0)) as server:
            client = socket.create_connection(server.getsockname())
            peer, _ = server.accept()
        peer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        transport, _ = await asyncio.get_running_loop().create_connection(
            asyncio.Protocol, sock=client)
        reader = FastReader(self.gen, transport)  # type: ignore[arg-type]
        transport.set_protocol(reader)
        self.gen.poller.add(reader)
        self.peers.append(peer)
        return reader, peer

    def poll(self, reader: FastReader) -> None:
        """Wait until `reader`'s socket is readable, then one poll round."""
        if reader.sock is not None:
            select.select([reader.sock], [], [], 2.0)
        poller = self.gen.poller
        if poller.native is not None:
            poller._read_native(poller.native)
        else:
            poller._read_python()

    def feed(self, reader: FastReader, peer: socket.socket, data: bytes) -> None:
        """Send `data` as the socket buffers allow, reading meanwhile, then read it all."""
        peer.setblocking(False)
        while data:
            with contextlib.suppress(BlockingIOError):
                data = data[peer.send(data):]
            self.drain(reader)

    def drain(self, reader: FastReader) -> None:
        while reader.sock is not None and select.select([reader.sock], [], [], 0.01)[0]:
            self.poll(reader)

    def close(self) -> None:
        for reader in self.gen.fast:
            self.gen.poller.remove(reader)
        self.gen.poller.close()
        for peer in self.peers:
            peer.close()


@pytest.fixture
async def rigs() -> AsyncIterator[dict[str, Rig]]:
    made: dict[str, Rig] = {}
    try:
        for kind in KINDS:
            made[kind] = Rig(kind)
        yield made
    finally:
        for rig in made.values():
            rig.close()


def written(peer: socket.socket, at_least: int) -> list[tuple[int, bytes]]:
    """The frames the reader wrote back: at least `at_least` (waiting up to WAIT seconds for
    them, since a busy machine may deliver late), then any more that follow at once."""
    data = b""
    deadline = time.monotonic() + WAIT
    while True:
        missing = len(client_frames(data)) < at_least
        wait = max(0.0, deadline - time.monotonic()) if missing else 0.05
        if not select.select([peer], [], [], wait)[0]:
            break
        chunk = peer.recv(1 << 16)
        if not chunk:
            break
        data += chunk
    return client_frames(data)


def state(reader: FastReader) -> tuple[Any, ...]:
    return reader.notified, reader.subscribed, tuple(reader.errors), reader.closed


def long_ago() -> float:
    """A send time ~1000 s ago, mid-bucket: its latency bucket is the same for ±10 s."""
    return time.time() - _FLOOR * math.exp(828.5 / BUCKETS_PER_E)


def small_stream() -> bytes:
    t = long_ago()
    return b"".join([
        server_frame(notify(t)),
        server_frame(b'{"type":"subscribed","id":1,"sub":1}'),
        server_frame(b"ping!", 9),
        server_frame(notify(t, 200)),                        # 16-bit length
        server_frame(notify(t), form=127),                   # 64-bit length (not minimal)
        server_frame(b'{"type":"error","id":2,"error":"nope"}', form=126),
        server_frame(b"", 10),                               # a pong: ignored
        server_frame(notify(t, 5), 2),                       # a binary notify counts too
        server_frame(b"", 9),                                # an empty ping
        server_frame(b'{"type":"notify","t":bad,"x":1}'),    # counted, no latency
        server_frame(notify(t)),
    ])


async def test_every_cut_of_a_stream_reads_the_same(rigs: dict[str, Rig]) -> None:
    results = {}
    # One stream for both readers: its length (so the number of cuts) varies with the
    # digits of the send time (sent "1000 s ago" from now: see `long_ago`).
    stream = small_stream()
    for kind, rig in rigs.items():
        reader, peer = await rig.connect()
        rig.gen.start()
        steps = []
        for cut in range(len(stream) + 1):
            for part in (stream[:cut], stream[cut:]):
                if part:
                    peer.sendall(part)
                    rig.poll(reader)
            steps.append(state(reader))
        stop = rig.gen.stop()
        results[kind] = steps, written(peer, 2 * (len(stream) + 1)), stop["frames"], \
            stop["latency"]["buckets"], \
            stop["latency"]["count"]
    python, native = results["python"], results["native"]
    assert native == python
    steps, pongs, frames, buckets, count = native
    cuts = len(stream) + 1
    assert steps[-1] == (6 * cuts, 1 * cuts, ("{'type': 'error', 'id': 2, 'error': 'nope'}",)
                         * cuts, False)
    assert pongs == [(10, b"ping!"), (10, b"")] * cuts
    assert frames == 6 * cuts and count == 5 * cuts
    assert buckets == [(828, count)]


async def test_several_frames_per_read_and_a_frame_over_many_reads(
        rigs: dict[str, Rig]) -> None:
    t = long_ago()
    big = server_frame(notify(t, 70_000))  # 64-bit length, more than one read
    assert big[1] == 127
    many = b"".join(server_frame(notify(t, i)) for i in range(300))
    stream = many + big + many
    results = {}
    for kind, rig in rigs.items():
        reader, peer = await rig.connect()
        rig.gen.start()
        steps = []
        for cut in (1, 2, 9, 10, 11, 4000, len(many) + 1, len(many) + 9, len(many) + 10,
                    len(many) + 70_000, len(many) + len(big) - 1, len(many) + len(big),
                    len(stream) - 1):
            rig.feed(reader, peer, stream[:cut])
            rig.feed(reader, peer, stream[cut:])
            steps.append(state(reader))
        stop = rig.gen.stop()
        results[kind] = steps, stop["frames"], stop["latency"]["count"]
    assert results["native"] == results["python"]
    steps, frames, count = results["native"]
    assert steps[-1][0] == frames == count == 601 * len(steps)


@pytest.mark.parametrize("ending, why", [
    (server_frame(b"\x03\xe8bye", 8), "closed by the server"),
    (server_frame(b'{"type":"notify","t":1}', masked=True), "masked frame from the server"),
    (b"", "connection closed by the server"),
])
async def test_close_protocol_error_and_end_of_stream_lose_the_reader(
        rigs: dict[str, Rig], ending: bytes, why: str) -> None:
    results = {}
    for kind, rig in rigs.items():
        reader, peer = await rig.connect()
        peer.sendall(server_frame(notify(long_ago())) + server_frame(b"p", 9) + ending
                     + server_frame(notify(long_ago())))
        if not ending:
            peer.shutdown(socket.SHUT_WR)
        for _ in range(3):
            rig.poll(reader)
        answers = 2 if ending.startswith(b"\x88") else 1  # the pong (and a close)
        results[kind] = state(reader), rig.gen.closed, reader.fd, written(peer, answers)
    assert results["native"] == results["python"]
    (notified, _, errors, closed), lost, fd, pongs = results["native"]
    assert (notified, errors, closed, lost, fd) == (1 if ending else 2, (why,), True, 1, -1)
    assert pongs[0] == (10, b"p")
    if ending.startswith(b"\x88"):
        assert pongs[1] == (8, b"\x03\xe8")


async def test_a_frame_over_the_cap_is_a_protocol_error(rigs: dict[str, Rig]) -> None:
    rig = rigs["native"]
    reader, peer = await rig.connect()
    peer.sendall(server_frame(notify(1.0)) + b"\x81\x7f" + (MAX_FRAME + 1).to_bytes(8, "big"))
    rig.poll(reader)
    assert reader.notified == 1 and reader.closed
    assert reader.errors == [f"frame larger than {MAX_FRAME} bytes"]


async def test_a_reused_descriptor_starts_afresh(rigs: dict[str, Rig]) -> None:
    rig = rigs["native"]
    first, peer = await rig.connect()
    peer.sendall(server_frame(notify(1.0)) + server_frame(notify(1.0))[:7])
    rig.poll(first)
    fd = first.fd
    rig.gen.poller.remove(first)
    assert first.notified == 1 and first.fd == -1  # the count survives removal
    second, peer2 = await rig.connect()
    assert second.fd == fd  # the lowest free number: the one just released
    assert second.notified == 0
    peer2.sendall(server_frame(notify(1.0)))
    rig.poll(second)
    assert second.notified == 1 and second.errors == []


def latencies() -> Iterator[float]:
    yield from (0.0, -1.0, -1e-9, _FLOOR, _FLOOR * 0.999, 1e-9, 3.0, 1e4, float("nan"))
    for i in range(2000):  # every bucket edge and its neighbours
        edge = _FLOOR * math.exp(i / BUCKETS_PER_E)
        yield from (edge, math.nextafter(edge, 0), math.nextafter(edge, math.inf))
    value = 1e-7
    while value < 1e5:
        yield value
        value *= 1.0137


def test_histogram_buckets_match_histogram_add() -> None:
    native = native_or_skip()
    try:
        expected = Histogram()
        for seconds in latencies():
            expected.add(seconds)
            native.lib.fr_hist_add(native.ctx, 1, seconds)
        got = native.histogram(1)
        assert got.buckets == expected.buckets
        assert (got.count, got.max) == (expected.count, expected.max)
        assert math.isnan(got.total) and math.isnan(expected.total)
        assert native.histogram(0).count == 0
        native.window_reset()
        assert native.histogram(1).buckets == {}
    finally:
        native.close()


def test_reader_choice() -> None:
    assert choose_reader("python") == (None, "python")
    native, name = choose_reader("auto")
    assert name == ("native" if native is not None else name)
    if native is not None:
        native.close()
