"""Batched reads on aiocoap's UDP sockets, so a busy gateway catches up instead of lagging.

aiocoap's UDP transport reads one datagram each time the event loop finds its socket
readable, and the loop interleaves that with everything else it has to do, such as writing
one update to a thousand WebSocket clients. When a sensor offers more updates than the
gateway can deliver, the difference queues in the kernel's receive buffer and every update
then reaches clients seconds late (and the buffer's tail drops the newest ones).

This module makes each readiness event drain up to `BATCH` datagrams. aiocoap's observation
iterator keeps only the newest notification it has not handed out yet, so a burst read in one
go reaches the hub as one update per resource: while the gateway is behind it forwards just
the newest value (clients see a jump in `seq`), and as soon as it has caught up every
notification is forwarded again. It also gives the socket a larger receive buffer, so that a
burst (hundreds of registrations answered at once, say) is not dropped by the kernel.

It reaches into aiocoap's private transport (pinned to 0.4.x in pyproject.toml); anything
unexpected leaves aiocoap's own behaviour in place, with a log line.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Any, Final

log = logging.getLogger(__name__)

BATCH: Final = 256
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


def _drain_on_readable(protocol: Any, transport: Any, sock: socket.socket, batch: int) -> None:
    received = 0
    deliver = protocol.datagram_msg_received

    def counting(data: bytes, ancdata: Any, flags: int, address: Any) -> None:
        nonlocal received
        received += 1
        deliver(data, ancdata, flags, address)

    # An instance attribute shadows the method: the transport calls it through the protocol.
    protocol.datagram_msg_received = counting
    read_one = transport._read_ready

    def drain() -> None:
        for _ in range(batch):
            before = received
            read_one()  # reads at most one datagram; swallows "nothing to read"
            if received == before:
                return

    fd = sock.fileno()
    loop = asyncio.get_running_loop()
    loop.remove_reader(fd)  # aiocoap's one-datagram reader; transport.close() removes ours
    loop.add_reader(fd, drain)
