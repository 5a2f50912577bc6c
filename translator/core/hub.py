"""The subscription hub: resources, their subscribers, latest values and upstream lifecycle.

The hub is the gateway's decision core and does no I/O. It is fed events (a connection
subscribes, unsubscribes or goes away; the sensor answered; an observation changed state; a
linger timer fired) and returns *commands* for the I/O layers to carry out:

    event in                           commands out
    ---------------------------------  ----------------------------------------------------
    subscribe (first subscriber)       Deliver(subscribed) [+ cached notify/status]
                                       + StartObservation when not already observed
                                       [+ StopObservation of a lingering one, to stay
                                       within the bounds below]
    unsubscribe / disconnect (last)    StopObservation, or StartLinger when linger > 0
    linger_expired (still unwatched)   StopObservation
    upstream_registering               (counts the registration)
    upstream_response 2.xx             [Deliver(status online)] + Deliver(notify, everyone)
    upstream_response 4.xx/5.xx        Deliver(status offline with code) when it changed
    upstream_too_large 2.xx            as upstream_response 2.xx, the notify without payload
                                       and with a decode_error saying it was too large
    upstream_unusable 2.xx             the same, with a decode_error saying why (a broken
                                       block-wise transfer)
    upstream_unchanged (a poll)        [Deliver(status online)]
    upstream_stale / upstream_failed   Deliver(status stale / offline) when it changed
    wake (a Wake time came)            Deliver / Repeat of what conditional subscriptions
                                       held or owe for `pmax` (+ Wake for the next time)
    relay (a frame another hub made:   Deliver(the same text) when it is news, to
    a cluster's owner of the resource) conditional subscriptions as for an update

A subscription with a `cond` (see `conditions`) has a `Watch` that decides which updates
it gets; the hub asks it only for the resources that have one (`Resource.watches`), so
subscriptions without conditions cost nothing more. One `Wake` time, the earliest any watch
wants, is the I/O shell's single timer for all of them.

The upstream state of a resource (online / stale / offline) follows one table,
`TRANSITIONS`, in the style of h11's `_state.py`; see there for the rule.

Upstream observations are bounded, so that one client's subscribe/unsubscribe churn cannot
turn into traffic toward sensors: a connection's subscriptions plus the lingering
observations it left behind stay within `max_subscriptions`, and all observations within
`max_observations`. A subscription that needs a new observation past a bound first ends the
oldest lingering observation (that connection's own, then anyone's); with none to end, it is
refused with `limit`. Pinned resources count toward the global bound but are never ended.

There is exactly one upstream observation per resource however many connections watch it.
A notification is decoded once and serialized once; `Deliver.text` is the same `str` object
for every subscriber. Connections are opaque hashable objects to the hub.
"""

from __future__ import annotations

import itertools
import json
import secrets
import sys
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final, Generic, Literal, TypeVar

from translator.core.codecs import cbor_data_item, decode_payload, parse_link_format
from translator.core.conditions import Condition, WakeQueue, Watch, with_fields
from translator.core.frames import (
    BAD_REQUEST,
    LIMIT,
    NOT_FOUND,
    FrameError,
    FrameId,
    JSONValue,
    Notify,
    Since,
    State,
    Status,
    Subscribed,
    Unsubscribed,
)
from translator.core.history import History
from translator.core.uris import UriError, parse_coap_uri

C = TypeVar("C", bound=Hashable)

IDLE_OVERHEAD: Final = 400
"""Bytes an unwatched resource costs besides its URI and cached value: the Resource object
with its fields, its `sub` and the dictionary entries that find it (tracemalloc on CPython
3.11: about 350, over 2000 idle resources)."""

DEFAULT_MAX_AGE: Final = 60
"""RFC 7252 §5.10.5: a response without Max-Age is fresh for 60 seconds (the hub's notify
frames and the CoAP side's freshness both take it from here)."""


# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NotifyMeta:
    """What the web side needs besides a notify's JSON text to write it in other forms
    (CBOR, compact; see `web.encodings`), computed once per update."""

    seq: int
    cbor_value: bytes | None = None
    """The value's CBOR data item exactly as the sensor sent it (cf 60 or 112), if any."""
    changed: tuple[str, ...] | None = None
    """The fields of `HEADER_FIELDS` that differ from the resource's previous notify; None
    when there is no previous one to compare with (a compact frame is then complete)."""


HEADER_FIELDS: Final = ("uri", "code", "cf", "max_age")
"""The notify fields a compact frame carries only when they changed."""


@dataclass(frozen=True, slots=True)
class Deliver(Generic[C]):
    """Queue `text` on each of these connections (the same string for all of them)."""

    targets: tuple[C, ...]
    text: str
    replaces: str | None = None
    """For a `notify`: its `sub`. A connection that still has an unsent notify with the same
    key may drop that one for this newer one (the slow-consumer policy); None: never drop."""
    meta: NotifyMeta | None = None
    """For a notify of the live stream: what its other forms need."""


@dataclass(frozen=True, slots=True)
class Repeat(Deliver[C]):
    """A `pmax` repeat (a notify sent again, marked ``"repeat": true``): it counts toward
    the connection's rate budget, and the I/O shell may skip it for a connection that has
    spent it (the client already has the value)."""


@dataclass(frozen=True, slots=True)
class Wake:
    """Call `Hub.wake()` at monotonic time `at` (replacing any earlier request); None:
    no conditional subscription needs a timer any more."""

    at: float | None


@dataclass(frozen=True, slots=True)
class StartObservation:
    uri: str


@dataclass(frozen=True, slots=True)
class StopObservation:
    uri: str


@dataclass(frozen=True, slots=True)
class StartLinger:
    """Call `Hub.linger_expired(uri, generation)` after `delay` seconds."""

    uri: str
    delay: float
    generation: int


Command = Deliver[C] | StartObservation | StopObservation | StartLinger | Wake


# ---------------------------------------------------------------------------------------------
# The upstream state of a resource
# ---------------------------------------------------------------------------------------------

Event = Literal["answered", "expired", "failed"]
"""What the CoAP side saw: a 2.xx answer (registration, notification or poll), Max-Age
passing without a notification, or a failure (no answer, RST, ICMP, a 4.xx/5.xx code)."""

FROM_EVENT: Final = "<the event's reason>"

