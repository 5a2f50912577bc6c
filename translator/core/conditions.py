"""Conditional notifications per subscription: `pmin`, `pmax`, `gt`, `lt`, `st`, `band`, `edge`.

A client's `subscribe` may carry `"cond": {...}` with the parameters of
draft-ietf-core-conditional-attributes (without the `c.` prefix) and a `path`, an RFC 6901
JSON Pointer into the decoded `value` that selects the number or boolean they apply to. This
module owns the parameters' rules (`parse_condition`, whose `ConditionError` names the
parameter) and the state machine of one subscription (`Watch`). It is pure: no I/O, no
clock of its own; the hub feeds it the updates of the one upstream observation every client
shares and the time, and it answers whether to send, hold or drop, and when to wake it.

The rules, after the draft's text and its pseudocode appendix:

    event                    what the subscription does
    -----------------------  -------------------------------------------------------------
    subscribe                the current value at once (it becomes the last value sent)
    update that qualifies    sent when `pmin` has passed since the last frame sent; inside
                             the window it is held, replacing any held one, and sent when
                             the window ends (`wake_at`), also when updates stopped
    update that does not     dropped; for gt/lt/st/band it also clears a held one (the
                             newest value is what counts: the client's view is then within
                             the condition of it); a held edge stays (an edge is an event)
    update the condition     qualifies, and goes out marked with `error` (`cond_error` on
    cannot apply to          the wire): never withheld for being of the wrong kind
    nothing sent for `pmax`  the newest value: a repeat of the last frame (same seq)
                             when nothing newer came, else the newer one

An update qualifies (`qualifies`) when:
  * no value parameter is given (only pmin/pmax): always;
  * `gt` / `lt`: the value and the last value sent lie on different sides of the limit;
  * `st`: the value differs from the last value sent by `st` or more;
  * `band`: the value lies in the band that `gt`/`lt` make (gt alone: v <= gt; lt alone:
    v >= lt; gt <= lt: gt <= v <= lt; gt > lt: v > gt or v < lt), and, with `st`, also
    differs by `st` or more;
  * `edge`: the boolean differs from the previous update's and equals `edge` (True: rising,
    False: falling).
Several parameters: any one of them suffices (the draft: "whenever any of the parameter
conditions are met", one notification for all).
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, Literal, TypeVar

__all__ = [
    "PARAMETERS",
    "Condition",
    "ConditionError",
    "WakeQueue",
    "Watch",
    "parse_condition",
    "parse_pointer",
    "resolve_pointer",
]

PARAMETERS: Final = ("pmin", "pmax", "gt", "lt", "st", "band", "edge", "path")
"""What `cond` may hold: the draft's conditional parameters we implement, and `path`."""
MAX_PERIOD: Final = 86_400.0
"""The longest `pmin`/`pmax` accepted (a day): longer ones are surely a unit mistake."""
MAX_POINTER_TOKENS: Final = 32
MAX_POINTER_LENGTH: Final = 256


class ConditionError(ValueError):
    """A `cond` that cannot be accepted; `parameter` is the one at fault (`cond.pmin`...)."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(f"'{parameter}' {message}")
        self.parameter = parameter


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass(frozen=True, slots=True)
class Condition:
    """A subscription's conditions, validated."""

    pmin: float | None = None
    pmax: float | None = None
    gt: float | None = None
    lt: float | None = None
    st: float | None = None
    band: bool = False
    edge: bool | None = None
    path: str | None = None
    """The JSON Pointer as the client wrote it (None: the value itself)."""
    tokens: tuple[str, ...] = ()
    """`path` parsed into its reference tokens."""

    @property
    def numeric(self) -> bool:
        """Whether the conditions need a number (gt, lt, st or band)."""
        return self.gt is not None or self.lt is not None or self.st is not None or self.band

    @property
    def filters(self) -> bool:
        """Whether any value parameter is given (else every update qualifies)."""
        return self.numeric or self.edge is not None

    def to_json(self) -> dict[str, Any]:
        """The condition as the client could send it back (for the CLI and logs)."""
        out: dict[str, Any] = {}
        for name in PARAMETERS:
            value = getattr(self, name)
            if value is not None and value is not False:
                out[name] = value
        return out


