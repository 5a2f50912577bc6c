"""The decisions of a supervised upstream observation, without I/O: which phase it is in, how
long to wait before registering again, when its value is stale, which notification is newer.

translator/coap/observations.py carries them out with aiocoap; here they are plain code,
clocked and randomized by the caller. One observation goes through these phases, by the rule
at the top of `TRANSITIONS`::

    registering ──observable──▶ following ──ended──▶ waiting ──elapsed──▶ registering
         │       ─not observable─▶ polling ──ended──▶    ▲
         ├──────────────failed / client error────────────┘  (following and polling end with a
         │                                                    client error too)

How long `waiting` lasts (`Supervisor.on`):

- after an observation or polling that the sensor had accepted and that ended (by the
  sensor, by silence, by an error or a 5.xx): `backoff_min`, shortened by the jitter: the
  sensor was reachable a moment ago;
- after a registration that failed (no answer, RST, ICMP, a 5.xx): `backoff_min` doubling per
  attempt up to `backoff_max`;
- after a client error (4.xx, to a registration, as a notification or to a poll): the
  resource is gone, or the gateway may not read it; asking again at the network pace would
  only repeat the answer. `client_error_backoff` (60 s) doubling per such answer up to
  `CLIENT_ERROR_BACKOFF_MAX` (1 h), until a 2.xx answer.

Every delay is shortened by up to `JITTER` at random, so that observations failing together
do not register again in lockstep.

Freshness (`Freshness`): a notification is late once Max-Age plus the grace has passed
without another one; then its value is reported stale and the observation is renewed. The
grace is ``[supervision] grace`` when set, else 10 % of Max-Age within [2 s, 10 s]: a sensor
that notifies at its Max-Age (libcoap's ``/time``: every second, Max-Age 1) is late by the
network's jitter every few notifications, and a grace of 10 % (0.1 s) made it flap between
``stale`` and ``online``. Californium allows 2 s the same way.
"""

from __future__ import annotations

from typing import Final, Literal

from translator.core.hub import DEFAULT_MAX_AGE

__all__ = [
    "CLIENT_ERROR_BACKOFF_MAX",
    "DEFAULT_MAX_AGE",
    "MAX_GRACE",
    "MIN_GRACE",
    "OBSERVATION_RESET_TIME",
    "OBSERVE_MODULUS",
    "OBSERVE_WINDOW",
    "TRANSITIONS",
    "Freshness",
    "ObserveOrder",
    "Supervisor",
    "backoff_delay",
    "default_grace",
    "observe_is_newer",
    "poll_interval",
]

MIN_GRACE: Final = 2.0
MAX_GRACE: Final = 10.0
"""The default grace is `GRACE_SHARE` of Max-Age, within [MIN_GRACE, MAX_GRACE]."""
GRACE_SHARE: Final = 0.1
JITTER: Final = 0.2
"""A backoff delay is shortened by a random share of up to this much."""
CLIENT_ERROR_BACKOFF_MAX: Final = 3600.0
"""The longest wait after client errors (unless ``client_error_backoff`` is longer)."""

OBSERVE_MODULUS: Final = 1 << 24
"""Observe option values are 24-bit sequence numbers (RFC 7641 §3.4)."""
OBSERVE_WINDOW: Final = 1 << 23
OBSERVATION_RESET_TIME: Final = 128.0
"""RFC 7641 §3.4: a notification this many seconds after the newest one is newer, whatever
its sequence number says."""


# ---------------------------------------------------------------------------------------------
# Phases and waits
# ---------------------------------------------------------------------------------------------

Phase = Literal["registering", "following", "polling", "waiting"]
Event = Literal["observable", "not observable", "failed", "client error", "ended", "elapsed"]

# The rule: a registration leads to following, polling or waiting; whatever ends following
# or polling leads to waiting; waiting leads to the next registration. A missing pair is a
# bug in the caller (ValueError).
#
#   (phase,         event)            -> phase
TRANSITIONS: Final[dict[tuple[Phase, Event], Phase]] = {
    ("registering", "observable"): "following",
    ("registering", "not observable"): "polling",
    ("registering", "failed"): "waiting",
    ("registering", "client error"): "waiting",
    ("following", "ended"): "waiting",
    ("following", "client error"): "waiting",
    ("polling", "ended"): "waiting",
    ("polling", "client error"): "waiting",
    ("waiting", "elapsed"): "registering",
}


def backoff_delay(attempt: int, minimum: float, maximum: float, jitter: float) -> float:
    """Seconds to wait before registration attempt `attempt` (0 = the first retry).

    `minimum` doubling per attempt, capped at `maximum`, then shortened by `jitter` (a number
    in [0, 1), usually random) times `JITTER`: attempt 0 waits between 0.8 and 1 times
    `minimum`, and no wait is ever longer than `maximum`.
    """
    base = min(maximum, minimum * 2.0 ** min(attempt, 64))
    return base * (1.0 - JITTER * min(max(jitter, 0.0), 1.0))