# The rule: a 2.xx answer means online; only a fresh value can go stale; any failure means
# offline until the next 2.xx answer. The first answer of an observation says nothing more
# than that (no reason); every later change says why. A missing (state, event) pair is no
# change: an offline or never-answered resource does not go stale, a stale one does not go
# stale again.
#
#   (state,     event)       -> (new state, reason)
TRANSITIONS: Final[dict[tuple[State | None, Event], tuple[State, str | None]]] = {
    (None, "answered"): ("online", None),
    ("online", "answered"): ("online", None),
    ("stale", "answered"): ("online", "updates resumed"),
    ("offline", "answered"): ("online", "the sensor answers again"),
    ("online", "expired"): ("stale", FROM_EVENT),
    (None, "failed"): ("offline", FROM_EVENT),
    ("online", "failed"): ("offline", FROM_EVENT),
    ("stale", "failed"): ("offline", FROM_EVENT),
    ("offline", "failed"): ("offline", FROM_EVENT),
}


_EVENT_LEADING_TO: Final[dict[State, Event]] = {
    "online": "answered", "stale": "expired", "offline": "failed",
}


def transition(
    state: State | None, event: Event, reason: str | None = None
) -> tuple[State, str | None] | None:
    """The new (state, reason) after `event`, or None when the state does not change."""
    found = TRANSITIONS.get((state, event))
    if found is None:
        return None
    new_state, new_reason = found
    return new_state, reason if new_reason is FROM_EVENT else new_reason


# ---------------------------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------------------------


@dataclass(slots=True)
class LinkInfo:
    """What a host's /.well-known/core says of one resource (RFC 6690 attributes)."""

    cf: int | None = None
    rt: str | None = None
    interface: str | None = None
    observable: bool | None = None


@dataclass(slots=True, eq=False)
class Resource(Generic[C]):
    """One upstream resource, shared by every connection that watches it."""

    uri: str
    sub: str
    name: str | None = None
    pinned: bool = False
    """Configured `observe = true`: observed from startup, even with no subscriber."""
    subscribers: tuple[C, ...] = ()
    """The connections subscribed to this resource, in the order they subscribed. A tuple
    rather than a dict used as an ordered set: most resources have one subscriber (48 bytes
    instead of 224), and a `Deliver` takes it as its targets without a copy. Adding and
    removing a subscriber copies it, once per subscribe or unsubscribe."""
    observing: bool = False
    """The hub has asked for an upstream observation and not yet asked to stop it."""
    linger_generation: int = 0
    seq: int = 0
    last_notify: str | None = None
    """The latest notify frame's text, for late joiners; `list_entries` reads the value
    fields back from it rather than keeping them a second time as objects."""
    last_ts: float | None = None
    last_cbor: bytes | None = None
    """The CBOR data item of the latest notify's value, as the sensor sent it (if CBOR)."""
    last_header: tuple[str, int | None, int] | None = None
    """The latest notify's code, cf and max_age: what the next compact frame is diffed with."""
    state: State | None = None
    state_reason: str | None = None
    state_code: str | None = None
    last_status: str | None = None
    """The status frame's text for late joiners while the state is not online (an online
    resource's status is what its notify already says, so that text is not kept)."""
    observable: bool | None = None
    notifications: int = 0
    """2.xx representations accepted (each gave a notify)."""
    registrations: int = 0
    """Upstream registrations (GET with Observe = 0) made for this resource."""
    registering: bool = False
    """A registration was sent and has had neither an answer nor a failure yet."""
    last_update: float | None = None
    """When the sensor last confirmed the current value: a notification, or a poll answer."""
    watches: dict[C, Watch] | None = None
    """The subscribers with a `cond`, and their state (None: none, the fast path)."""


def _as_replay(notify: str) -> str:
    """A stored notify frame as a replayed one: the same object with ``"replay": true``
    (frames are compact JSON objects, so the field goes before the closing brace)."""
    return f'{notify[:-1]},"replay":true}}'


def _first_int(text: str | None) -> int | None:
    """The first content-format of a `ct` attribute such as "60" or "60 50"."""
    if not text:
        return None
    first = str(text).split()[0] if str(text).split() else ""
    # ASCII digits only, and few of them: "²".isdigit() is true but int("²") raises, and so
    # does int() of a digit string longer than Python's int-conversion limit.
    if not (first.isascii() and first.isdigit()) or len(first) > 5:
        return None
    return int(first) if int(first) <= 0xFFFF else None


def _resolve_href(origin: str, href: str) -> str:
    """An RFC 6690 link target resolved against the host that listed it (RFC 3986 §5.2,
    for the forms link-format uses: absolute, network-path and absolute-path references)."""
    if "://" in href:
        return href
    if href.startswith("//"):
        return origin.partition(":")[0] + ":" + href
    return origin + (href if href.startswith("/") else "/" + href)


_VALUE_FIELDS: Final = ("value", "payload_b64", "decode_error")
"""The fields of a notify that describe its payload (`decode_payload`'s keys)."""


def _value_fields(notify: str) -> dict[str, JSONValue]:
    """The payload fields of a notify frame's text, as they were before serialization (the
    text is JSON this process wrote: floats and integers read back exactly)."""
    frame = json.loads(notify)
    return {key: frame[key] for key in _VALUE_FIELDS if key in frame}


def _attr_str(value: JSONValue) -> str | None:
    return value if isinstance(value, str) else None