def parse_pointer(text: str) -> tuple[str, ...]:
    """RFC 6901: "" is the whole value, else "/"-separated tokens with ~1 for / and ~0 for ~.
    Raises ValueError saying what is wrong."""
    if text == "":
        return ()
    if not text.startswith("/"):
        raise ValueError("must be empty or start with '/' (RFC 6901 JSON Pointer)")
    if len(text) > MAX_POINTER_LENGTH:
        raise ValueError(f"must be at most {MAX_POINTER_LENGTH} characters")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            # It would come back in a `cond_error`, which no UTF-8 text frame can carry.
            raise ValueError("contains a lone surrogate") from None
    tokens = text[1:].split("/")
    if len(tokens) > MAX_POINTER_TOKENS:
        raise ValueError(f"must have at most {MAX_POINTER_TOKENS} reference tokens")
    for token in tokens:
        # "~" may only be followed by 0 or 1 (RFC 6901 §3).
        if "~" in token.replace("~0", "").replace("~1", ""):
            raise ValueError(f"has an invalid escape in {token!r}: use ~0 for '~', ~1 for '/'")
    return tuple(token.replace("~1", "/").replace("~0", "~") for token in tokens)


_MISSING: Final[Any] = object()


def resolve_pointer(document: Any, tokens: tuple[str, ...]) -> Any:
    """The value `tokens` point at in `document`, or raise LookupError saying where it
    stops (RFC 6901 §4: an array index is 0 or digits without a leading zero; "-" is past
    the end, so never there)."""
    value = document
    for depth, token in enumerate(tokens):
        where = "/" + "/".join(t.replace("~", "~0").replace("/", "~1") for t in tokens[:depth])
        if isinstance(value, Mapping):
            found = value.get(token, _MISSING)
            if found is _MISSING:
                raise LookupError(f"no member {token!r} at {where!r}")
            value = found
        elif isinstance(value, list):
            if not (token == "0" or (token.isascii() and token.isdigit() and token[0] != "0")):
                raise LookupError(f"{token!r} is not an array index at {where!r}")
            index = int(token)
            if index >= len(value):
                raise LookupError(f"index {index} is past the end of the array at {where!r} "
                                  f"({len(value)} items)")
            value = value[index]
        else:
            raise LookupError(f"{where!r} is a {_kind(value)}, not an object or array")
    return value


def _kind(value: object) -> str:
    if isinstance(value, bool):
        return "boolean"
    if _is_number(value):
        return "number"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "array"
    if isinstance(value, Mapping):
        return "object"
    return type(value).__name__


def _period(obj: Mapping[str, Any], name: str) -> float | None:
    if name not in obj:
        return None
    value = obj[name]
    if not _is_number(value) or not math.isfinite(value) or value <= 0 or value > MAX_PERIOD:
        raise ConditionError(
            f"cond.{name}", f"must be a number of seconds greater than 0 and at most {MAX_PERIOD:g}"
        )
    return float(value)


def _limit(obj: Mapping[str, Any], name: str) -> float | None:
    if name not in obj:
        return None
    value = obj[name]
    if not _is_number(value) or not math.isfinite(value):
        raise ConditionError(f"cond.{name}", "must be a finite number")
    return value  # type: ignore[no-any-return]  # an int stays exact against int values


def parse_condition(obj: Any) -> Condition:
    """Validate a `cond` object (the draft's 4.00 rules); raise `ConditionError` naming the
    parameter at fault. (`[limits] min_pmax` is the hub's to check: it is configuration.)"""
    if not isinstance(obj, dict):
        raise ConditionError("cond", "must be an object of conditional parameters")
    for name in obj:
        if name not in PARAMETERS:
            known = ", ".join(PARAMETERS)
            raise ConditionError(f"cond.{name}", f"is not a conditional parameter; use {known}")
    pmin, pmax = _period(obj, "pmin"), _period(obj, "pmax")
    if pmin is not None and pmax is not None and pmax < pmin:
        raise ConditionError("cond.pmax", "must be at least 'cond.pmin'")
    gt, lt = _limit(obj, "gt"), _limit(obj, "lt")
    st = _limit(obj, "st")
    if st is not None and st <= 0:
        raise ConditionError("cond.st", "must be greater than 0")
    band = obj.get("band", False)
    if not isinstance(band, bool):
        raise ConditionError("cond.band", "must be a boolean (true: gt/lt make a band)")
    if band and gt is None and lt is None:
        raise ConditionError("cond.band", "needs 'cond.gt', 'cond.lt' or both")
    edge = obj.get("edge")
    if edge is not None and not isinstance(edge, bool):
        raise ConditionError("cond.edge", "must be a boolean (true: rising, false: falling)")
    if edge is not None and (gt is not None or lt is not None or st is not None or band):
        raise ConditionError(
            "cond.edge", "applies to a boolean and cannot be combined with gt, lt, st or band"
        )
    path = obj.get("path")
    tokens: tuple[str, ...] = ()
    if path is not None:
        if not isinstance(path, str):
            raise ConditionError("cond.path", "must be a string (an RFC 6901 JSON Pointer)")
        try:
            tokens = parse_pointer(path)
        except ValueError as exc:
            raise ConditionError("cond.path", str(exc)) from None
    return Condition(pmin=pmin, pmax=pmax, gt=gt, lt=lt, st=st, band=band, edge=edge,
                     path=path, tokens=tokens)