class Supervisor:
    """The phase of one supervised observation and the backoff counters (module docstring)."""

    __slots__ = ("backoff_max", "backoff_min", "client_error_backoff", "client_errors",
                 "failures", "phase")

    def __init__(
        self, backoff_min: float, backoff_max: float, client_error_backoff: float
    ) -> None:
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.client_error_backoff = client_error_backoff
        self.phase: Phase = "registering"
        self.failures = 0
        """Registrations failed in a row since the sensor last accepted one."""
        self.client_errors = 0
        """Client errors since the last 2.xx answer."""

    def on(self, event: Event, jitter: float = 0.0) -> float | None:
        """Take `event` in the current phase; the seconds to wait when the new phase is
        ``waiting`` (`jitter` in [0, 1) shortens it), else None."""
        before = self.phase
        after = TRANSITIONS.get((before, event))
        if after is None:
            raise ValueError(f"no transition from {before!r} on {event!r}")
        self.phase = after
        if event in ("observable", "not observable"):
            self.failures = self.client_errors = 0
        if after != "waiting":
            return None
        if event == "client error":
            self.client_errors += 1
            return backoff_delay(
                self.client_errors - 1,
                self.client_error_backoff,
                max(self.client_error_backoff, CLIENT_ERROR_BACKOFF_MAX),
                jitter,
            )
        if event == "failed":
            self.failures += 1
            return backoff_delay(self.failures - 1, self.backoff_min, self.backoff_max, jitter)
        return backoff_delay(0, self.backoff_min, self.backoff_max, jitter)  # ended


def poll_interval(max_age: int | None, poll_min: float) -> float:
    """A resource without Observe is polled at the larger of its Max-Age and `poll_min`."""
    return max(float(DEFAULT_MAX_AGE if max_age is None else max_age), poll_min)


# ---------------------------------------------------------------------------------------------
# Notifications: order and freshness
# ---------------------------------------------------------------------------------------------


def observe_is_newer(v1: int, v2: int) -> bool:
    """RFC 7641 §3.4: is sequence number `v2` newer than `v1` (24-bit, 2^23 window)?"""
    v1, v2 = v1 % OBSERVE_MODULUS, v2 % OBSERVE_MODULUS
    return (v1 < v2 and v2 - v1 < OBSERVE_WINDOW) or (v1 > v2 and v1 - v2 > OBSERVE_WINDOW)


class ObserveOrder:
    """Which notifications of one registration may be forwarded (RFC 7641 §3.4).

    A notification is forwarded when it is newer than the newest one forwarded so far: its
    sequence number is ahead within the 2^23 window, or more than 128 s have passed since
    (the sensor may have restarted its numbering). Anything else arrived late and is dropped.
    A fresh registration starts with a fresh `ObserveOrder` (or `reset()`): its numbering has
    nothing to do with the previous one's. `now` is any monotonic clock in seconds.
    """

    __slots__ = ("_at", "_newest")

    def __init__(self) -> None:
        self._newest: int | None = None
        self._at = 0.0

    def reset(self) -> None:
        self._newest = None

    def accept(self, observe: int, now: float) -> bool:
        """True (and remember it as the newest) when `observe` may be forwarded."""
        if (
            self._newest is None
            or observe_is_newer(self._newest, observe)
            or now > self._at + OBSERVATION_RESET_TIME
        ):
            self._newest, self._at = observe % OBSERVE_MODULUS, now
            return True
        return False


def default_grace(max_age: float) -> float:
    """10 % of Max-Age, within [2 s, 10 s] (module docstring)."""
    return min(MAX_GRACE, max(MIN_GRACE, GRACE_SHARE * max_age))


Verdict = Literal["fresh", "stale", "silent"]


class Freshness:
    """When the last notification of an observation is late.

    `heard()` records a notification (its time and Max-Age); `check(now)` says:

    - ``fresh`` until Max-Age plus the grace has passed since;
    - then ``stale``, once: the value is old and the clients are told;
    - then ``silent``: time to register again (at once, unless the check runs early).

    A Max-Age of 0 ("do not cache") promises nothing about when the next notification comes:
    it is never reported stale, and silence is judged by the 60 s default instead.
    """

    __slots__ = ("grace", "heard_at", "max_age", "stale")

    def __init__(self, grace: float | None = None) -> None:
        self.grace = grace
        """``[supervision] grace``; None: `default_grace` of the Max-Age."""
        self.heard_at = 0.0
        self.max_age = DEFAULT_MAX_AGE
        self.stale = False

    def heard(self, now: float, max_age: int | None) -> None:
        self.heard_at = now
        self.max_age = DEFAULT_MAX_AGE if max_age is None else max_age
        self.stale = False

    @property
    def horizon(self) -> int:
        """The Max-Age that silence is judged by (the default for a Max-Age of 0)."""
        return self.max_age if self.max_age > 0 else DEFAULT_MAX_AGE

    @property
    def allowed(self) -> float:
        """The grace for the current Max-Age."""
        return default_grace(self.horizon) if self.grace is None else self.grace

    @property
    def late_at(self) -> float:
        """When the next notification is late: stale, then silent."""
        return self.heard_at + self.horizon + self.allowed

    def check(self, now: float) -> Verdict:
        if now < self.late_at:
            return "fresh"
        # Stale comes first: a client always hears that its value went stale before the
        # observation is renewed.
        if not self.stale and self.max_age > 0:
            self.stale = True
            return "stale"
        return "silent"

    def reason(self) -> str:
        """Why the value is stale, for clients."""
        return (f"no notification within Max-Age ({self.max_age} s) "
                f"and {self.allowed:g} s of grace")
