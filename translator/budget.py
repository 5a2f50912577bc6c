"""The open-files limit, raised at start, and the number of WebSocket clients it allows.

Every WebSocket client costs the process one file descriptor, and so does everything else it
opens: the CoAP socket, a DTLS peer's socket, the listening sockets, the event loop's own, a
DNS lookup's socket, a file being read. A shell's soft limit is often 1024 while the hard limit
is far higher, so the gateway first raises its soft limit to the hard one, as Go's runtime and
most servers do (:func:`raise_open_files_limit`).

Then it knows its *budget* (:func:`client_budget`): the limit minus a reserve for everything
that is not a client, namely

- what is open once the gateway has started (counted in ``/proc/self/fd``: standard streams,
  the event loop's selector and self-pipe, the listening and CoAP sockets; 11 with one
  listening socket, measured by tests/test_budget.py),
- a socket per DNS lookup that can run at once (`LOOKUP_SOCKETS` per worker thread of the
  event loop's default executor, where ``getaddrinfo`` runs),
- one socket per DTLS peer (`DTLS_PEERS` for peers that clients name, plus the configured
  ``coaps://`` sensors) and a lock file per OSCORE context,
- `HANDSHAKE_HEADROOM`: connections accepted and not yet counted (their handshake is under
  way) or refused and still closing: a refusal is an HTTP 503 on an accepted connection,
  so it costs a descriptor for as long as it takes to send it,
- `SAFETY_MARGIN` for what libraries open on their own (a TLS file, a ``/proc`` read of the
  metrics' process collector, a log file).

The gateway enforces the lower of ``[limits] max_connections`` and the budget, and says at
start which it is, with the command that raises the limit when the budget is the lower.
"""

from __future__ import annotations

import contextlib
import os
import resource
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DTLS_PEERS",
    "HANDSHAKE_HEADROOM",
    "LOOKUP_SOCKETS",
    "SAFETY_MARGIN",
    "Budget",
    "OpenFilesLimit",
    "client_budget",
    "open_descriptors",
    "raise_open_files_limit",
]

LOOKUP_SOCKETS: Final = 2
"""Sockets one ``getaddrinfo`` may hold at once (glibc asks for A and AAAA in parallel)."""
DTLS_PEERS: Final = 16
"""DTLS peers (each a UDP socket of its own in aiocoap) allowed for besides the configured
sensors: ``coaps://`` URIs that clients name."""
HANDSHAKE_HEADROOM: Final = 32
"""Connections, at least, accepted beyond the budget: handshakes under way and 503 answers
being sent (2 % of the limit when that is more)."""
SAFETY_MARGIN: Final = 16
"""Descriptors that libraries may open on their own at any time."""
SYSTEMD_HINT: Final = "`ulimit -n` in the shell, `LimitNOFILE=` in a systemd unit"
"""How the limit is raised, named wherever it is too low."""


@dataclass(frozen=True, slots=True)
class OpenFilesLimit:
    """``RLIMIT_NOFILE`` before and after :func:`raise_open_files_limit`."""

    before: int
    """The soft limit the process started with."""
    soft: int
    """The soft limit now: what the process may open."""
    hard: int
    """The ceiling of the soft limit (only a privileged process may raise it)."""

    def describe(self) -> str:
        if self.soft > self.before:
            return f"limit {self.soft} (raised from {self.before}, the hard limit)"
        if self.soft < self.hard:
            return f"limit {self.soft} (hard limit {self.hard}: could not raise it)"
        return f"limit {self.soft} (the hard limit)"


@dataclass(frozen=True, slots=True)
class Budget:
    """How many clients the gateway admits, and why."""

    limit: int
    """The soft open-files limit."""
    reserve: int
    """Descriptors kept for everything but clients."""
    max_connections: int
    """``[limits] max_connections``."""
    headroom: int = HANDSHAKE_HEADROOM
    """The part of the reserve for connections being opened or refused."""

    @property
    def allowed(self) -> int:
        """Clients the limit allows (at least 1: a gateway that admits none is useless, and
        accepting would fail instead, which the listener survives)."""
        return max(1, self.limit - self.reserve)

    @property
    def clients(self) -> int:
        """What is enforced: the lower of the two."""
        return min(self.max_connections, self.allowed)

    @property
    def sockets(self) -> int:
        """TCP connections the listener may hold at once: the clients the limit allows,
        plus those being opened or refused. Past it, accepting pauses."""
        return self.allowed + self.headroom

    @property
    def limited_by_files(self) -> bool:
        return self.allowed < self.max_connections

    def describe(self) -> str:
        """The start-up line: both numbers, and what to do when the limit is the lower."""
        if not self.limited_by_files:
            return (f"at most {self.clients} ([limits] max_connections; the "
                    f"open-files limit {self.limit} allows {self.allowed}, {self.reserve} "
                    "kept for sockets and files)")
        wanted = self.max_connections + self.reserve
        return (f"at most {self.clients}, not [limits] max_connections = "
                f"{self.max_connections}: the open-files limit {self.limit} allows "
                f"{self.allowed} ({self.reserve} kept for sockets and files); raise it to "
                f"{wanted} for {self.max_connections} clients ({SYSTEMD_HINT})")


def raise_open_files_limit() -> OpenFilesLimit:
    """Raise the soft open-files limit to the hard one (an unlimited hard limit: to the
    kernel's ``fs.nr_open``), and say what it is now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else _nr_open()
    if target != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < target:
        # On failure the limit stays; describe() says it could not be raised.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    now, hard_now = resource.getrlimit(resource.RLIMIT_NOFILE)
    return OpenFilesLimit(before=_finite(soft), soft=_finite(now), hard=_finite(hard_now))


def client_budget(
    limit: int,
    max_connections: int,
    *,
    open_now: int,
    lookup_workers: int,
    dtls_sensors: int = 0,
    oscore_contexts: int = 0,
    dtls_possible: bool = False,
) -> Budget:
    """The budget for a process whose soft limit is `limit` and which has `open_now`
    descriptors open once started (see the module docstring for the rest)."""
    headroom = max(HANDSHAKE_HEADROOM, limit // 50)
    reserve = (
        open_now
        + lookup_workers * LOOKUP_SOCKETS
        + dtls_sensors
        + (DTLS_PEERS if dtls_possible else 0)
        + oscore_contexts
        + headroom
        + SAFETY_MARGIN
    )
    return Budget(limit=limit, reserve=reserve, max_connections=max_connections,
                  headroom=headroom)


def open_descriptors() -> int | None:
    """Descriptors the process has open now (None where ``/proc`` does not tell)."""
    for directory in ("/proc/self/fd", "/dev/fd"):
        try:
            # listdir itself opens one, listed too.
            return len(os.listdir(directory)) - 1
        except OSError:
            continue
    return None


def default_lookup_workers() -> int:
    """Threads of asyncio's default executor (where ``getaddrinfo`` runs): Python's default
    for ``ThreadPoolExecutor``."""
    return min(32, (os.cpu_count() or 1) + 4)


def _nr_open() -> int:
    try:
        with open("/proc/sys/fs/nr_open", encoding="ascii") as file:
            return int(file.read())
    except (OSError, ValueError):
        return resource.RLIM_INFINITY


def _finite(value: int) -> int:
    """An unlimited limit as a (very large) number."""
    return value if value != resource.RLIM_INFINITY else 2**31 - 1
