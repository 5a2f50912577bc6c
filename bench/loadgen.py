"""The load generator: many WebSocket clients in one process.

    python -m bench.loadgen

prints ``{"ready": …}`` and then takes JSON commands on stdin (see `bench.control`):

- ``connect``: open `n` clients to `url` with at most `concurrency` handshakes at a time;
  each subscribes to `uris` (``assign: "all"``: every client to every URI; ``"split"``: the
  URIs dealt out evenly) and, with `wait_notify`, waits for a first `notify` per
  subscription. Every client then reads frames until closed, counting `notify` frames and,
  while a window is open, their latency: now - the ``"t"`` the sensor put in the payload.
- ``admit``: the same, but timed per client: the handshake and the `subscribed` answer
  (for the admission scenario).
- ``start`` / ``stop``: open and close a measurement window; ``stop`` answers the counts,
  a latency histogram, how many connections closed and this process's CPU time.
- ``requests``: `clients` connections with `inflight` request loops in all, each sending
  `request` frames back to back for `duration` seconds; answers round trips and latencies.
- ``close``: drop every connection.

The opening handshake is by default `Upgrade`: one fixed request with a fresh key, the
response's status and `Sec-WebSocket-Accept` checked (0.3 ms of CPU per handshake and
subscribe against 0.7-0.9 ms with websockets' client; ``handshake: "websockets"`` uses
`websockets.asyncio.client.connect`, and the ``requests`` command always does). Frames are
then read, by default (``reader: "fast"``), by `FastReader`: a minimal RFC 6455 frame counter that
takes over the connection's transport. Measured on the 2-core machine this is meant for,
websockets' own reader (``reader: "websockets"``, kept for comparison) costs about 12 µs per
received frame, more than the server spends sending it, so the load generator and not the
server would set the figures; the fast reader costs about 2 to 3 µs. It cuts the send time out
of the frame text without a JSON parse, answers pings, and notes a close frame.

The fast readers' sockets are read by one `Poller` per process, not by the event loop: it
reads every socket that is ready, then does not look again for `--pace` seconds (1 ms by
default), the way a network card coalesces interrupts. On loopback the kernel runs the
receiving side of every write in the writer's system call, including waking the reader; a
reader that drains each socket the moment it turns readable goes back to sleep between two
writes of one fan-out, so the server pays a wakeup per frame (measured: 9-10 µs of server CPU
per frame at 1000 clients x 10 updates/s against 7 µs with pacing) that it never pays for a
client on another machine. Pacing adds at most `pace` to each measured latency, and the bare
baselines are measured with the same readers.

The process runs on uvloop when it is installed (the `bench` extra installs it), for the same
reason: the load generator's own handshakes and frame handling must cost less than the
server's, or the figures measure the load generator (`--loop asyncio` to compare).

The poll round itself has a native fast path (`--reader native|python|auto`, default auto):
`bench/fastread.c`, compiled on first use with ``cc`` into a cache keyed by the source's hash
(`build_native`) and called through ctypes with the GIL released (`NativeReader`). One call
does what `Poller._ready`'s loop and `FastReader.data_received` do for notify frames: the
epoll look, one ``recvmsg`` per ready socket with its kernel receive time, frame reassembly,
the counts and both latency histograms. Every other frame, end of stream and read error comes
back as an event that the Python code handles as before (`FastReader._other`, pong, close,
`_lost`). In Python the poll round costs about 18 µs of CPU per received frame, so under
saturation two load generators needed more CPU than the 2-core machine has beside the
server. Without a C compiler `auto` falls back to the Python reader; the ``ready`` line says
which reader is in use.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import ctypes
import hashlib
import itertools
import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from .control import _FLOOR, BUCKETS_PER_E, Histogram, command_loop, emit, raise_nofile

PACE = 0.001
SO_TIMESTAMPNS = 35
"""Linux (asm-generic/socket.h; the `socket` module lacks it): a received message carries
the kernel's receive time as ancillary data of this type, a struct timespec."""
TIMESPEC = struct.Struct("@qq")
ANCILLARY_BYTES = socket.CMSG_SPACE(TIMESPEC.size)
"""Default seconds between two looks of the `Poller` at the sockets."""
NOTIFY_PREFIX = b'{"type":"notify"'
T_KEY = b'"t":'

