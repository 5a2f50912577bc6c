"""Reading aiocoap's UDP socket in batches, so a gateway that falls behind catches up.

aiocoap's UDP transport reads one datagram each time the event loop finds its socket
readable, interleaved with everything else the loop does, such as writing one update to a
thousand WebSocket clients. When a sensor offers more updates than the gateway can deliver,
the difference queues in the kernel's receive buffer, every update reaches clients seconds
late, and the buffer's tail drops the newest ones (and other sensors' too).

Here each readiness event moves up to `BATCH` datagrams from the socket into a queue of our
own, which is handed to aiocoap in order:

    queue holds                      what happens
    -------------------------------  --------------------------------------------------------
    a few fresh datagrams            every one is handed on; two notifications of the same
                                     observation never go in one loop turn, so the CoAP side
                                     sees each (aiocoap's observation iterator keeps only the
                                     newest it has not handed out yet)
    more than COALESCE_ABOVE, or     the gateway is behind: a NON notification is dropped,
    one older than MAX_WAIT          unparsed, when a newer one of the same observation
                                     (remote, token) waits behind it: clients get the newest
                                     value, with a jump in `seq`
    more than MAX_PENDING            the socket is not read until the queue is half empty

It also gives the socket a larger receive buffer, so that a burst (hundreds of registrations
answered at once, say) is not dropped by the kernel. It reaches into aiocoap's private
transport (pinned to 0.4.x in pyproject.toml); anything unexpected leaves aiocoap's own
behaviour in place, with a log line.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import socket
from typing import Any, Final

from aiocoap.util.socknumbers import HAS_RECVERR, MSG_ERRQUEUE

log = logging.getLogger(__name__)

BATCH: Final = 64
"""Datagrams read per readiness event at most, so one busy socket cannot starve the loop."""
COALESCE_ABOVE: Final = 32
"""Queued datagrams beyond which the gateway counts as behind and keeps only the newest."""
MAX_WAIT: Final = 0.005
"""Seconds a queued datagram may wait before the gateway counts as behind: one fan-out to a
thousand clients takes 5 to 10 milliseconds, so a datagram still queued after one such loop
turn means notifications arrive faster than they go out. (At 20 ms, p99 sensor-to-client
latency at N = 1000 under 2x overload was ~40 ms higher.)"""
MAX_PENDING: Final = 4096
"""Queued datagrams beyond which reading pauses (only CON and other undroppable messages can
pile up this far, since droppable ones collapse to one per observation)."""
MAX_SENDERS: Final = 1024
"""Distinct (address, packet info) pairs remembered for sharing, at most."""
RECEIVE_BUFFER: Final = 1 << 20
"""Bytes asked for the receive buffer (the kernel caps it at net.core.rmem_max)."""

Datagram = tuple[bytes, list[Any], int, Any]
"""What recvmsg returns: data, ancillary data, flags, address."""


def batch_reads(context: Any, *, batch: int = BATCH, receive_buffer: int = RECEIVE_BUFFER) -> int:
    """Adapt every UDP transport of an aiocoap `context`; returns how many were adapted."""
    adapted = 0
    for interface in getattr(context, "request_interfaces", ()):
        messages = getattr(getattr(interface, "token_interface", None), "message_interface", None)
        transport = getattr(messages, "transport", None)
        if transport is None or not callable(getattr(transport, "_read_ready", None)):
            continue
        sock = transport.get_extra_info("socket")
        if not isinstance(sock, socket.socket) or sock.type != socket.SOCK_DGRAM:
            continue
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        except OSError as exc:
            log.info("could not enlarge the UDP receive buffer: %s", exc)
        _BatchReader(messages, sock, getattr(transport, "max_size", 4096), batch).install()
        adapted += 1
    if not adapted:
        log.warning("no aiocoap UDP transport found to batch reads on; keeping aiocoap's")
    return adapted


def observation_key(datagram: Datagram) -> tuple[Any, bytes] | None:
    """(remote, token) of a response, from the raw header (RFC 7252 §3); None otherwise."""
    data, _, _, address = datagram
    if len(data) < 4:
        return None
    token_length = data[0] & 0x0F
    if data[1] >> 5 < 2 or token_length > 8 or len(data) < 4 + token_length:
        return None  # a request, an empty ACK/RST, or malformed
    return address, bytes(data[4 : 4 + token_length])


def _droppable(datagram: Datagram) -> bool:
    """A NON 2.xx response: an observe notification that a newer one makes moot. A CON must
    be acknowledged, and an error response ends something, so neither is ever dropped."""
    data = datagram[0]
    return (data[0] >> 4) & 0x03 == 1 and data[1] >> 5 == 2


def superseded(datagrams: list[Datagram]) -> list[bool]:
    """For each datagram, whether a later one of the same observation makes it moot."""
    seen: set[tuple[Any, bytes]] = set()
    moot = [False] * len(datagrams)
    for index in range(len(datagrams) - 1, -1, -1):
        key = observation_key(datagrams[index])
        if key is None or not _droppable(datagrams[index]):
            continue
        if key in seen:
            moot[index] = True
        else:
            seen.add(key)
    return moot


class _BatchReader:
    """The socket reader and the queue between it and aiocoap (see the module docstring)."""

    def __init__(self, protocol: Any, sock: socket.socket, max_size: int, batch: int) -> None:
        self.protocol = protocol
        self.deliver = protocol.datagram_msg_received
        self.sock = sock
        self.max_size = max_size
        self.batch = batch
        self.pending: collections.deque[Datagram] = collections.deque()
        self.read_at: collections.deque[float] = collections.deque()
        """When each pending datagram was taken from the socket (loop time)."""
        self.senders: dict[tuple[Any, ...], tuple[Any, list[Any]]] = {}
        """(address, ancillary data) of recent senders, to share among their messages."""
        self.scheduled = False
        self.reading = False
        self.loop = asyncio.get_running_loop()

    def install(self) -> None:
        self.loop.remove_reader(self.sock.fileno())  # transport.close() removes ours later
        self._resume()

    def _resume(self) -> None:
        if not self.reading and self.sock.fileno() != -1:
            self.reading = True
            self.loop.add_reader(self.sock.fileno(), self._readable)

    def _pause(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.sock.fileno())

    def _readable(self) -> None:
        self._read()
        if not self.scheduled:
            # Hand on now, in this loop turn, as aiocoap's own reader would: a turn can be a
            # whole fan-out long, and waiting for the next one delays every notification by it.
            self._hand_on(read=False)

    def _read(self) -> None:
        """Move what the socket holds into the queue; collapse the queue if behind."""
        sock, protocol, pending = self.sock, self.protocol, self.pending
        if HAS_RECVERR:
            # ICMP errors about what the gateway sent (port unreachable...).
            for _ in range(self.batch):
                try:
                    data, ancdata, flags, address = sock.recvmsg(
                        self.max_size, 1024, MSG_ERRQUEUE
                    )
                except (BlockingIOError, InterruptedError):
                    break
                except OSError as exc:
                    protocol.error_received(exc)
                    break
                protocol.datagram_errqueue_received(data, ancdata, flags, address)
        now = self.loop.time()
        read_at, senders = self.read_at, self.senders
        for _ in range(self.batch):
            try:
                data, ancdata, flags, address = sock.recvmsg(self.max_size, 1024)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                protocol.error_received(exc)
                break
            # One copy of each sender's address and packet info, however many of its
            # messages aiocoap keeps (it keeps every observation's first response).
            key = (address, *ancdata)
            shared = senders.get(key)
            if shared is None:
                if len(senders) >= MAX_SENDERS:
                    senders.clear()  # bounded, whatever the sources
                senders[key] = shared = (address, ancdata)
            pending.append((data, shared[1], flags, shared[0]))
            read_at.append(now)
        if len(pending) > 1 and (len(pending) > COALESCE_ABOVE or now - read_at[0] > MAX_WAIT):
            moot = superseded(list(pending))
            kept = [(d, t) for d, t, drop in zip(pending, read_at, moot, strict=True) if not drop]
            pending.clear()
            read_at.clear()
            pending.extend(d for d, _ in kept)
            read_at.extend(t for _, t in kept)
        if len(pending) > MAX_PENDING:
            self._pause()

    def _schedule(self) -> None:
        if self.pending and not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._hand_on)

    def _hand_on(self, read: bool = True) -> None:
        """Hand queued datagrams to aiocoap, at most one per observation per loop turn, so
        that the CoAP side takes each notification before the next one of its kind.

        With `read`, the socket is read first: this turn began with the callbacks queued in
        the one before (a fan-out, often), so what arrived meanwhile is still in the socket,
        and a queued notification that a newer one already supersedes must not go out."""
        self.scheduled = False
        pending, handed = self.pending, set()
        if self.sock.fileno() == -1:
            pending.clear()  # the transport was closed meanwhile
            self.read_at.clear()
            return
        if read and self.reading:
            self._read()
        while pending:
            key = observation_key(pending[0])
            if key is not None:
                if key in handed:
                    break
                handed.add(key)
            self.read_at.popleft()
            self.deliver(*pending.popleft())
        if len(pending) <= MAX_PENDING // 2:
            self._resume()
        self._schedule()
