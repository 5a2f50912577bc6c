"""Counting limits for clients: a token bucket per connection and the connection limiter.

This module owns the arithmetic of ``[limits] rate``/``burst`` (each frame takes its cost in
tokens from its connection's bucket; an empty bucket is answered ``rate_limited``) and of
``max_connections``/``max_connections_per_ip`` (checked at the handshake; a refusal is
HTTP 503). It is pure: no I/O, no asyncio, no threads. Time comes from an injectable clock
(``time.monotonic`` by default), so tests drive it by hand.

Client addresses are grouped before counting: an IPv4-mapped IPv6 address counts as its
IPv4 address, and an IPv6 address counts as its /64 network by default, since one IPv6
host usually holds a whole /64 and could otherwise open ``max_connections_per_ip``
connections from each of its 2**64 addresses.
"""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable

__all__ = ["ConnectionLimiter", "TokenBucket", "client_key"]

Clock = Callable[[], float]
_EPSILON = 1e-9


class TokenBucket:
    """A token bucket: ``burst`` tokens at most, refilled at ``rate`` tokens per second.

    It starts full, so a connection may send ``burst`` requests at once and then ``rate``
    per second on average. ``rate = 0`` means no limit (every :meth:`take` succeeds).
    """

    __slots__ = ("_clock", "_stamp", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: int, clock: Clock = time.monotonic) -> None:
        if isinstance(rate, bool) or not isinstance(rate, int | float):
            raise TypeError("rate must be a number")
        if not math.isfinite(rate) or rate < 0:
            raise ValueError(f"rate must be a finite number >= 0, got {rate!r}")
        if isinstance(burst, bool) or not isinstance(burst, int):
            raise TypeError("burst must be an integer")
        if burst < 1:
            raise ValueError(f"burst must be at least 1, got {burst!r}")
        self.rate = float(rate)
        self.burst = burst
        self._clock = clock
        self._tokens = float(burst)
        self._stamp = clock()

    @property
    def unlimited(self) -> bool:
        return self.rate == 0

    def _refill(self) -> None:
        now = self._clock()
        # A clock that steps back (it should not: use a monotonic one) adds nothing.
        elapsed = max(0.0, now - self._stamp)
        self._stamp = now
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)

    def take(self, tokens: float = 1) -> bool:
        """Take ``tokens`` if the bucket holds them; False (taking nothing) if not."""
        if tokens < 0:
            raise ValueError("cannot take a negative number of tokens")
        if self.unlimited:
            return True
        self._refill()
        # The tolerance absorbs float rounding in the refill (0.05 s + 0.05 s at 10/s is
        # 0.9999999999 tokens), which must not cost a client its request.
        if self._tokens + _EPSILON >= tokens:
            self._tokens = max(0.0, self._tokens - tokens)
            return True
        return False

    @property
    def available(self) -> float:
        """Tokens in the bucket now (``inf`` when unlimited)."""
        if self.unlimited:
            return math.inf
        self._refill()
        return self._tokens

    def retry_after(self, tokens: int = 1) -> float:
        """Seconds until :meth:`take` of ``tokens`` can succeed (0 if it can now).

        ``inf`` when ``tokens`` exceeds ``burst``: the bucket never holds that many.
        """
        if self.unlimited:
            return 0.0
        if tokens > self.burst:
            return math.inf
        missing = tokens - self.available
        return 0.0 if missing <= _EPSILON else missing / self.rate


def client_key(ip: str, ipv6_prefix: int = 64) -> str:
    """The key a client address is counted under (see the module docstring).

    Anything that is not an IP address (a Unix socket peer, say) is its own key.
    """
    host = ip.strip()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        network = ipaddress.IPv6Network((int(address), ipv6_prefix), strict=False)
        return str(network) if ipv6_prefix < 128 else str(network.network_address)
    return str(address)


class ConnectionLimiter:
    """Open connections in all and per client address, against two maxima.

    Call :meth:`try_acquire` at the handshake and, only when it returned None,
    :meth:`release` exactly once when that connection ends.
    """

    __slots__ = ("_by_key", "_total", "ipv6_prefix", "max_per_ip", "max_total")

    def __init__(self, max_total: int, max_per_ip: int, *, ipv6_prefix: int = 64) -> None:
        for name, value in (("max_total", max_total), ("max_per_ip", max_per_ip)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an integer")
            if value < 1:
                raise ValueError(f"{name} must be at least 1, got {value!r}")
        if not 0 <= ipv6_prefix <= 128:
            raise ValueError("ipv6_prefix must be in 0..128")
        self.max_total = max_total
        self.max_per_ip = max_per_ip
        self.ipv6_prefix = ipv6_prefix
        self._total = 0
        self._by_key: dict[str, int] = {}

    @property
    def total(self) -> int:
        """Connections currently counted."""
        return self._total

    def count(self, ip: str) -> int:
        """Connections currently counted for ``ip``'s key (its /64 for IPv6)."""
        return self._by_key.get(client_key(ip, self.ipv6_prefix), 0)

    def try_acquire(self, ip: str) -> str | None:
        """Count a new connection from ``ip``; None if admitted, else why not (for a 503)."""
        if self._total >= self.max_total:
            return f"too many connections (limit {self.max_total})"
        key = client_key(ip, self.ipv6_prefix)
        current = self._by_key.get(key, 0)
        if current >= self.max_per_ip:
            return f"too many connections from this address (limit {self.max_per_ip})"
        self._by_key[key] = current + 1
        self._total += 1
        return None

    def release(self, ip: str) -> None:
        """Forget one admitted connection from ``ip``.

        Raises ValueError when no connection from ``ip`` is counted (a release without an
        admitted :meth:`try_acquire`, or a second release): the counts would go wrong.
        """
        key = client_key(ip, self.ipv6_prefix)
        current = self._by_key.get(key, 0)
        if current <= 0:
            raise ValueError(f"release({ip!r}) without a matching admitted try_acquire")
        if current == 1:
            del self._by_key[key]  # keeps memory bounded by the open connections
        else:
            self._by_key[key] = current - 1
        self._total -= 1