class Hub(Generic[C]):
    """Subscriptions and resources; see the module docstring for the event/command table."""

    def __init__(
        self,
        *,
        linger: float = 5.0,
        max_subscriptions: int = 256,
        sensors: Mapping[str, str] | None = None,
        pinned: Iterable[str] = (),
        clock: Callable[[], float] | None = None,
        max_idle_resources: int = 10_000,
        max_upstream_bytes: int = 1_048_576,
        max_observations: int = 1000,
        max_idle_bytes: int = 16 << 20,
        history: History | None = None,
        sub_for: Callable[[str], str] | None = None,
        min_pmax: float = 1.0,
        monotonic: Callable[[], float] | None = None,
    ) -> None:
        """`sensors` maps configured names to normalized URIs; `pinned` lists the URIs
        configured with `observe = true`; `max_upstream_bytes` is the limit the CoAP side
        applies to representations (named in the notify of one that exceeded it). `sub_for`
        names a resource's `sub` from its URI (a cluster's nodes must agree on it); by
        default subs are numbered in the order resources become known."""
        import time

        self.linger = linger
        self.history = history if history is not None else History()
        """The recent notify frames of each resource, for clients that resume (`since`)."""
        self.epoch = secrets.token_urlsafe(6)
        """This hub's part of every resource's epoch: new at every start, so that a `seq` of
        an earlier run of the gateway is never taken for one of this run's."""
        self.max_subscriptions = max_subscriptions
        self.max_observations = max_observations
        self.observing_count = 0
        """Resources the hub has asked the CoAP side to observe (and not yet to stop)."""
        # Totals for the operator's metrics, counted once per event (never per subscriber).
        self.updates_total = 0
        """2.xx representations accepted (each a notify)."""
        self.deliveries_total = 0
        """Notify frames handed to subscribers (an update times its subscribers)."""
        self.registrations_total = 0
        self.registration_failures_total = 0
        """Registrations answered by a failure (no answer, RST, ICMP, 4.xx/5.xx)."""
        self.failures_total = 0
        """Upstream failures reported (no answer, RST, ICMP, 4.xx/5.xx)."""
        # Lingering observations, oldest first, with the connection whose leaving started
        # the linger (None once it is gone), and the same per connection.
        self._lingering: dict[str, C | None] = {}
        self._lingering_by: dict[C, dict[str, None]] = {}
        self.max_upstream_bytes = max_upstream_bytes
        self.clock = clock or time.time
        self.min_pmax = min_pmax
        """The shortest `cond.pmax` a client may ask for ([limits] min_pmax)."""
        self.monotonic = monotonic or time.monotonic
        """The time of `pmin`/`pmax` windows and of `Wake` (not the frames' `ts`)."""
        self._wakes: WakeQueue[tuple[Resource[C], C]] = WakeQueue()
        """When each conditional subscription wants `wake()`, keyed by the resource object
        (not its URI, which `move` may change) and the connection."""
        self._wake_announced: float | None = None
        self.sensor_uris: dict[str, str] = dict(sensors or {})
        self._sensor_uri_set = frozenset(self.sensor_uris.values())
        self._resources: dict[str, Resource[C]] = {}
        self._sub_ids = itertools.count(1)
        self._sub_for = sub_for
        # Resources nobody watches, oldest first, with what each costs in memory: kept so
        # that `sub` and `seq` stay stable for a client that comes back, but only up to
        # `max_idle_resources` of them and `max_idle_bytes` in all (their cached values can
        # be large), so that clients cycling through many URIs cannot grow the gateway's
        # memory without bound.
        self._idle: dict[str, int] = {}
        self.idle_bytes = 0
        self.max_idle_resources = max_idle_resources
        self.max_idle_bytes = max_idle_bytes
        self._connections: dict[C, dict[str, Resource[C]]] = {}
        self._links: dict[str, LinkInfo] = {}
        self._links_by_origin: dict[str, tuple[str, ...]] = {}
        self.registered_cf: Callable[[str], int | None] | None = None
        """The `ct` a resource registered with (the Resource Directory's catalogue), for
        the resources no /.well-known/core read describes."""
        for name, uri in self.sensor_uris.items():
            self._resource(uri).name = name
        for uri in pinned:
            self._resource(uri).pinned = True

    # -- lookups -----------------------------------------------------------------------------

    def _resource(self, uri: str) -> Resource[C]:
        resource = self._resources.get(uri)
        if resource is None:
            sub = self._sub_for(uri) if self._sub_for else f"s{next(self._sub_ids)}"
            resource = Resource(uri=uri, sub=sub)
            self._resources[uri] = resource
        return resource

    def resource(self, uri: str) -> Resource[C] | None:
        return self._resources.get(uri)

    def uri_for_name(self, name: str) -> str | None:
        return self.sensor_uris.get(name)

    def subscriptions_of(self, conn: C) -> tuple[str, ...]:
        """The `sub` ids `conn` holds."""
        return tuple(self._connections.get(conn, {}))

    def subscribed_uris(self, conn: C) -> tuple[str, ...]:
        """The URIs of the resources `conn` subscribes to."""
        return tuple(resource.uri for resource in self._connections.get(conn, {}).values())

    def advertised_cf(self, uri: str) -> int | None:
        link = self._links.get(uri)
        if link is None and self.registered_cf is not None:
            return self.registered_cf(uri)
        return link.cf if link else None

    @property
    def observed_uris(self) -> tuple[str, ...]:
        return tuple(uri for uri, r in self._resources.items() if r.observing)

    @property
    def connection_count(self) -> int:
        return len(self._connections)

    @property
    def subscription_count(self) -> int:
        return sum(len(subs) for subs in self._connections.values())

    def states(self) -> dict[str, int]:
        """Observed resources by upstream state (``registering`` before the first answer)."""
        counts = dict.fromkeys(("online", "stale", "offline", "registering"), 0)
        for resource in self._resources.values():
            if resource.observing:
                counts[resource.state or "registering"] += 1
        return counts

    # -- lifecycle ---------------------------------------------------------------------------

    def startup(self) -> list[Command[C]]:
        """Observe the pinned resources from the start."""
        commands: list[Command[C]] = []
        for resource in self._resources.values():
            if resource.pinned and not resource.observing:
                commands.extend(self._start(resource))
        return commands

    def connect(self, conn: C) -> None:
        self._connections.setdefault(conn, {})

    def subscribe(
        self, conn: C, uri: str, frame_id: FrameId = None, since: Since | None = None,
        cond: Condition | None = None,
    ) -> list[Command[C]]:
        """Subscribe `conn` to the (normalized, policy-checked) `uri`, with conditions
        `cond` or none (subscribing again to the same resource replaces them)."""
        if cond is not None and cond.pmax is not None and cond.pmax < self.min_pmax:
            raise FrameError(BAD_REQUEST, f"'cond.pmax' must be at least {self.min_pmax:g} s "
                             "([limits] min_pmax)", frame_id)
        subs = self._connections.setdefault(conn, {})
        resource = self._resources.get(uri)
        already = resource is not None and resource.sub in subs
        if not already and len(subs) >= self.max_subscriptions:
            raise FrameError(
                LIMIT,
                f"at most {self.max_subscriptions} subscriptions per connection",
                frame_id,
            )
        commands: list[Command[C]] = []
        if resource is None or not resource.observing:
            commands.extend(self._make_room(conn, uri, frame_id))
        resource = self._resource(uri)
        self.idle_bytes -= self._idle.pop(uri, 0)
        self._end_linger(uri)
        if not already:
            subs[resource.sub] = resource
            resource.subscribers += (conn,)
        resource.linger_generation += 1  # a pending linger timer no longer applies
        # A conditional subscription sees a filtered stream: nothing to resume without a gap,
        # so no replay (`recovered` false); it starts again from the current value.
        replay = None if since is None or cond is not None else self._replay(resource, since)
        commands.append(Deliver((conn,), Subscribed(
            id=frame_id, sub=resource.sub, uri=uri, epoch=self.epoch_of(resource),
            recovered=None if since is None else replay is not None,
        ).serialize()))
        if replay is not None:
            # Every update after the client's `since`, each once, marked as replayed, and
            # never replaced by a newer one in a slow client's queue (no gap).
            commands.extend(Deliver((conn,), _as_replay(text)) for text in replay)
        elif cond is not None or (resource.watches and conn in resource.watches):
            commands.extend(self._watch(resource, conn, cond))
        elif resource.last_notify is not None:
            commands.append(Deliver(
                (conn,), resource.last_notify, resource.sub, self._cached_meta(resource)
            ))
        if resource.last_status is not None and resource.state != "online":
            commands.append(Deliver((conn,), resource.last_status))
        if not resource.observing:
            commands.extend(self._start(resource))
        return commands

    def epoch_of(self, resource: Resource[C]) -> str:
        """The resource's epoch: it changes whenever its `seq` numbering starts again (a new
        hub, or a forgotten resource, which gets a new `sub`)."""
        return f"{self.epoch}-{resource.sub}"

    def _replay(self, resource: Resource[C], since: Since) -> list[str] | None:
        """The notify frames after `since`, when the stream is the same and none is missing;
        None when the client cannot recover (it then gets the latest value)."""
        if since.epoch != self.epoch_of(resource) or since.seq > resource.seq:
            return None
        if since.seq == resource.seq:
            return []
        latest = resource.last_notify
        if not self.history.enabled or latest is None:
            return None
        # The newest frame is the cached notify; the history holds the ones before it.
        if since.seq == resource.seq - 1:
            return [latest]
        if self.history.newest(resource.uri) != resource.seq - 1:
            return None
        older = self.history.after(resource.uri, since.seq)
        return None if older is None else [*older, latest]

    def _make_room(self, conn: C, uri: str, frame_id: FrameId) -> list[Command[C]]:
        """Make room for one more observation on behalf of `conn` (see the module
        docstring), or raise `limit` without changing anything."""
        own = self._lingering_by.get(conn, {})
        victims: list[str] = []
        if len(self._connections.get(conn, {})) + len(own) >= self.max_subscriptions:
            if not own:
                raise FrameError(
                    LIMIT, f"at most {self.max_subscriptions} subscriptions per connection, "
                    "lingering observations it left included", frame_id,
                )
            victims.append(next(iter(own)))
        if self.observing_count - len(victims) >= self.max_observations:
            spare = next((u for u in self._lingering if u not in victims and u != uri), None)
            if spare is None:
                raise FrameError(
                    LIMIT, f"the gateway observes its maximum of {self.max_observations} "
                    "resources ([limits] max_observations)", frame_id,
                )
            victims.append(spare)
        commands: list[Command[C]] = []
        for victim in victims:
            commands.extend(self._stop(self._resources[victim]))
        return commands

    def _start(self, resource: Resource[C]) -> list[Command[C]]:
        resource.observing = True
        self.observing_count += 1
        return [StartObservation(resource.uri)]

    def _end_linger(self, uri: str) -> None:
        if uri in self._lingering:
            who = self._lingering.pop(uri)
            if who is not None:
                own = self._lingering_by.get(who)
                if own is not None:
                    own.pop(uri, None)
                    if not own:
                        del self._lingering_by[who]

    def unsubscribe(self, conn: C, sub: str, frame_id: FrameId = None) -> list[Command[C]]:
        subs = self._connections.get(conn, {})
        resource = subs.pop(sub, None)
        if resource is None:
            raise FrameError(NOT_FOUND, f"this connection holds no subscription {sub!r}", frame_id)
        commands: list[Command[C]] = [
            Deliver((conn,), Unsubscribed(id=frame_id, sub=sub).serialize())
        ]
        commands.extend(self._drop_subscriber(resource, conn))
        return commands

    def disconnect(self, conn: C) -> list[Command[C]]:
        """Forget a connection and every subscription it held."""
        commands: list[Command[C]] = []
        for resource in self._connections.pop(conn, {}).values():
            commands.extend(self._drop_subscriber(resource, conn))
        # What it left lingering still counts globally, no longer toward a connection.
        for uri in self._lingering_by.pop(conn, {}):
            self._lingering[uri] = None
        return commands

    def _drop_subscriber(self, resource: Resource[C], conn: C) -> list[Command[C]]:
        subscribers = resource.subscribers
        if conn in subscribers:
            i = subscribers.index(conn)
            resource.subscribers = subscribers[:i] + subscribers[i + 1:]
        wake: list[Command[C]] = []
        if resource.watches and conn in resource.watches:
            self._unwatch(resource, conn)
            wake = self._announce()
        if not resource.observing and not resource.subscribers and not resource.pinned \
                and resource.name is None and resource.uri not in self._idle:
            # A withdrawn resource (see `withdraw`) that its last subscriber left.
            self._remember_idle(resource)
        if resource.subscribers or resource.pinned or not resource.observing:
            return wake
        if self.linger <= 0:
            return [*wake, *self._stop(resource)]
        resource.linger_generation += 1
        self._end_linger(resource.uri)
        self._lingering[resource.uri] = conn
        if conn in self._connections:
            self._lingering_by.setdefault(conn, {})[resource.uri] = None
        return [*wake, StartLinger(resource.uri, self.linger, resource.linger_generation)]

    def linger_expired(self, uri: str, generation: int) -> list[Command[C]]:
        resource = self._resources.get(uri)
        if (
            resource is None
            or generation != resource.linger_generation
            or resource.subscribers
            or resource.pinned
            or not resource.observing
        ):
            return []
        return self._stop(resource)

    def _stop(self, resource: Resource[C]) -> list[Command[C]]:
        resource.observing = resource.registering = False
        self.observing_count -= 1
        self._end_linger(resource.uri)
        # Nobody watches the resource any more: what we knew of the upstream state is moot.
        resource.state = resource.state_reason = resource.state_code = None
        resource.last_status = None
        if resource.name is None:
            self._remember_idle(resource)
        return [StopObservation(resource.uri)]

    def _remember_idle(self, resource: Resource[C]) -> None:
        """Keep an unwatched resource within the idle bounds, forgetting the oldest ones."""
        size = IDLE_OVERHEAD + len(resource.uri) + (
            sys.getsizeof(resource.last_notify) if resource.last_notify is not None else 0
        ) + (sys.getsizeof(resource.last_cbor) if resource.last_cbor is not None else 0)
        self._idle[resource.uri] = size
        self.idle_bytes += size
        while self._idle and (
            len(self._idle) > self.max_idle_resources or self.idle_bytes > self.max_idle_bytes
        ):
            oldest = next(iter(self._idle))
            self.idle_bytes -= self._idle.pop(oldest)
            del self._resources[oldest]
            self.history.forget(oldest)

    # -- upstream events ---------------------------------------------------------------------

    def upstream_registering(self, uri: str) -> list[Command[C]]:
        """A registration for `uri` is being sent upstream."""
        resource = self._resources.get(uri)
        if resource is not None and resource.observing:
            resource.registrations += 1
            resource.registering = True
            self.registrations_total += 1
        return []

    def upstream_response(
        self,
        uri: str,
        *,
        code: str,
        cf: int | None,
        payload: bytes,
        max_age: int | None = None,
        observe: bool | None = None,
        now: float | None = None,
    ) -> list[Command[C]]:
        """The sensor answered on an observation: the answer to a registration, a
        notification or a changed poll answer. `observe` says, for the answer to a
        registration, whether it carried Observe (None: this answer does not say)."""
        advertised = self.advertised_cf(uri)
        return self._update(
            uri, code, cf, max_age, observe, now,
            lambda ts: decode_payload(cf, payload, ts=ts, advertised_cf=advertised),
            lambda body: cbor_data_item(cf, payload, body, advertised),
        )

    def upstream_too_large(
        self,
        uri: str,
        size: int,
        *,
        code: str = "2.05",
        cf: int | None = None,
        max_age: int | None = None,
        observe: bool | None = None,
        now: float | None = None,
    ) -> list[Command[C]]:
        """Like `upstream_response`, for a representation the CoAP side dropped because it
        exceeded `max_upstream_bytes` (`size`: the bytes received, or announced, when it
        stopped). Subscribers get a notify that says so in `decode_error`, without payload."""
        reason = (f"representation larger than max_upstream_bytes ({self.max_upstream_bytes} "
                  f"bytes): {size} bytes or more")
        return self.upstream_unusable(
            uri, reason, code=code, cf=cf, max_age=max_age, observe=observe, now=now
        )

    def upstream_unusable(
        self,
        uri: str,
        reason: str,
        *,
        code: str = "2.05",
        cf: int | None = None,
        max_age: int | None = None,
        observe: bool | None = None,
        now: float | None = None,
    ) -> list[Command[C]]:
        """Like `upstream_too_large`, for a representation the CoAP side could not take for
        another `reason` (a block-wise transfer that broke RFC 7959 or missed its deadline).
        Subscribers get a notify that says so in `decode_error`, without payload."""
        body: dict[str, JSONValue] = {"decode_error": f"{reason}; dropped"}
        return self._update(uri, code, cf, max_age, observe, now, lambda ts: body)

    def _update(
        self,
        uri: str,
        code: str,
        cf: int | None,
        max_age: int | None,
        observe: bool | None,
        now: float | None,
        body_at: Callable[[float], dict[str, JSONValue]],
        cbor_of: Callable[[dict[str, JSONValue]], bytes | None] | None = None,
    ) -> list[Command[C]]:
        """An answer on an observation: a 2.xx one is the next update (seq + 1), its notify
        fields from `body_at(receive time)`, the value's CBOR data item (for clients that
        speak CBOR) from `cbor_of(fields)`; any other code is a failure."""
        resource = self._resources.get(uri)
        if resource is None or not resource.observing:
            return []  # a late answer after the observation was stopped
        if not code.startswith("2."):
            self._count_failure(resource)
            return self._event(resource, "failed", f"the sensor answered {code}", code)
        resource.registering = False
        if observe is not None:
            resource.observable = observe
        ts = self.clock() if now is None else now
        resource.last_update = ts
        resource.seq += 1
        resource.notifications += 1
        body = body_at(ts)
        max_age = DEFAULT_MAX_AGE if max_age is None else max_age
        text = Notify(
            sub=resource.sub,
            uri=uri,
            seq=resource.seq,
            code=code,
            cf=cf,
            body=body,
            ts=ts,
            max_age=max_age,
        ).serialize()
        header = (code, cf, max_age)
        previous = resource.last_header
        meta = NotifyMeta(
            resource.seq,
            cbor_of(body) if cbor_of is not None else None,
            None if previous is None else tuple(
                name for name, old, new in zip(HEADER_FIELDS[1:], previous, header, strict=True)
                if old != new
            ),
        )
        resource.last_header, resource.last_cbor = header, meta.cbor_value
        if resource.last_notify is not None:
            # The history keeps the frames before the newest one, which is `last_notify`
            # (kept anyway for late joiners): a resource with one update costs it nothing.
            self.history.record(uri, resource.seq - 1, resource.last_notify)
        resource.last_notify, resource.last_ts = text, ts
        self.updates_total += 1
        commands = self._event(resource, "answered")
        if resource.subscribers:
            if resource.watches is None:
                self.deliveries_total += len(resource.subscribers)
                commands.append(Deliver(resource.subscribers, text, resource.sub, meta))
            else:
                commands.extend(self._conditional_update(resource, text, body, meta))
        return commands

    # -- conditional subscriptions (translator.core.conditions) ------------------------------

    @staticmethod
    def _cached_meta(resource: Resource[C]) -> NotifyMeta:
        """The meta of the resource's newest notify sent on its own (a late joiner's first
        frame, a held or repeated one): complete in compact form (`changed` None)."""
        return NotifyMeta(resource.seq, resource.last_cbor)

    def _variant(self, text: str, error: str | None, repeat: bool = False) -> str:
        """A notify as one conditional subscription gets it: with `cond_error` when the
        condition could not apply, with `repeat` for a `pmax` repeat."""
        fields: dict[str, JSONValue] = {}
        if error is not None:
            fields["cond_error"] = error
        if repeat:
            fields["repeat"] = True
        return with_fields(text, fields) if fields else text

    def _watch(
        self, resource: Resource[C], conn: C, cond: Condition | None
    ) -> list[Command[C]]:
        """Give `conn`'s subscription its conditions (None: remove them), and the current
        value at once."""
        if resource.watches and conn in resource.watches:
            self._unwatch(resource, conn)
        commands: list[Command[C]] = []
        if cond is None:
            if resource.last_notify is not None:
                commands.append(Deliver(
                    (conn,), resource.last_notify, resource.sub, self._cached_meta(resource)
                ))
            return [*commands, *self._announce()]
        watch = Watch(cond)
        if resource.watches is None:
            resource.watches = {}
        resource.watches[conn] = watch
        if resource.last_notify is not None:
            watch.initial(self.monotonic(), resource.seq, _value_fields(resource.last_notify))
            commands.append(Deliver(
                (conn,), self._variant(resource.last_notify, watch.error), resource.sub,
                self._cached_meta(resource),
            ))
        self._wakes.set((resource, conn), watch.wake_at)
        return [*commands, *self._announce()]

    def _unwatch(self, resource: Resource[C], conn: C) -> None:
        watches = resource.watches
        if watches is not None:
            watches.pop(conn, None)
            if not watches:
                resource.watches = None
        self._wakes.remove((resource, conn))

    def _announce(self) -> list[Command[C]]:
        """A `Wake` when the earliest time any watch wants changed since the last one."""
        at = self._wakes.next_at
        if at == self._wake_announced:
            return []
        self._wake_announced = at
        return [Wake(at)]

    def _conditional_update(
        self, resource: Resource[C], text: str, body: dict[str, JSONValue], meta: NotifyMeta
    ) -> list[Command[C]]:
        """Fan an update out to a resource some of whose subscribers have conditions: the
        others get `text` as always; each watch says whether its subscriber gets it now.
        Encoded once per variant (plain, or each distinct `cond_error`), not per client."""
        watches = resource.watches
        assert watches is not None
        now = self.monotonic()
        targets = [c for c in resource.subscribers if c not in watches]
        variants: dict[str, list[C]] = {}
        for conn, watch in watches.items():
            if watch.update(now, resource.seq, body, text) == "send":
                if watch.error is None:
                    targets.append(conn)
                else:
                    variants.setdefault(watch.error, []).append(conn)
            self._wakes.set((resource, conn), watch.wake_at)
        commands: list[Command[C]] = []
        if targets:
            commands.append(Deliver(tuple(targets), text, resource.sub, meta))
        for error, conns in variants.items():
            commands.append(
                Deliver(tuple(conns), self._variant(text, error), resource.sub, meta)
            )
        self.deliveries_total += len(targets) + sum(len(c) for c in variants.values())
        commands.extend(self._announce())
        return commands

    def wake(self, now: float | None = None) -> list[Command[C]]:
        """A `Wake` time came: what conditional subscriptions held for the end of a `pmin`
        window, and `pmax` frames that are due; then the next `Wake`."""
        now = self.monotonic() if now is None else now
        self._wake_announced = None  # the shell's timer fired: none is armed now
        # Subscriptions due together that get the same frame share one text: grouped by
        # (resource, the frame's text object, cond_error, repeat), encoded once per group.
        groups: dict[tuple[Resource[C], int, str | None, bool], tuple[str, list[C]]] = {}
        for resource, conn in self._wakes.due(now):
            watch = resource.watches.get(conn) if resource.watches else None
            if watch is None:
                continue
            outcome, text = watch.wake(now, resource.last_notify)
            repeat = outcome == "repeat"
            if repeat:
                text = resource.last_notify
            if text is not None and outcome != "drop":
                key = (resource, id(text), watch.error, repeat)
                groups.setdefault(key, (text, []))[1].append(conn)
            self._wakes.set((resource, conn), watch.wake_at)
        commands: list[Command[C]] = []
        for (resource, _, error, repeat), (text, conns) in groups.items():
            sub = resource.sub
            self.deliveries_total += len(conns)
            variant = self._variant(text, error, repeat)
            # The newest frame (held for a pmin window's end, or repeated) has the sensor's
            # CBOR item; an older one is sent as its text says.
            meta = self._cached_meta(resource) if text is resource.last_notify else None
            commands.append(
                (Repeat if repeat else Deliver)(tuple(conns), variant, sub, meta)
            )
        commands.extend(self._announce())
        return commands

    def upstream_unchanged(self, uri: str, now: float | None = None) -> list[Command[C]]:
        """A poll of `uri` got the same answer as the last one: alive, nothing to forward."""
        resource = self._resources.get(uri)
        if resource is None or not resource.observing:
            return []
        resource.registering = False
        resource.last_update = self.clock() if now is None else now
        return self._event(resource, "answered")

    def upstream_stale(self, uri: str, reason: str) -> list[Command[C]]:
        """Max-Age of the last notification passed without a new one."""
        return self.upstream_event(uri, "expired", reason)

    def upstream_failed(self, uri: str, reason: str, code: str | None = None) -> list[Command[C]]:
        """A registration or poll failed, or the observation broke (it is being renewed)."""
        resource = self._resources.get(uri)
        if resource is None or not resource.observing:
            self.failures_total += 1
            return []
        self._count_failure(resource)
        return self._event(resource, "failed", reason, code)

    def _count_failure(self, resource: Resource[C]) -> None:
        self.failures_total += 1
        if resource.registering:
            resource.registering = False
            self.registration_failures_total += 1

    def upstream_event(
        self, uri: str, event: Event, reason: str | None, code: str | None = None
    ) -> list[Command[C]]:
        resource = self._resources.get(uri)
        if resource is None or not resource.observing:
            return []
        return self._event(resource, event, reason, code)

    def upstream_status(
        self, uri: str, state: State, reason: str | None, code: str | None = None
    ) -> list[Command[C]]:
        """The same as the event that leads to `state` (offline: failed, stale: expired)."""
        return self.upstream_event(uri, _EVENT_LEADING_TO[state], reason, code)

    def _event(
        self, resource: Resource[C], event: Event, reason: str | None = None,
        code: str | None = None,
    ) -> list[Command[C]]:
        """Apply `TRANSITIONS`. A status frame goes out when the state changes, or when it
        stays offline for another reason or code; never to repeat what clients know."""
        found = transition(resource.state, event, reason)
        if found is None:
            return []
        state, reason = found
        if state == resource.state and (
            state != "offline" or (resource.state_reason, resource.state_code) == (reason, code)
        ):
            return []
        resource.state, resource.state_reason, resource.state_code = state, reason, code
        text = Status(
            sub=resource.sub, uri=resource.uri, state=state, reason=reason, code=code
        ).serialize()
        resource.last_status = None if state == "online" else text
        if not resource.subscribers:
            return []
        return [Deliver(resource.subscribers, text)]

    # -- frames made by another hub (a cluster's owner of the resource) ----------------------

    def relay(self, uri: str, text: str, cbor_value: bytes | None = None) -> list[Command[C]]:
        """A notify or status frame another hub made for `uri` (the node that owns it in a
        cluster): take it as this hub's own, as if it had come from the sensor here, and
        deliver the same text (`cbor_value`: the value's CBOR data item as the sensor sent
        it, for CBOR clients). A notify no newer than the one held is dropped (a copy, or
        one overtaken), so that each `seq` reaches a subscriber once. Conditional
        subscriptions judge it as they judge an update from the sensor."""
        resource = self._resources.get(uri)
        if resource is None or not resource.observing:
            return []
        frame = json.loads(text)
        if frame.get("type") == "notify":
            seq = frame["seq"]
            previous_seq, previous_header = resource.seq, resource.last_header
            if not self._take_notify(resource, frame, text, cbor_value):
                return []
            resource.notifications += 1
            self.updates_total += 1
            if resource.state != "online":
                resource.state, resource.state_reason, resource.state_code = "online", None, None
                resource.last_status = None
            if not resource.subscribers:
                return []
            # What changed since the previous update, for compact clients: known only when
            # this hub holds that update (else the frame goes complete).
            header = resource.last_header
            changed = None if previous_header is None or previous_seq != seq - 1 \
                or header is None else tuple(
                    name for name, old, new
                    in zip(HEADER_FIELDS[1:], previous_header, header, strict=True)
                    if old != new
                )
            meta = NotifyMeta(seq, cbor_value, changed)
            if resource.watches is None:
                self.deliveries_total += len(resource.subscribers)
                return [Deliver(resource.subscribers, text, resource.sub, meta)]
            body = {key: frame[key] for key in _VALUE_FIELDS if key in frame}
            return self._conditional_update(resource, text, body, meta)
        state: State = frame["state"]
        reason, code = frame.get("reason"), frame.get("code")
        if (state, reason, code) == (
            resource.state, resource.state_reason, resource.state_code
        ):
            return []  # nothing clients do not know (a copy)
        resource.state, resource.state_reason, resource.state_code = state, reason, code
        resource.last_status = None if state == "online" else text
        return [Deliver(resource.subscribers, text)] if resource.subscribers else []

    def seed(self, uri: str, text: str, cbor_value: bytes | None = None) -> None:
        """Continue `uri`'s numbering from a notify frame another hub made (the latest one a
        cluster kept): the next update here gets the next `seq`, and says what changed since
        that one. Nothing is delivered; a status frame (the latest one may be) says nothing
        of the numbering."""
        frame = json.loads(text)
        if frame.get("type") == "notify":
            self._take_notify(self._resource(uri), frame, text, cbor_value)

    def wants_history(self, uri: str, since: Since) -> bool:
        """Whether a subscribe to `uri` with `since` names this hub's numbering of the
        resource (its epoch) but this hub's history cannot answer it: a cluster's node then
        reads the frames its cluster kept (`preload`) before it subscribes the client."""
        resource = self._resources.get(uri)
        if resource is not None:
            sub = resource.sub
        elif self._sub_for is not None:
            sub = self._sub_for(uri)
        else:
            return False  # a resource this hub never numbered: no epoch of it to resume
        if since.epoch != f"{self.epoch}-{sub}":
            return False
        return resource is None or self._replay(resource, since) is None

    def preload(self, uri: str, frames: Iterable[tuple[str, bytes | None]]) -> None:
        """Take the notify frames another hub made for `uri` (`frames`: the text and the
        value's CBOR item, as a cluster's stream keeps them) into its history, so that a
        client that resumes here with `since` is answered from them as from frames relayed
        here. Nothing is delivered, and the resource is made known as `subscribe` would.

        While this hub relays the resource (observes it), only frames older than its latest
        are taken: newer ones reach it, and its subscribers, as relayed frames. Otherwise the
        newest frame becomes the latest value. The numbering never goes back, frames this hub
        holds win over copies, and the history stays contiguous (frames that a gap separates
        from the newest are left out)."""
        taken: dict[int, tuple[str, bytes | None]] = {}
        for text, cbor_value in frames:
            try:
                frame = json.loads(text)
            except ValueError:
                continue  # not a hub's frame (a foreign publisher's): nothing to resume with
            if not isinstance(frame, dict) or frame.get("type") != "notify":
                continue
            seq, ts = frame.get("seq"), frame.get("ts")
            if isinstance(seq, int) and seq > 0 and (ts is None or isinstance(ts, int | float)):
                taken[seq] = (text, cbor_value)
        resource = self._resources.get(uri)
        if not taken or (resource is not None and resource.observing
                         and resource.last_notify is None):
            # Observed here and its first frame still on its way: taking that frame now
            # would make its relay a copy, and its subscribers would never get it.
            return
        resource = self._resource(uri)
        if resource.last_notify is not None:
            taken.update((seq, (text, None)) for seq, text in self.history.kept(uri))
            taken[resource.seq] = (resource.last_notify, resource.last_cbor)
            if resource.observing:
                taken = {seq: frame for seq, frame in taken.items() if seq <= resource.seq}
        newest = max(taken)
        if newest > resource.seq or resource.last_notify is None:
            text, cbor_value = taken[newest]
            self.history.forget(uri)  # rebuilt below: `_take_notify` records the old latest
            self._take_notify(resource, json.loads(text), text, cbor_value)
        oldest = newest
        while oldest - 1 in taken and newest - oldest + 1 < self.history.size:
            oldest -= 1
        self.history.forget(uri)
        for seq in range(oldest, newest):
            self.history.record(uri, seq, taken[seq][0])
        if not (resource.observing or resource.subscribers or resource.pinned
                or resource.name is not None):
            # Known but unwatched until the client subscribes: within the idle bounds.
            self.idle_bytes -= self._idle.pop(uri, 0)
            self._remember_idle(resource)

    def rebase(self, uri: str) -> None:
        """Forget `uri`'s numbering, so that the next relayed notify is taken whatever its
        `seq`: this node numbered the resource by itself while cut off from its cluster, and
        goes back to the cluster's numbering."""
        resource = self._resources.get(uri)
        if resource is not None:
            resource.seq, resource.last_notify = 0, None
            resource.last_header = resource.last_cbor = None
            self.history.forget(uri)

    def _take_notify(
        self, resource: Resource[C], frame: dict[str, JSONValue], text: str,
        cbor_value: bytes | None,
    ) -> bool:
        seq, ts = frame["seq"], frame.get("ts")
        assert isinstance(seq, int) and (ts is None or isinstance(ts, int | float))
        if seq <= resource.seq and resource.last_notify is not None:
            return False
        if resource.last_notify is not None:
            self.history.record(resource.uri, resource.seq, resource.last_notify)
        resource.seq, resource.last_notify, resource.last_ts = seq, text, ts
        resource.last_update = ts
        code, cf, max_age = frame.get("code"), frame.get("cf"), frame.get("max_age")
        resource.last_header = (
            (code, cf, max_age)
            if isinstance(code, str) and (cf is None or isinstance(cf, int))
            and isinstance(max_age, int) else None
        )
        resource.last_cbor = cbor_value
        return True

    # -- resources that come and go (the Resource Directory) --------------------------------

    def withdraw(self, uri: str, reason: str) -> list[Command[C]]:
        """`uri` is gone from the catalogue (its registration expired or was removed): stop
        observing it, tell its subscribers it is offline and why, and keep their
        subscriptions for the endpoint's return (`move` or `restore`)."""
        resource = self._resources.get(uri)
        if resource is None:
            return []
        commands: list[Command[C]] = []
        if resource.observing:
            resource.observing = False
            self.observing_count -= 1
            resource.linger_generation += 1
            self._end_linger(uri)
            commands.append(StopObservation(uri))
        commands.extend(self._event(resource, "failed", reason))
        if not resource.subscribers and not resource.pinned and resource.name is None:
            self._remember_idle(resource)
        return commands

    def move(self, old: str, new: str) -> list[Command[C]]:
        """The resource at `old` is now at `new` (its endpoint registered from another
        address): its subscriptions, `sub` and `seq` go with it and observe `new`. When `new`
        is already watched on its own the two cannot be merged (each has its `sub`): the
        subscribers of `old` stay where they are."""
        resource = self._resources.get(old)
        if resource is None or old == new:
            return self.restore(new)
        if self._sub_for is not None:
            # A cluster names `sub` and numbers `seq` by URI, the same on every node: the
            # subscription cannot take them to another URI. Say so rather than go silent.
            return self.withdraw(old, f"the endpoint moved to {new}; in a cluster a "
                                 "subscription does not follow it: subscribe again")
        existing = self._resources.get(new)
        if existing is not None:
            if existing.subscribers or existing.observing or existing.pinned:
                return []
            self.idle_bytes -= self._idle.pop(new, 0)
            del self._resources[new]
            self.history.forget(new)
        commands: list[Command[C]] = []
        if resource.observing:
            resource.observing = False
            self.observing_count -= 1
            resource.linger_generation += 1
            self._end_linger(old)
            commands.append(StopObservation(old))
        del self._resources[old]
        self.idle_bytes -= self._idle.pop(old, 0)
        self.history.forget(old)
        resource.uri = new
        self._resources[new] = resource
        if resource.subscribers:
            commands.extend(self._start(resource))
        elif not resource.pinned and resource.name is None:
            self._remember_idle(resource)
        return commands

    def restore(self, uri: str) -> list[Command[C]]:
        """`uri` is back in the catalogue at the same address: observe it again for the
        subscriptions that waited."""
        resource = self._resources.get(uri)
        if resource is None or resource.observing or not resource.subscribers:
            return []
        return self._start(resource)

    # -- discovery and listing ---------------------------------------------------------------

    def set_links(self, origin: str, link_format: str) -> None:
        """Record what `origin`'s /.well-known/core (link-format text) lists, replacing what
        it listed before. Raises ValueError for malformed link-format."""
        links = parse_link_format(link_format)
        found: dict[str, LinkInfo] = {}
        for link in links:
            href = link.get("href")
            if not isinstance(href, str):
                continue
            try:
                uri = str(parse_coap_uri(_resolve_href(origin, href)))
            except UriError:
                continue
            found.setdefault(uri, LinkInfo(
                cf=_first_int(_attr_str(link.get("ct"))),
                rt=_attr_str(link.get("rt")),
                interface=_attr_str(link.get("if")),
                observable=True if "obs" in link else None,
            ))
        for uri in self._links_by_origin.get(origin, ()):
            self._links.pop(uri, None)
        self._links_by_origin[origin] = tuple(found)
        self._links.update(found)

    def catalogued(self, uri: str) -> bool:
        """Whether `uri` is known from the operator's side: a configured sensor, or a link
        discovered at a configured sensor's host (not only because a client subscribed)."""
        return uri in self._links or uri in self._sensor_uri_set

    def list_entries(self, allowed: Callable[[str], bool]) -> list[dict[str, JSONValue]]:
        """One entry per known resource: configured, discovered, or subscribed to."""
        uris = dict.fromkeys([*self.sensor_uris.values(), *self._links, *self._resources])
        entries = []
        for uri in uris:
            if not allowed(uri):
                continue
            resource = self._resources.get(uri)
            link = self._links.get(uri)
            observable = resource.observable if resource and resource.observable is not None \
                else (link.observable if link else None)
            entry: dict[str, JSONValue] = {
                "uri": uri,
                "name": resource.name if resource else None,
                "observable": observable,
                "cf": link.cf if link else None,
                "rt": link.rt if link else None,
                "if": link.interface if link else None,
            }
            if resource is not None:
                entry["sub"] = resource.sub
                entry["state"] = resource.state
                entry["subscribers"] = len(resource.subscribers)
                entry["notifications"] = resource.notifications
                entry["registrations"] = resource.registrations
                entry["last_update"] = resource.last_update
                if resource.last_notify is not None:
                    entry.update(_value_fields(resource.last_notify))
                    entry["ts"] = resource.last_ts
            entries.append(entry)
        return entries
