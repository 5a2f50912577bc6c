"""What every benchmark child process shares: its command channel, limits and histograms.

A child prints one ready line, then reads one JSON command per line on stdin and answers each
with one JSON line on stdout, in order. It exits on `{"cmd": "quit"}`, on end of input (the
harness is gone) and in any case after `max_seconds`, so that no child can outlive a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import resource
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]

BUCKETS_PER_E = 40
"""Latency histogram resolution: 40 buckets per factor e, i.e. 2.5 % wide."""
_FLOOR = 1e-6


def raise_nofile() -> int:
    """Raise this process's soft limit on open files to the hard limit; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def command_loop(handle: Handler, *, max_seconds: float) -> None:
    """Answer commands from stdin until quit, EOF or `max_seconds`."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    deadline = time.monotonic() + max_seconds
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            line = await asyncio.wait_for(reader.readline(), remaining)
        except TimeoutError:
            return
        if not line:
            return
        try:
            command = json.loads(line)
        except ValueError:
            emit({"ok": False, "error": f"not JSON: {line[:80]!r}"})
            continue
        if command.get("cmd") == "quit":
            emit({"ok": True})
            return
        try:
            reply = await handle(command)
        except Exception as exc:  # report, keep serving: the harness decides what to do
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        emit({"ok": True, **reply} if "ok" not in reply else reply)


class Histogram:
    """Log-bucketed latency histogram in seconds; mergeable across processes as JSON."""

    __slots__ = ("buckets", "count", "max", "total")

    def __init__(self) -> None:
        self.buckets: dict[int, int] = {}
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds
        index = int(math.log(seconds / _FLOOR) * BUCKETS_PER_E) if seconds > _FLOOR else 0
        self.buckets[index] = self.buckets.get(index, 0) + 1

    def to_json(self) -> dict[str, Any]:
        return {
            "buckets": sorted(self.buckets.items()),
            "count": self.count,
            "total": self.total,
            "max": self.max,
        }

    @classmethod
    def merged(cls, parts: Iterable[dict[str, Any]]) -> Histogram:
        histogram = cls()
        for part in parts:
            for index, count in part["buckets"]:
                histogram.buckets[int(index)] = histogram.buckets.get(int(index), 0) + count
            histogram.count += part["count"]
            histogram.total += part["total"]
            histogram.max = max(histogram.max, part["max"])
        return histogram

    def percentile(self, fraction: float) -> float | None:
        """The upper edge of the bucket holding the `fraction` quantile (seconds)."""
        if self.count == 0:
            return None
        rank = max(1, math.ceil(fraction * self.count))
        seen = 0
        for index in sorted(self.buckets):
            seen += self.buckets[index]
            if seen >= rank:
                return min(self.max, _FLOOR * math.exp((index + 1) / BUCKETS_PER_E))
        return self.max

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None
