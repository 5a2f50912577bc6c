"""The kernel's count of datagrams it dropped at the gateway's own UDP sockets.

A datagram that arrives while a socket's receive buffer is full is dropped by the kernel
before the gateway could see it: nothing the gateway counts itself can tell. Linux keeps the
count per socket and shows it in the last column (``drops``) of ``/proc/net/udp`` and
``/proc/net/udp6``, where the socket is named by its inode, the one ``fstat`` of its
descriptor gives. Reading those tables when the metrics are scraped costs the hot path
nothing (the alternative, the ``SO_RXQ_OVFL`` ancillary data, would have to be read with
every datagram, and aiocoap reads them).

On other systems there is no such table: the count is unknown (None), and the metric is
absent rather than a misleading 0.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable
from typing import Final

__all__ = ["PROC_UDP_TABLES", "kernel_drops"]

PROC_UDP_TABLES: Final = ("/proc/net/udp", "/proc/net/udp6")
_INODE: Final = 9
_DROPS: Final = 12
"""Columns of a row: sl, local_address, rem_address, st, tx_queue:rx_queue, tr:tm->when,
retrnsmt, uid, timeout, inode, ref, pointer, drops."""


def kernel_drops(
    sockets: Iterable[socket.socket], tables: Iterable[str] = PROC_UDP_TABLES
) -> int | None:
    """Datagrams the kernel dropped at `sockets` since each was opened, or None when
    unknown: no table to read (not Linux), or no socket open. A socket that no table lists
    has not been bound yet (aiocoap's client socket is bound by its first send): nothing
    can have reached it, so it counts 0."""
    inodes = set()
    for sock in sockets:
        fd = sock.fileno()
        if fd != -1:
            inodes.add(os.fstat(fd).st_ino)
    if not inodes:
        return None
    total, read = 0, False
    for path in tables:
        try:
            with open(path, "rb") as table:
                rows = table.read().splitlines()[1:]  # after the header line
        except OSError:
            continue
        read = True
        for row in rows:
            fields = row.split()
            if len(fields) > _DROPS and int(fields[_INODE]) in inodes:
                total += int(fields[_DROPS])
    return total if read else None