FASTREAD_SOURCE = Path(__file__).with_name("fastread.c")
MAX_FRAME = 1 << 20
"""The native reader's bound on one frame (and so on a socket's reassembly buffer)."""
NATIVE_BUCKETS = 4096
"""Histogram buckets the native reader keeps: up to e^(4096/40) µs, far beyond any latency."""
EV_PROTOCOL, EV_EOF, EV_ERROR, EV_TOO_LARGE = -1, -2, -3, -4
"""Native event kinds beside frame opcodes (see bench/fastread.c)."""
EVENT_HEAD = struct.Struct("=iiI")


class NativeUnavailable(RuntimeError):
    """The native reader could not be built or loaded."""


def _build_dirs() -> list[Path]:
    dirs = []
    if sys.prefix != sys.base_prefix:  # a virtual environment, e.g. the project's .venv
        dirs.append(Path(sys.prefix) / "bench-build")
    dirs.append(Path(tempfile.gettempdir()) / f"coap-ws-bench-build-{os.getuid()}")
    return dirs


def build_native(source: Path = FASTREAD_SOURCE) -> Path:
    """The shared library compiled from `source`, built once per source hash."""
    code = source.read_bytes()
    name = f"{source.stem}-{hashlib.sha256(code).hexdigest()[:16]}.so"
    failures = []
    for directory in _build_dirs():
        target = directory / name
        if target.exists():
            return target
        try:
            directory.mkdir(parents=True, exist_ok=True)
            partial = directory / f".{name}.{os.getpid()}"
            proc = subprocess.run(
                ["cc", "-O2", "-shared", "-fPIC", "-o", str(partial), str(source), "-lm"],
                capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            failures.append(f"{directory}: {exc}")
            continue
        if proc.returncode != 0:
            with contextlib.suppress(OSError):
                partial.unlink()
            raise NativeUnavailable(f"cc failed: {proc.stderr.strip()[:500]}")
        os.replace(partial, target)  # atomic: concurrent load generators may build too
        return target
    raise NativeUnavailable("; ".join(failures) or "no build directory")


class NativeReader:
    """The ctypes face of bench/fastread.c: per-socket reassembly and counts, the window's
    histograms, and one call per poll round."""

    def __init__(self, library: Path | None = None) -> None:
        try:
            lib = ctypes.CDLL(str(library or build_native()))
        except OSError as exc:
            raise NativeUnavailable(f"cannot load the native reader: {exc}") from exc
        c_void_p, c_int, c_int64, c_double = (
            ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_double)
        int64_p, double_p = ctypes.POINTER(c_int64), ctypes.POINTER(c_double)
        for name, restype, argtypes in (
            ("fr_new", c_void_p, [c_double, c_double, c_int, c_int64]),
            ("fr_free", None, [c_void_p]),
            ("fr_add", c_int, [c_void_p, c_int]),
            ("fr_remove", c_int64, [c_void_p, c_int]),
            ("fr_notified", c_int64, [c_void_p, c_int]),
            ("fr_poll", c_int, [c_void_p, c_int, c_int, int64_p]),
            ("fr_events", c_void_p, [c_void_p]),
            ("fr_frames", c_int64, [c_void_p]),
            ("fr_hist_add", None, [c_void_p, c_int, c_double]),
            ("fr_hist", None, [c_void_p, c_int, int64_p, double_p]),
            ("fr_window_reset", None, [c_void_p]),
        ):
            function = getattr(lib, name)
            function.restype, function.argtypes = restype, argtypes
        self.lib = lib
        self.ctx = lib.fr_new(_FLOOR, BUCKETS_PER_E, NATIVE_BUCKETS, MAX_FRAME)
        if not self.ctx:
            raise NativeUnavailable("fr_new: out of memory")
        self.out = (c_int64 * 3)()

    def add(self, fd: int) -> None:
        if self.lib.fr_add(self.ctx, fd) != 0:
            raise MemoryError("native reader: no room for another socket")

    def remove(self, fd: int) -> int:
        """Forget `fd` (its number may be reused); answers its notify count."""
        return int(self.lib.fr_remove(self.ctx, fd))

    def notified(self, fd: int) -> int:
        return int(self.lib.fr_notified(self.ctx, fd))

    def poll(self, epfd: int, active: bool) -> tuple[int, list[tuple[int, int, bytes]]]:
        """One poll round: (notify frames read, the other events in order)."""
        out = self.out
        error = self.lib.fr_poll(self.ctx, epfd, active, out)
        if error:
            raise OSError(-error, os.strerror(-error))
        notifies, size = out[0], out[1]
        if not size:
            return notifies, []
        return notifies, self.parse_events(ctypes.string_at(self.lib.fr_events(self.ctx), size))

    @staticmethod
    def parse_events(data: bytes) -> list[tuple[int, int, bytes]]:
        events = []
        pos = 0
        while pos < len(data):
            fd, kind, length = EVENT_HEAD.unpack_from(data, pos)
            pos += EVENT_HEAD.size
            events.append((fd, kind, data[pos:pos + length]))
            pos += length
        return events

    def histogram(self, which: int) -> Histogram:
        """The window's kernel (0) or app (1) latency histogram as a `Histogram`."""
        buckets = (ctypes.c_int64 * NATIVE_BUCKETS)()
        stats = (ctypes.c_double * 3)()
        self.lib.fr_hist(self.ctx, which, buckets, stats)
        histogram = Histogram()
        histogram.buckets = {i: n for i, n in enumerate(buckets) if n}
        histogram.count, histogram.total, histogram.max = int(stats[0]), stats[1], stats[2]
        return histogram

    def window_reset(self) -> None:
        self.lib.fr_window_reset(self.ctx)

    def drain_window(self, window: Window) -> None:
        """Add what the native reader counted since the last reset to `window`; reset."""
        window.frames += int(self.lib.fr_frames(self.ctx))
        for which, target in ((0, window.latency), (1, window.app_latency)):
            part = self.histogram(which)
            for index, count in part.buckets.items():
                target.buckets[index] = target.buckets.get(index, 0) + count
            target.count += part.count
            target.total += part.total
            target.max = max(target.max, part.max)
        self.window_reset()

    def close(self) -> None:
        if self.ctx:
            self.lib.fr_free(self.ctx)
            self.ctx = None


def choose_reader(kind: str) -> tuple[NativeReader | None, str]:
    """The reader for `--reader` `kind` (python, native, auto) and a line saying which."""
    if kind == "python":
        return None, "python"
    try:
        return NativeReader(), "native"
    except NativeUnavailable as exc:
        if kind == "native":
            raise
        return None, f"python (native unavailable: {exc})"


class Window:
    """Counts of one measurement window (shared by all clients of the process)."""

    def __init__(self) -> None:
        self.active = False
        self.frames = 0
        self.latency = Histogram()
        """Sensor send time to the kernel's receipt of the frame (see `Poller`)."""
        self.app_latency = Histogram()
        """Sensor send time to this process reading the frame (includes its own queueing)."""
        self.started = time.monotonic()
        self.cpu = time.process_time()


def client_frame(payload: bytes, opcode: int = 1) -> bytes:
    """A masked client frame (RFC 6455 §5.2/5.3) carrying `payload`."""
    length = len(payload)
    if length < 126:
        head = bytes((0x80 | opcode, 0x80 | length))
    elif length < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + length.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + length.to_bytes(8, "big")
    mask = os.urandom(4)
    if not length:
        return head + mask
    key = (mask * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(length, "big")
    return head + mask + masked


class FastReader(asyncio.Protocol):
    """Reads server frames straight off the transport: counts notifies, measures latency."""

    def __init__(self, gen: LoadGen, transport: asyncio.Transport) -> None:
        self.gen = gen
        self.transport = transport
        self.fd = -1
        """The descriptor the `Poller` reads (its own duplicate of the socket's), or -1."""
        self.sock: socket.socket | None = None
        self.buffer = bytearray()
        self.subscribed = 0
        self._notified = 0
        """Notify frames counted in Python (and, once removed, in C)."""
        self.errors: list[str] = []
        self.closed = False
        self.changed = asyncio.Event()

    @property
    def notified(self) -> int:
        """Notify frames received in all."""
        native = self.gen.poller.native
        if native is not None and self.fd >= 0:
            return self._notified + native.notified(self.fd)
        return self._notified

    def send_text(self, text: str) -> None:
        self.transport.write(client_frame(text.encode()))

    def data_received(self, data: bytes | memoryview, received_at: float | None = None) -> None:
        """`received_at`: when the kernel received the newest of these bytes (time.time()
        scale), if known; else now."""
        buf = self.buffer
        buf += data
        pos, size = 0, len(buf)
        window = self.gen.window
        now = time.time()
        arrival = now if received_at is None else received_at
        while size - pos >= 2:
            first, second = buf[pos], buf[pos + 1]
            length = second & 0x7F
            head = 2
            if length == 126:
                if size - pos < 4:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 4], "big")
                head = 4
            elif length == 127:
                if size - pos < 10:
                    break
                length = int.from_bytes(buf[pos + 2:pos + 10], "big")
                head = 10
            if second & 0x80:  # a masked server frame is a protocol error
                self._lost("masked frame from the server")
                return
            start = pos + head
            end = start + length
            if end > size:
                break
            opcode = first & 0x0F
            if opcode <= 2:
                if buf.startswith(NOTIFY_PREFIX, start):
                    self._notified += 1
                    if window.active:
                        window.frames += 1
                        i = buf.find(T_KEY, start, end)
                        if i >= 0:
                            j = buf.find(b",", i, end)
                            with contextlib.suppress(ValueError):
                                sent = float(buf[i + 4:j])
                                window.latency.add(arrival - sent)
                                window.app_latency.add(now - sent)
                    self.changed.set()
                else:
                    self._other(bytes(buf[start:end]))
            elif opcode == 9:
                self.transport.write(client_frame(bytes(buf[start:end]), 10))
            elif opcode == 8:
                self.transport.write(client_frame(bytes(buf[start:start + 2]), 8))
                self._lost("closed by the server")
                return
            pos = end
        del buf[:pos]

    def _other(self, payload: bytes) -> None:
        try:
            frame = json.loads(payload)
        except ValueError:
            return
        kind = frame.get("type")
        if kind == "subscribed":
            self.subscribed += 1
        elif kind == "error":
            self.errors.append(str(frame)[:200])
        self.changed.set()

    def _lost(self, why: str) -> None:
        self.gen.poller.remove(self)
        if not self.closed:
            self.closed = True
            self.gen.closed += 1
            self.errors.append(why)
            self.transport.abort()
        self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost("connection lost")

    async def wait(self, done: Callable[[], bool], timeout: float) -> None:
        waiting = self.gen.poller.waiting
        waiting.add(self)  # the native reader counts notifies without telling each reader
        try:
            async with asyncio.timeout(timeout):
                while not done():
                    if self.closed or self.errors:
                        raise RuntimeError(f"subscribe failed: {self.errors}")
                    self.changed.clear()
                    await self.changed.wait()
        finally:
            waiting.discard(self)