def select(condition: Condition, body: Mapping[str, Any]) -> tuple[Any, str | None]:
    """The value the condition applies to in a notify's payload fields, and None; or
    (None, why) when it cannot apply (no decoded value, path missing, wrong kind)."""
    if "value" not in body:
        return None, "no decoded value to apply the condition to"
    try:
        value = resolve_pointer(body["value"], condition.tokens)
    except LookupError as exc:
        return None, f"path {condition.path!r} not found: {exc}"
    if condition.numeric and not _is_number(value):
        return None, f"the condition needs a number, the value is a {_kind(value)}"
    if condition.edge is not None and not isinstance(value, bool):
        return None, f"edge needs a boolean, the value is a {_kind(value)}"
    return value, None


def _in_band(c: Condition, v: Any) -> bool:
    if c.gt is not None and c.lt is not None:
        return bool(c.gt <= v <= c.lt if c.gt <= c.lt else (v > c.gt or v < c.lt))
    if c.gt is not None:
        return bool(v <= c.gt)
    return bool(v >= c.lt)


def qualifies(c: Condition, value: Any, last_sent: Any, previous: Any) -> bool:
    """Whether an update with `value` (selected, of the right kind) triggers a notify, given
    the last value sent to the client and the previous update's value (see the module
    docstring). A last/previous value that was not of the right kind counts as a change."""
    if not c.filters:
        return True
    if c.edge is not None:
        return value is c.edge and previous is not value
    if not _is_number(last_sent):
        return not c.band or _in_band(c, value)
    if c.band:
        return _in_band(c, value) and (c.st is None or abs(value - last_sent) >= c.st)
    return (
        (c.gt is not None and (value > c.gt) != (last_sent > c.gt))
        or (c.lt is not None and (value < c.lt) != (last_sent < c.lt))
        or (c.st is not None and abs(value - last_sent) >= c.st)
    )


Outcome = Literal["send", "hold", "drop", "repeat"]


