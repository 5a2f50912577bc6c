"""The CoAP socket's kernel receive buffer: its size, and the datagrams it dropped.

Datagrams wait in the socket's receive buffer while the gateway is busy (a fan-out to
thousands of clients takes milliseconds); when it is full the kernel drops what arrives and
counts it (the ``drops`` column of ``/proc/net/udp``). `size_receive_buffer` asks for the
configured size (``[coap] receive_buffer``) and returns what the kernel granted: Linux
doubles the value asked for (its bookkeeping) and caps it at ``net.core.rmem_max`` unless
the process may force it (``SO_RCVBUFFORCE``, CAP_NET_ADMIN). `DropWatch` reads the drop
counter at most once a second, so that the batch reader can say, through the log limiter,
that datagrams were lost and how many.
"""

from __future__ import annotations

import contextlib
import os
import socket
from typing import Final

__all__ = ["CHECK_EVERY", "DropWatch", "kernel_drops", "size_receive_buffer"]

CHECK_EVERY: Final = 1.0
"""Seconds between two reads of the drop counter (a read of /proc/net/udp costs some
microseconds per socket of the machine)."""
SO_RCVBUFFORCE: Final = getattr(socket, "SO_RCVBUFFORCE", 33)
_TABLES: Final = ("/proc/net/udp", "/proc/net/udp6")


def size_receive_buffer(sock: socket.socket, requested: int) -> int:
    """Ask for a receive buffer of `requested` bytes (0: keep the kernel's); the size the
    kernel granted (as it reports it: twice what it takes for data)."""
    if requested:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, requested)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < requested:
            # Past net.core.rmem_max: allowed with CAP_NET_ADMIN only.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, requested)
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def rmem_max() -> int | None:
    """``net.core.rmem_max``: the most an unprivileged process gets (None: unknown)."""
    try:
        with open("/proc/sys/net/core/rmem_max", encoding="ascii") as file:
            return int(file.read())
    except (OSError, ValueError):
        return None


def kernel_drops(sock: socket.socket) -> int | None:
    """Datagrams the kernel dropped at `sock` since it was opened (None: unknown)."""
    try:
        inode = str(os.fstat(sock.fileno()).st_ino)
    except OSError:
        return None
    for table in _TABLES:
        try:
            with open(table, encoding="ascii") as file:
                lines = file.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops
            if len(fields) >= 13 and fields[9] == inode:
                return int(fields[12])
    return None


class DropWatch:
    """The drops of one socket since the last look, looked at most every `CHECK_EVERY`."""

    __slots__ = ("checked_at", "seen", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.seen = kernel_drops(sock)
        self.checked_at = float("-inf")

    def new_drops(self, now: float) -> int:
        """Datagrams dropped since the previous call that looked (0 if it is too soon)."""
        if self.seen is None or now - self.checked_at < CHECK_EVERY:
            return 0
        self.checked_at = now
        drops = kernel_drops(self.sock)
        if drops is None:
            return 0
        new, self.seen = drops - self.seen, drops
        return max(0, new)
