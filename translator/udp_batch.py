"""Batched reads on aiocoap's UDP sockets, so a busy gateway catches up instead of lagging.

aiocoap's UDP transport reads one datagram each time the event loop finds its socket
readable, and the loop interleaves that with everything else it has to do, such as writing
one update to a thousand WebSocket clients. When a sensor offers more updates than the
gateway can deliver, the difference queues in the kernel's receive buffer and every update
then reaches clients seconds late (and the buffer's tail drops the newest ones).

This module makes each readiness event drain up to `BATCH` datagrams, and of the
notifications read in one go passes on only the newest per observation (same sensor, same
token), without parsing the others; aiocoap's observation iterator likewise keeps only the
newest it has not handed out. So while the gateway is behind it forwards just the newest
value of each resource, and as soon as it has caught up every notification is forwarded
again. It also gives the socket a larger receive buffer, so that a
burst (hundreds of registrations answered at once, say) is not dropped by the kernel.

It reaches into aiocoap's private transport (pinned to 0.4.x in pyproject.toml); anything
unexpected leaves aiocoap's own behaviour in place, with a log line.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Final

from aiocoap.util.socknumbers import HAS_RECVERR, MSG_ERRQUEUE

log = logging.getLogger(__name__)

BATCH: Final = 64
"""Datagrams read per readiness event at most, so one busy socket cannot starve the loop."""
RECEIVE_BUFFER: Final = 1 << 20
"""Bytes asked for the receive buffer (the kernel caps it at net.core.rmem_max)."""


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
        _drain_on_readable(messages, transport, sock, batch)
        adapted += 1
    if not adapted:
        log.warning("no aiocoap UDP transport found to batch reads on; keeping aiocoap's")
    return adapted


Datagram = tuple[bytes, list[Any], int, Any]
"""What recvmsg returns: data, ancillary data, flags, address."""


def superseded(datagrams: list[Datagram]) -> list[bool]:
    """For each datagram of a batch, whether a later one makes it moot: a NON 2.xx response
    (an observe notification) whose remote and token come again later in the batch.

    Decided from the raw header (RFC 7252 §3) so that a superseded notification costs no
    parsing at all. A CON is never dropped, since it must be acknowledged; reordering is not
    judged here (aiocoap's and the CoAP side's ordering checks still run on what is kept).
    """
    seen: set[tuple[Any, bytes]] = set()
    moot = [False] * len(datagrams)
    for index in range(len(datagrams) - 1, -1, -1):
        data, _, _, address = datagrams[index]
        if len(data) < 4:
            continue
        token_length = data[0] & 0x0F
        is_non = (data[0] >> 4) & 0x03 == 1
        is_success = data[1] >> 5 == 2
        if not (is_non and is_success) or token_length > 8 or len(data) < 4 + token_length:
            continue
        key = (address, bytes(data[4 : 4 + token_length]))
        if key in seen:
            moot[index] = True
        else:
            seen.add(key)
    return moot


def _drain_on_readable(protocol: Any, transport: Any, sock: socket.socket, batch: int) -> None:
    deliver = protocol.datagram_msg_received
    max_size = getattr(transport, "max_size", 4096)

    def read_errors() -> None:
        # ICMP errors about what the gateway sent (port unreachable...): aiocoap reads these
        # before every datagram; once per readiness event is enough.
        for _ in range(batch):
            try:
                data, ancdata, flags, address = sock.recvmsg(max_size, 1024, MSG_ERRQUEUE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                protocol.error_received(exc)
                return
            protocol.datagram_errqueue_received(data, ancdata, flags, address)

    def drain() -> None:
        if HAS_RECVERR:
            read_errors()
        datagrams: list[Datagram] = []
        for _ in range(batch):
            try:
                datagrams.append(sock.recvmsg(max_size, 1024))
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                protocol.error_received(exc)
                break
        if len(datagrams) > 1:
            moot = superseded(datagrams)
            datagrams = [d for d, drop in zip(datagrams, moot, strict=True) if not drop]
        for data, ancdata, flags, address in datagrams:
            deliver(data, ancdata, flags, address)

    fd = sock.fileno()
    loop = asyncio.get_running_loop()
    loop.remove_reader(fd)  # aiocoap's one-datagram reader; transport.close() removes ours
    loop.add_reader(fd, drain)