class Watch:
    """The state of one conditional subscription: what was last sent and when, what waits
    for the end of a `pmin` window. Times are the caller's monotonic seconds.

    `update()` and `wake()` say what to do; the caller sends the frame (with `error` as
    `cond_error` when set) and asks `wake_at` when to call `wake()` next.
    """

    __slots__ = (
        "condition",
        "error",
        "held_error",
        "held_seq",
        "held_text",
        "held_value",
        "latest_error",
        "latest_seq",
        "latest_value",
        "sent_at",
        "sent_seq",
        "sent_value",
        "wake_at",
    )

    def __init__(self, condition: Condition) -> None:
        self.condition = condition
        self.sent_at: float | None = None
        """When the last frame went out (None: nothing yet)."""
        self.sent_seq = 0
        self.sent_value: Any = None
        self.error: str | None = None
        """The `cond_error` of the last frame sent (None: the condition applied)."""
        self.latest_seq = 0
        """The newest update seen, sent or not, and its selected value (for edges, pmax)."""
        self.latest_value: Any = None
        self.latest_error: str | None = None
        self.held_seq = 0
        """The update waiting for the end of the `pmin` window (0: none), and its frame."""
        self.held_text: str | None = None
        self.held_value: Any = None
        self.held_error: str | None = None
        self.wake_at: float | None = None
        """When `wake()` has something to do (None: never, until the next update)."""

    def _sent(self, now: float, seq: int, value: Any, error: str | None) -> None:
        self.sent_at, self.sent_seq, self.sent_value, self.error = now, seq, value, error
        self._unhold()

    def _unhold(self) -> None:
        self.held_seq, self.held_text, self.held_value, self.held_error = 0, None, None, None
        self._schedule()

    def _schedule(self) -> None:
        c, sent_at = self.condition, self.sent_at
        if sent_at is None:
            self.wake_at = None
        elif self.held_seq and c.pmin is not None:
            self.wake_at = sent_at + c.pmin
        elif c.pmax is not None:
            self.wake_at = sent_at + c.pmax
        else:
            self.wake_at = None

    def initial(self, now: float, seq: int, body: Mapping[str, Any]) -> Outcome:
        """The current value, sent at once on subscribe (or the first update after it)."""
        value, error = select(self.condition, body)
        self.latest_seq, self.latest_value, self.latest_error = seq, value, error
        self._sent(now, seq, value, error)
        return "send"

    def update(self, now: float, seq: int, body: Mapping[str, Any], text: str) -> Outcome:
        """A new update (`text`: its notify frame): "send" it now, "hold" it for the end of
        the `pmin` window, or "drop" it."""
        if self.sent_at is None:
            return self.initial(now, seq, body)
        c = self.condition
        value, error = select(c, body)
        previous = self.latest_value
        self.latest_seq, self.latest_value, self.latest_error = seq, value, error
        if error is None and not qualifies(c, value, self.sent_value, previous):
            if c.edge is None and self.held_seq:
                # The newest value is what counts: the held one is no longer news.
                self._unhold()
            return "drop"
        if c.pmin is not None and now - self.sent_at < c.pmin:
            self.held_seq, self.held_text = seq, text
            self.held_value, self.held_error = value, error
            self._schedule()
            return "hold"
        self._sent(now, seq, value, error)
        return "send"

    def wake(self, now: float, latest_text: str | None) -> tuple[Outcome, str | None]:
        """Time passed: ("send", its text) for the held update when its window has ended;
        when `pmax` is due, ("send", `latest_text`) for the newest update if it was not
        sent, else ("repeat", None) for the last frame sent; otherwise ("drop", None).
        `latest_text`: the resource's newest notify frame."""
        c, sent_at = self.condition, self.sent_at
        if sent_at is None:
            return "drop", None
        if self.held_seq and c.pmin is not None and now - sent_at >= c.pmin:
            text = self.held_text
            self._sent(now, self.held_seq, self.held_value, self.held_error)
            return "send", text
        if c.pmax is not None and now - sent_at >= c.pmax:
            if latest_text is not None and self.latest_seq != self.sent_seq:
                self._sent(now, self.latest_seq, self.latest_value, self.latest_error)
                return "send", latest_text
            self.sent_at = now
            self._schedule()
            return "repeat", None
        self._schedule()
        return "drop", None


def with_fields(text: str, fields: Mapping[str, Any]) -> str:
    """A serialized frame object with more fields, without decoding it (frames are compact
    JSON objects: the fields go before the closing brace)."""
    extra = "".join(f",{json.dumps(k)}:{json.dumps(v, ensure_ascii=False)}"
                    for k, v in fields.items())
    return f"{text[:-1]}{extra}}}"


K = TypeVar("K", bound=Hashable)


class WakeQueue(Generic[K]):
    """When each watch next wants `wake()`, for one timer in the I/O shell instead of one per
    subscription: a heap of (time, key) with lazy deletion. Stale entries (a deadline that
    moved, a key removed) are skipped when reached and dropped wholesale when they outnumber
    the live ones, so the heap stays within twice the watches (plus a few)."""

    __slots__ = ("_at", "_counter", "_heap")

    def __init__(self) -> None:
        self._at: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._counter = itertools.count()

    def __len__(self) -> int:
        return len(self._at)

    def set(self, key: K, at: float | None) -> None:
        """`key` wants waking at `at` (None: not at all)."""
        if at is None:
            self.remove(key)
            return
        if self._at.get(key) == at:
            return
        self._at[key] = at
        heapq.heappush(self._heap, (at, next(self._counter), key))
        if len(self._heap) > 2 * len(self._at) + 64:
            self._heap = [(t, n, k) for t, n, k in self._heap if self._at.get(k) == t]
            heapq.heapify(self._heap)

    def remove(self, key: K) -> None:
        self._at.pop(key, None)
        if not self._at:
            self._heap.clear()  # nothing live: let go of the keys the stale entries hold

    def _prune(self) -> None:
        heap = self._heap
        while heap and self._at.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)

    @property
    def next_at(self) -> float | None:
        """The earliest time a key wants waking, or None."""
        self._prune()
        return self._heap[0][0] if self._heap else None

    def due(self, now: float) -> list[K]:
        """The keys whose time has come (earliest first); they are no longer scheduled."""
        found: list[K] = []
        heap = self._heap
        while True:
            self._prune()
            if not heap or heap[0][0] > now:
                return found
            _, _, key = heapq.heappop(heap)
            del self._at[key]
            found.append(key)
