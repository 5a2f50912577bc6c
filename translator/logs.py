"""One rate limiter for repeated log lines, so that whoever can make the gateway log cannot
make it log without bound.

Two doors lead to it. A line that the code knows can repeat at someone else's will goes
through :class:`LimitedLog` under a *kind* (below). Every other record that reaches the
process's log handler (the gateway's own lines, asyncio's, websockets', aiocoap's) goes
through :class:`RepeatFilter`, installed on that handler by :func:`limit_every_record`,
which limits by logger and message template in the same way: a line repeated a thousand
times a second costs a few lines and one summary per interval, whoever wrote it. asyncio's
own exception handler (``socket.accept() out of system resource``, with a traceback per
failed accept) is routed through it too (:func:`limit_loop_exceptions`).

A line that anyone outside can trigger at will (a datagram from an unknown address, a frame
that does not parse) is logged through :class:`LimitedLog` under a *kind*, a short name for
what happened (``"coap.unmatched"``). Per kind and per interval the first `first`
occurrences are written in full; the rest are counted, and when the interval has passed one
summary line says how many there were::

    unmatched datagram from 127.0.0.2:5683 (token 0102): dropped
    ... (2 more lines in full)
    coap.unmatched: ...and 5996 more in the last 10 s (6000 in all)

The decisions are :class:`RepeatLimiter`'s, pure and clocked by the caller (tests inject the
time); :class:`LimitedLog` writes them to a :class:`logging.Logger` and, inside an event
loop, arms one timer so that the summary comes out when the interval ends even if nothing
more happens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = [
    "FIRST",
    "INTERVAL",
    "JsonFormatter",
    "LimitedLog",
    "RepeatFilter",
    "RepeatLimiter",
    "Summary",
    "limit_every_record",
    "limit_loop_exceptions",
]

FIRST: Final = 3
"""Occurrences of one kind written in full per interval."""
INTERVAL: Final = 10.0
"""Seconds of one interval. At most `FIRST` lines and one summary per kind per interval: a
flood of one kind costs at most 0.4 lines a second, and a summary comes 10 s after the flood
began, soon enough to be read next to what caused it (60 s hid the end of a short burst
behind a minute's wait)."""
MAX_KINDS: Final = 4096
"""Kinds a limiter keeps counts of; past it the idle ones are forgotten."""
LIMITED: Final = "_limited"
"""The attribute of a record that already went through a limiter (`LimitedLog`'s lines and
summaries): `RepeatFilter` lets it pass, so it is not counted twice. (A leading underscore:
`JsonFormatter` writes no such field.)"""


@dataclass(frozen=True, slots=True)
class Summary:
    """The occurrences of `kind` that were counted, not written, in one interval."""

    kind: str
    suppressed: int
    seconds: float
    total: int
    """Every occurrence of the kind so far, written or not."""

    def text(self) -> str:
        return (f"{self.kind}: ...and {self.suppressed} more in the last {self.seconds:g} s "
                f"({self.total} in all)")


class _Window:
    __slots__ = ("seen", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.seen = 0


class RepeatLimiter:
    """Which occurrences of each kind to write, and the summaries of the others.

    An interval starts at the first occurrence of a kind; within it `first` occurrences are
    admitted and the rest counted. An interval that ends with some counted yields a
    :class:`Summary` (from :meth:`summaries`); one that ends without is just forgotten, so
    an idle kind costs nothing. `now` is any monotonic clock in seconds.
    """

    def __init__(self, first: int = FIRST, interval: float = INTERVAL) -> None:
        if first < 0 or interval <= 0:
            raise ValueError("first must be >= 0 and interval > 0")
        self.first = first
        self.interval = interval
        self._windows: dict[str, _Window] = {}
        self.totals: dict[str, int] = {}
        """Every occurrence of each kind ever reported, written or not (for at most
        `MAX_KINDS` kinds: past that, idle kinds are forgotten)."""

    def hit(self, kind: str, now: float) -> bool:
        """One occurrence of `kind`: True when it is to be written in full.

        An occurrence after its kind's interval ended while a summary of it is still due
        (not yet collected by :meth:`summaries`) is counted into that summary."""
        if kind not in self.totals and len(self.totals) >= MAX_KINDS:
            self._forget_idle(now)
        self.totals[kind] = self.totals.get(kind, 0) + 1
        window = self._windows.get(kind)
        if window is None or (now >= window.started + self.interval and window.seen <= self.first):
            window = self._windows[kind] = _Window(now)
        window.seen += 1
        return window.seen <= self.first

    def _forget_idle(self, now: float) -> None:
        """Forget the kinds with no summary due (their totals too), so that kinds made of
        varying text (a message formatted before it was logged) cannot grow memory."""
        for kind in list(self.totals):
            window = self._windows.get(kind)
            if window is None or (window.seen <= self.first
                                  and now >= window.started + self.interval):
                self._windows.pop(kind, None)
                del self.totals[kind]

    def summaries(self, now: float, *, ending: bool = False) -> list[Summary]:
        """The summaries of every interval that has ended by `now` (`ending`: of every
        interval, ended or not); those intervals are closed (a kind's next occurrence
        starts a new one)."""
        due: list[Summary] = []
        for kind, window in list(self._windows.items()):
            if now < window.started + self.interval and not ending:
                continue
            del self._windows[kind]
            if window.seen > self.first:
                due.append(Summary(kind, window.seen - self.first,
                                   round(now - window.started, 1), self.totals[kind]))
        return due

    def next_due(self) -> float | None:
        """When the earliest interval with something counted ends (None: nothing pending)."""
        ends = [w.started + self.interval for w in self._windows.values() if w.seen > self.first]
        return min(ends, default=None)

    def count(self, kind: str) -> int:
        return self.totals.get(kind, 0)


class LimitedLog:
    """A :class:`logging.Logger` whose lines of each kind go through a :class:`RepeatLimiter`.

    ``log.write("coap.unmatched", logging.INFO, "unmatched datagram from %s", address)``
    writes the line or counts it. Summaries come out at the next write, at :meth:`flush`,
    or (inside a running event loop) from a timer at the end of the interval.
    """

    def __init__(
        self,
        logger: logging.Logger,
        limiter: RepeatLimiter | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        summary_level: int = logging.WARNING,
    ) -> None:
        self.logger = logger
        self.limiter = limiter or RepeatLimiter()
        self.clock = clock
        self.summary_level = summary_level
        self._timer: asyncio.TimerHandle | None = None

    def write(self, kind: str, level: int, message: str, *args: Any) -> bool:
        """Write (True) or count (False) one occurrence of `kind`. Never a traceback: pass
        the exception's text as an argument instead."""
        written = self.admit(kind)
        if written:
            self.logger.log(level, message, *args, extra={LIMITED: kind})
        return written

    def admit(self, kind: str) -> bool:
        """One occurrence of `kind`: True when it is to be written in full (by the caller);
        the summaries that are due are written first."""
        now = self.clock()
        due = self.limiter.next_due()
        if due is not None and now >= due:
            self.flush()
        written = self.limiter.hit(kind, now)
        if not written and self._timer is None:
            self._arm()
        return written

    def count(self, kind: str) -> int:
        """How many occurrences of `kind` were reported, written or not."""
        return self.limiter.count(kind)

    def flush(self) -> None:
        """Write the summaries of the intervals that have ended."""
        for summary in self.limiter.summaries(self.clock()):
            self.logger.log(self.summary_level, "%s", summary.text(),
                            extra={LIMITED: summary.kind})

    def _arm(self) -> None:
        due = self.limiter.next_due()
        if due is None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # outside a loop: summaries come out at flush()
        delay = max(0.0, due - self.clock())
        self._timer = loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()
        self._arm()

    def close(self) -> None:
        """Cancel the summary timer and write every summary, due or not (the end)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for summary in self.limiter.summaries(self.clock(), ending=True):
            self.logger.log(self.summary_level, "%s", summary.text(),
                            extra={LIMITED: summary.kind})


class RepeatFilter(logging.Filter):
    """A handler's filter: each record of level INFO and above goes through one
    :class:`LimitedLog`, its kind being its logger and its message template (so
    ``"%r: keepalive ping failed"`` is one kind, whatever the connection). DEBUG records
    pass: debug logging is asked for, to see everything. Records that went through a
    limiter already (:data:`LIMITED`) pass too. Summaries are written to `handler`
    alone (the records they count went nowhere else), as the ``translator.logs`` logger."""

    def __init__(self, handler: logging.Handler, limiter: RepeatLimiter | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        summaries = logging.Logger(__name__)  # outside the hierarchy: this handler only
        summaries.addHandler(handler)
        summaries.propagate = False
        self.limited = LimitedLog(summaries, limiter, clock=clock)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO or hasattr(record, LIMITED):
            return True
        template = record.msg if isinstance(record.msg, str) else type(record.msg).__name__
        return self.limited.admit(f"{record.name}: {template[:120]}")

    def close(self) -> None:
        self.limited.close()


def limit_every_record(handler: logging.Handler) -> RepeatFilter:
    """Put every record that `handler` writes through one :class:`RepeatFilter`."""
    for existing in handler.filters:
        if isinstance(existing, RepeatFilter):
            return existing
    repeat_filter = RepeatFilter(handler)
    handler.addFilter(repeat_filter)
    return repeat_filter


def limit_loop_exceptions(
    loop: asyncio.AbstractEventLoop,
    explained: Mapping[str, Callable[[dict[str, Any]], str]] | None = None,
) -> LimitedLog:
    """Route what `loop` reports to its exception handler through a limiter, by message.

    asyncio reports there what no task catches: among others, every accept() that fails
    for want of descriptors, with a traceback (``socket.accept() out of system resource``,
    hundreds of thousands of them a minute at the open-files limit). Per message, the first
    reports are written as asyncio's default handler would (with their traceback), the
    rest are counted. A message in `explained` is said instead, once per interval and
    without a traceback, in the words its function returns for the report.
    """
    limiter = LimitedLog(logging.getLogger("asyncio"))
    explainer = LimitedLog(logging.getLogger("asyncio"), RepeatLimiter(first=1))

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        message = str(context.get("message") or "Unhandled exception in event loop")
        kind = message[:120]
        explain = (explained or {}).get(message)
        if explain is not None:
            if explainer.admit(kind):
                explainer.logger.warning("%s", explain(context), extra={LIMITED: kind})
            return
        if not limiter.admit(kind):
            return
        # What asyncio's default handler writes, marked as limited already.
        exception = context.get("exception")
        details = "; ".join(f"{key}: {value!r}" for key, value in context.items()
                            if key not in ("message", "exception"))
        limiter.logger.error(
            "%s%s", message, f" ({details})" if details else "",
            exc_info=(type(exception), exception, exception.__traceback__)
            if isinstance(exception, BaseException) else None,
            extra={LIMITED: kind},
        )

    loop.set_exception_handler(handle)
    return limiter


# The attributes every LogRecord has: whatever else a record carries came as `extra`.
_STANDARD_ATTRIBUTES: Final = frozenset(
    logging.LogRecord("", 0, "", 0, "", None, None).__dict__
) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per log line (``--log-format json``): ``ts``, ``level``,
    ``logger``, ``message``, the fields a call gave as ``extra`` (``conn``, ``remote``,
    ``uri``...), and ``exception`` with the traceback's text when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRIBUTES and not key.startswith("_"):
                line[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        return json.dumps(line, ensure_ascii=False)