class Poller:
    """Reads the fast readers' sockets, looking at most once per `pace` seconds (see the
    module docstring): one epoll set of our own, watched by the event loop only while armed.
    With a `NativeReader` the reading and parsing of each round is done in C."""

    def __init__(self, pace: float, native: NativeReader | None = None) -> None:
        self.pace = pace
        self.native = native
        self.active = False
        """Whether the native reader measures latencies (the window is open)."""
        self.waiting: set[FastReader] = set()
        self.epoll = select.epoll()
        self.readers: dict[int, FastReader] = {}
        buffer = bytearray(1 << 16)
        self.buffers = [buffer]
        self.view = memoryview(buffer)
        self.armed = False
        self.loop = asyncio.get_running_loop()

    def add(self, reader: FastReader) -> None:
        """Take over reading `reader`'s socket from the event loop, through a duplicate
        descriptor of our own with kernel receive timestamps on."""
        transport = reader.transport
        transport.pause_reading()
        sock = socket.socket(fileno=os.dup(transport.get_extra_info("socket").fileno()))
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        reader.sock, reader.fd = sock, sock.fileno()
        if self.native is not None:
            self.native.add(reader.fd)
        self.readers[reader.fd] = reader
        self.epoll.register(reader.fd, select.EPOLLIN)
        self._arm()

    def remove(self, reader: FastReader) -> None:
        if self.readers.pop(reader.fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self.epoll.unregister(reader.fd)
            if self.native is not None:
                reader._notified += self.native.remove(reader.fd)
        if reader.sock is not None:
            reader.sock.close()  # the transport closes its own descriptor
        reader.sock, reader.fd = None, -1

    def close(self) -> None:
        if self.armed:
            self.loop.remove_reader(self.epoll.fileno())
            self.armed = False
        self.epoll.close()
        if self.native is not None:
            for fd, reader in self.readers.items():
                reader._notified += self.native.remove(fd)
            self.native.close()
            self.native = None

    def _arm(self) -> None:
        if not self.armed and not self.epoll.closed:
            self.armed = True
            self.loop.add_reader(self.epoll.fileno(), self._ready)

    def _ready(self) -> None:
        self.loop.remove_reader(self.epoll.fileno())
        self.armed = False
        if self.native is not None:
            self._read_native(self.native)
        else:
            self._read_python()
        if self.pace > 0:
            self.loop.call_later(self.pace, self._arm)
        else:
            self._arm()

    def _read_native(self, native: NativeReader) -> None:
        notifies, events = native.poll(self.epoll.fileno(), self.active)
        for fd, kind, payload in events:
            reader = self.readers.get(fd)
            if reader is None:  # lost through an earlier event of this round
                continue
            if 0 <= kind <= 2:
                reader._other(payload)
            elif kind == 9:
                reader.transport.write(client_frame(payload, 10))
            elif kind == 8:
                reader.transport.write(client_frame(payload[:2], 8))
                reader._lost("closed by the server")
            elif kind == EV_EOF:
                reader._lost("connection closed by the server")
            elif kind == EV_ERROR:
                code = int.from_bytes(payload, sys.byteorder)
                reader._lost(f"connection lost: {OSError(code, os.strerror(code))}")
            elif kind == EV_TOO_LARGE:
                reader._lost(f"frame larger than {MAX_FRAME} bytes")
            else:
                reader._lost(payload.decode(errors="replace") or "protocol error")
        if notifies:
            for reader in list(self.waiting):
                reader.changed.set()

    def _read_python(self) -> None:
        for fd, _ in self.epoll.poll(0):
            reader = self.readers.get(fd)
            if reader is None:
                continue
            sock = reader.sock
            if sock is None:
                continue
            try:
                # Into one buffer kept for all reads: a fresh 256 KiB bytes object per read
                # (what os.read(fd, 1 << 18) and asyncio's transports allocate) is an
                # mmap and munmap each time, and cost this process ~40 µs per frame.
                size, ancdata, _, _ = sock.recvmsg_into(self.buffers, ANCILLARY_BYTES)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                reader._lost(f"connection lost: {exc}")
                continue
            if not size:
                reader._lost("connection closed by the server")
                continue
            received_at = None
            for level, kind, value in ancdata:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    seconds, nanoseconds = TIMESPEC.unpack_from(value)
                    received_at = seconds + nanoseconds * 1e-9
            reader.data_received(self.view[:size], received_at)


WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MAX_RESPONSE_HEAD = 16384


class HandshakeFailed(ConnectionError):
    """The server did not switch to WebSocket as RFC 6455 §4.1 requires."""


class Upgrade(asyncio.Protocol):
    """The client's side of an RFC 6455 opening handshake and nothing more: one request with
    a fresh key, then the response's status line and `Sec-WebSocket-Accept` checked. The
    server does the same work whoever the client is; this client does a fraction of what
    `websockets.asyncio.client.connect` does (measured: 0.7-0.9 ms of CPU per handshake and
    subscribe, as much as the server spends), which on two shared cores is CPU taken from
    the server while many clients arrive at once (the admission scenario)."""

    def __init__(self, host: str, path: str) -> None:
        key = base64.b64encode(os.urandom(16))
        self.accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
        self.request = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n"
                        "Connection: Upgrade\r\nSec-WebSocket-Key: ").encode() + key + (
                        b"\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.buffer = bytearray()
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.rest = bytearray()
        """What the server sent after its response head (frames), until the caller hands
        the transport to the next protocol: bytes can arrive between the switch and the
        moment the waiting coroutine runs."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.Transport, transport).write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            if self.done.exception() is None:
                self.rest += data
            return
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buffer) > MAX_RESPONSE_HEAD:
                self.done.set_exception(HandshakeFailed("no end of the response head"))
            return
        status, *fields = bytes(self.buffer[:end]).split(b"\r\n")
        headers = {name.strip().lower(): value.strip()
                   for name, _, value in (field.partition(b":") for field in fields)}
        if status.split(b" ", 2)[:2] != [b"HTTP/1.1", b"101"]:
            self.done.set_exception(HandshakeFailed(f"answered {status.decode(errors='replace')}"))
        elif headers.get(b"sec-websocket-accept") != self.accept:
            self.done.set_exception(HandshakeFailed("wrong Sec-WebSocket-Accept"))
        else:
            self.rest += self.buffer[end + 4:]
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or HandshakeFailed("closed during the handshake"))


async def open_lean(url: str, timeout: float) -> tuple[asyncio.Transport, bytes]:
    """Open a WebSocket connection to `url` (ws:// only) with `Upgrade`; the transport and
    any bytes that followed the response head."""
    parts = urlsplit(url)
    if parts.scheme != "ws" or parts.hostname is None:
        raise ValueError(f"open_lean takes ws:// URLs, not {url!r}")
    port = parts.port or 80
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        transport, upgrade = await loop.create_connection(
            lambda: Upgrade(parts.netloc, path), parts.hostname, port)
        try:
            await upgrade.done
        except BaseException:
            transport.abort()
            raise
    # No await from here until the caller sets the next protocol: `rest` is complete.
    return transport, bytes(upgrade.rest)


class LoadGen:
    def __init__(self, pace: float = 0.0, native: NativeReader | None = None) -> None:
        self.poller = Poller(pace, native)
        self.clients: list[asyncio.Transport] = []
        """Every connection's transport, in the order they opened."""
        self.fast: list[FastReader] = []
        self.readers: set[asyncio.Task[None]] = set()
        self.window = Window()
        self.closed = 0
        self.notified: dict[int, int] = {}
        """Per client (index in `clients`): notify frames received in all."""
        self._first: dict[int, asyncio.Event] = {}
        self._ids = itertools.count(1)

    # -- connections -------------------------------------------------------------------------

    async def _open(self, url: str, timeout: float) -> ClientConnection:
        return await connect(
            url,
            compression=None,
            open_timeout=timeout,
            ping_interval=None,
            close_timeout=1,
        )

    async def _subscribe_fast(
        self,
        transport: asyncio.Transport,
        first_bytes: bytes,
        uris: list[str],
        wait_notify: bool,
        timeout: float,
        batch: int,
    ) -> None:
        """Hand the connection to a `FastReader`, then subscribe through it, `batch`
        subscriptions at a time (each batch answered before the next is sent).
        `first_bytes`: what the server sent after its handshake response, if anything."""
        reader = FastReader(self, transport)
        transport.set_protocol(reader)
        if first_bytes:
            reader.data_received(first_bytes)
        self.poller.add(reader)
        self.clients.append(transport)
        self.fast.append(reader)
        async with asyncio.timeout(timeout):
            for first in range(0, len(uris), max(1, batch)):
                chunk = uris[first:first + max(1, batch)]
                for number, uri in enumerate(chunk, first + 1):
                    reader.send_text(json.dumps({"type": "subscribe", "id": number, "uri": uri}))
                sent = first + len(chunk)
                need = sent if wait_notify else 0
                await reader.wait(lambda s=sent, n=need: reader.subscribed >= s  # type: ignore[misc]
                                  and reader.notified >= n, timeout)

    async def _subscribe(
        self, ws: ClientConnection, uris: list[str], wait_notify: bool, timeout: float
    ) -> int:
        """Subscribe to `uris`; return the index of the client and start its reader."""
        for number, uri in enumerate(uris, 1):
            await ws.send(json.dumps({"type": "subscribe", "id": number, "uri": uri}))
        subscribed = 0
        notified = 0
        need_notify = len(uris) if wait_notify else 0
        async with asyncio.timeout(timeout):
            while subscribed < len(uris) or notified < need_notify:
                data = await ws.recv(decode=False)
                if data.startswith(NOTIFY_PREFIX):
                    notified += 1
                    continue
                frame = json.loads(data)
                if frame.get("type") == "subscribed":
                    subscribed += 1
                elif frame.get("type") == "error":
                    raise RuntimeError(f"subscribe failed: {frame}")
        index = len(self.clients)
        self.clients.append(ws.transport)
        self.notified[index] = notified
        task = asyncio.create_task(self._read(index, ws))
        self.readers.add(task)
        task.add_done_callback(self.readers.discard)
        return index

    async def _read(self, index: int, ws: ClientConnection) -> None:
        window = self.window
        count = 0
        try:
            while True:
                data = await ws.recv(decode=False)
                if not data.startswith(NOTIFY_PREFIX):
                    continue
                count += 1
                window = self.window
                if window.active:
                    window.frames += 1
                    i = data.find(T_KEY)
                    if i >= 0:
                        j = data.find(b",", i)
                        with contextlib.suppress(ValueError):
                            window.latency.add(time.time() - float(data[i + 4:j]))
        except ConnectionClosed:
            self.closed += 1
        finally:
            self.notified[index] = self.notified.get(index, 0) + count

    @staticmethod
    def _assign(uris: list[str], n: int, assign: str) -> list[list[str]]:
        if assign == "all" or not uris:
            return [uris] * n
        return [uris[i::n] for i in range(n)]

    async def connect_many(self, command: dict[str, Any], timed: bool) -> dict[str, Any]:
        url = command["url"]
        n = int(command["n"])
        timeout = float(command.get("timeout", 30))
        per_client = self._assign(list(command.get("uris", [])), n, command.get("assign", "all"))
        wait_notify = bool(command.get("wait_notify", False))
        fast = command.get("reader", "fast") == "fast"
        lean = fast and command.get("handshake", "lean") == "lean"
        batch = int(command.get("batch", 1 << 30))
        gate = asyncio.Semaphore(int(command.get("concurrency", 50)))
        handshakes: list[float] = []
        handshaken: list[float] = []
        answered: list[float] = []
        failures: list[str] = []
        start = time.monotonic()

        async def one(uris: list[str]) -> None:
            async with gate:
                t0 = time.monotonic()
                try:
                    if lean:
                        transport, first_bytes = await open_lean(url, timeout)
                    else:
                        ws = await self._open(url, timeout)
                        transport, first_bytes = ws.transport, b""
                    t1 = time.monotonic()
                    if fast:
                        await self._subscribe_fast(transport, first_bytes, uris, wait_notify,
                                                   timeout, batch)
                    else:
                        await self._subscribe(ws, uris, wait_notify, timeout)
                    t2 = time.monotonic()
                except Exception as exc:
                    failures.append(f"{type(exc).__name__}: {exc}"[:200])
                    return
            handshakes.append(t1 - t0)
            handshaken.append(t1 - start)
            answered.append(t2 - start)

        async with asyncio.timeout(timeout * 2 + n * 0.05):
            await asyncio.gather(*(one(uris) for uris in per_client))
        elapsed = time.monotonic() - start
        reply: dict[str, Any] = {
            "connected": len(handshakes),
            "failed": len(failures),
            "errors": sorted(set(failures))[:5],
            "elapsed": elapsed,
        }
        if timed and handshakes:
            ordered = sorted(handshakes)
            reply.update(
                handshake_p50=ordered[len(ordered) // 2],
                handshake_p99=ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
                handshake_max=ordered[-1],
                all_handshaken=max(handshaken),
                all_subscribed=max(answered),
            )
        return reply

    # -- windows -----------------------------------------------------------------------------

    def start(self) -> dict[str, Any]:
        self.window = Window()
        self.window.active = True
        if self.poller.native is not None:
            self.poller.native.window_reset()
        self.poller.active = True
        return {"clients": len(self.clients), "closed": self.closed}

    def stop(self) -> dict[str, Any]:
        window = self.window
        window.active = False
        self.poller.active = False
        if self.poller.native is not None:
            self.poller.native.drain_window(window)
        return {
            "frames": window.frames,
            "latency": window.latency.to_json(),
            "app_latency": window.app_latency.to_json(),
            "seconds": time.monotonic() - window.started,
            "cpu": time.process_time() - window.cpu,
            "clients": len(self.clients),
            "closed": self.closed,
        }

    async def close_all(self) -> dict[str, Any]:
        clients, self.clients = self.clients, []
        for reader in self.fast:
            reader.closed = True  # our own abort below: not a close to count
            self.poller.remove(reader)
        self.fast = []
        for task in list(self.readers):
            task.cancel()
        for transport in clients:
            transport.abort()
        await asyncio.sleep(0)
        self.notified.clear()
        return {"closed": len(clients)}

    # -- requests ----------------------------------------------------------------------------

    async def requests(self, command: dict[str, Any]) -> dict[str, Any]:
        url = command["url"]
        n_clients = int(command.get("clients", 1))
        inflight = int(command.get("inflight", 1))
        duration = float(command.get("duration", 3))
        frame = dict(command["frame"])
        timeout = float(command.get("timeout", 10))
        conns = [await self._open(url, timeout) for _ in range(n_clients)]
        pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        latency = Histogram()
        codes: dict[str, int] = {}
        errors: dict[str, int] = {}

        async def reader(ws: ClientConnection) -> None:
            with contextlib.suppress(ConnectionClosed):
                async for message in ws:
                    reply = json.loads(message)
                    future = pending.pop(reply.get("id"), None)
                    if future is not None and not future.done():
                        future.set_result(reply)

        readers = [asyncio.create_task(reader(ws)) for ws in conns]
        deadline = time.monotonic() + duration
        loop = asyncio.get_running_loop()

        async def worker(ws: ClientConnection) -> None:
            while time.monotonic() < deadline:
                frame_id = next(self._ids)
                future: asyncio.Future[dict[str, Any]] = loop.create_future()
                pending[frame_id] = future
                t0 = time.perf_counter()
                await ws.send(json.dumps({**frame, "id": frame_id}, separators=(",", ":")))
                async with asyncio.timeout(timeout):
                    reply = await future
                latency.add(time.perf_counter() - t0)
                if reply.get("type") == "response":
                    codes[reply["code"]] = codes.get(reply["code"], 0) + 1
                else:
                    errors[reply.get("error", "?")] = errors.get(reply.get("error", "?"), 0) + 1

        cpu0, t_start = time.process_time(), time.monotonic()
        try:
            await asyncio.gather(*(worker(conns[i % n_clients]) for i in range(inflight)))
        finally:
            elapsed = time.monotonic() - t_start
            for task in readers:
                task.cancel()
            for ws in conns:
                ws.transport.abort()
        return {
            "round_trips": latency.count,
            "seconds": elapsed,
            "latency": latency.to_json(),
            "codes": codes,
            "errors": errors,
            "cpu": time.process_time() - cpu0,
        }


async def main_async(args: argparse.Namespace) -> None:
    nofile = raise_nofile()
    native, reader = choose_reader(args.reader)
    gen = LoadGen(args.pace, native)
    print(f"loadgen: reader {reader}", file=sys.stderr, flush=True)
    emit({"ready": "loadgen", "pid": os.getpid(), "nofile": nofile, "reader": reader})

    async def handle(command: dict[str, Any]) -> dict[str, Any]:
        match command.get("cmd"):
            case "connect":
                return await gen.connect_many(command, timed=False)
            case "admit":
                return await gen.connect_many(command, timed=True)
            case "start":
                return gen.start()
            case "stop":
                return gen.stop()
            case "requests":
                return await gen.requests(command)
            case "close":
                return await gen.close_all()
            case "count":
                return {"clients": len(gen.clients), "closed": gen.closed,
                        "notified": sum(r.notified for r in gen.fast)
                        + sum(gen.notified.values())}
        return {"ok": False, "error": f"unknown command {command.get('cmd')!r}"}

    try:
        await command_loop(handle, max_seconds=args.max_seconds)
    finally:
        await gen.close_all()
        gen.poller.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-seconds", type=float, default=900.0)
    parser.add_argument("--pace", type=float, default=PACE,
                        help="seconds between two looks at the sockets (0: at once)")
    parser.add_argument("--loop", choices=("auto", "asyncio", "uvloop"), default="auto")
    parser.add_argument("--reader", choices=("auto", "native", "python"),
                        default=os.environ.get("BENCH_LOADGEN_READER", "auto"),
                        help="the fast readers' poll round: in C (bench/fastread.c, built with"
                             " cc on first use), in Python, or C when it builds (default;"
                             " BENCH_LOADGEN_READER overrides)")
    args = parser.parse_args()
    runner = asyncio.run
    if args.loop != "asyncio":
        try:
            import uvloop
        except ImportError:
            if args.loop == "uvloop":
                raise
        else:
            runner = uvloop.run
    runner(main_async(args))


if __name__ == "__main__":
    main()
