"""The CoAP side: the one aiocoap client context, supervised upstream observations and requests.

It owns I/O toward the sensors and nothing else. What arrives is reported through the
`ObservationListener` given at construction as plain values (`CoapAnswer`) and short reasons,
so this module knows nothing of the hub, the frames or WebSockets.

Supervision. Each upstream observation is one named task (``observe <uri>``), kept until the
hub stops it, that runs this loop for as long as it lives::

    register: GET with Observe = 0 ──answer with Observe──▶ follow: `async for` over aiocoap's
        │  (registration_timeout)                            observation, in order (RFC 7641
        │                                                    §3.4), block-wise completed
        │                                                    (RFC 7959 §2.6), Max-Age watched
        ├──answer without Observe──▶ poll: GET every max(Max-Age, poll_min) until one fails
        │                                                         │
        │ no answer, RST, ICMP, 4.xx/5.xx                         │ ended by the sensor, an
        ▼                                                         ▼ error, or silent for
    wait: backoff_min doubling to backoff_max, jitter ◀──────────── Max-Age + grace
        └──▶ register again

The decisions are small pure objects, tested without sockets: `ObserveOrder` (is this
notification newer than the last one accepted?), `backoff_delay` (how long to wait before
registration attempt n) and `Freshness` (when is the value stale, when is the observation
silent). The timing uses one timer per observation, for the registration's deadline and then
the notifications' freshness, that re-arms itself lazily at most once per Max-Age: a
notification only records the time it arrived, so there is no task and no timer operation per
notification. When the observation is silent, the timer ends aiocoap's observation with an
error (`_Silence`), which ends the `async for` over it.

Memory. Everything above is held once per observed resource, next to aiocoap's own objects
for the observation (its request, the first response, the request's state: ~5.5 KiB), so the
gateway's share is kept small: the supervision task's one coroutine calls the steps of a
registration in turn and iterates the notifications itself (a coroutine frame per nested
step would stay allocated), the task and its timer share one context, the bookkeeping has
slots, and the address of a sensor is resolved once and shared by the registrations there
(`_address`).

Registrations and polls are NON requests: the registration timeout and the backoff are their
retransmission. A CON that the gateway gave up on would stay in aiocoap's retransmission
(aiocoap cannot cancel it), hold back every later CON to the same sensor (NSTART = 1), reach
the sensor long after as a registration nobody listens to, and fail every other request to
that sensor when its retransmissions run out. Block fetches and client commands stay CON.

Stopping an observation deregisters it at the sensor (a CON GET with Observe = 1 and the
observation's token, RFC 7641 §3.6) so that a sensor notifying with NON stops at once rather
than talking to a gateway that ignores it. Whenever an observation is replaced, the old one
is deregistered before the new registration goes out, so that a sensor never holds more
than one observation of a resource from the gateway: one given up for silence or broken by
an error, and a registration that got no answer (the answer may be what was lost), is
deregistered with NON, once at once and once more after the next successful registration.
(An OSCORE observation cannot be deregistered that way; it is dropped at once.)

Block-wise representations (RFC 7959), of notifications, poll answers and client requests
alike, are completed by one fetcher, `_complete`, bounded by ``max_representation``
(``[limits] max_upstream_bytes``): it stops at the first block that takes the representation
past the limit, or before fetching anything when the sensor's Size2 announces more (every
request asks for Size2). Client requests keep aiocoap's Block1 handling for request payloads
larger than one message (`_Block1Request`), which hands over the response's first block.
A representation over the limit is an `upstream_error` for a request, and for an observation
an answer without payload that says how large it was (`CoapAnswer.too_large`).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
import weakref
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final, Literal, Protocol

import aiocoap
from aiocoap import error as coap_error
from aiocoap.numbers.codes import Code
from aiocoap.protocol import BlockwiseRequest

from . import compat
from .coap_security import client_context, close_client_context
from .config import SupervisionConfig
from .udp_batch import readers_of
from .uris import UriError, parse_coap_uri

log = logging.getLogger(__name__)

DEREGISTRATION_TIMEOUT: Final = 2.0
"""How long a stop waits for the sensor to confirm the deregistration before dropping it."""
DISCOVERY_TIMEOUT: Final = 5.0
DEFAULT_MAX_AGE: Final = 60
"""RFC 7252 §5.10.5: a response without Max-Age is fresh for 60 seconds."""
MAX_GRACE: Final = 10.0
"""The default grace is the smaller of this and `GRACE_SHARE` of Max-Age."""
GRACE_SHARE: Final = 0.1
JITTER: Final = 0.2
"""A backoff delay is shortened by a random share of up to this much, so that many
observations failing together do not register again in lockstep."""
MAX_ORPHANS: Final = 4
"""Registrations given up (silence, an error, no answer) that are deregistered once more
after the next successful registration, at most (`CoapSide._abandon`)."""
MAX_BLOCK_RESTARTS: Final = 2
"""A block-wise fetch whose representation changed under it (another ETag) starts over from
block 0 at most this many times before it gives up and waits for the next notification."""

OBSERVE_MODULUS: Final = 1 << 24
"""Observe option values are 24-bit sequence numbers (RFC 7641 §3.4)."""
OBSERVE_WINDOW: Final = 1 << 23
OBSERVATION_RESET_TIME: Final = 128.0
"""RFC 7641 §3.4: a notification this many seconds after the newest one is newer, whatever
its sequence number says."""

_UNRELIABLE: Final = aiocoap.Unreliable()
"""NON: registrations, polls and deregistrations after silence (see the module docstring).
One instance for all of them: it only carries constants."""

_METHOD_CODES: Final = {
    "GET": Code.GET,
    "POST": Code.POST,
    "PUT": Code.PUT,
    "DELETE": Code.DELETE,
    "FETCH": Code.FETCH,
    "PATCH": Code.PATCH,
    "iPATCH": Code.iPATCH,
}


@dataclass(frozen=True, slots=True)
class CoapAnswer:
    """One CoAP response or notification, as plain values (block-wise ones reassembled)."""

    code: str
    cf: int | None
    payload: bytes
    max_age: int | None
    observe: int | None
    observable: bool | None = None
    """On the answer to a registration: whether the sensor accepted the observation (the
    answer carried Observe). None on notifications and poll answers: they do not say."""
    too_large: int | None = None
    """Set when the representation exceeded ``max_representation`` and was dropped (then
    `payload` is empty): the bytes received before the gateway stopped, or the size the
    sensor announced in Size2."""


class UpstreamError(Exception):
    """A request's sensor is unreachable or reset it (protocol error `upstream_error`)."""


class RepresentationTooLarge(UpstreamError):
    """A representation exceeded the limit (``[limits] max_upstream_bytes``).

    `size` is what was known when the gateway stopped: the bytes received, or the size the
    sensor announced in Size2. `answer` is the representation's answer without its payload
    (code, Content-Format, Max-Age, Observe of its first block), with `too_large` set.
    """

    def __init__(self, limit: int, size: int, announced: bool, head: Any) -> None:
        how = "announced in Size2" if announced else "received before stopping"
        super().__init__(
            f"representation larger than max_upstream_bytes ({limit} bytes): "
            f"{size} bytes {how}"
        )
        self.limit = limit
        self.size = size
        self.answer = replace(to_answer(head, with_payload=False), too_large=size)


BlockFetcher = Callable[[int, int], Awaitable[Any]]
"""Fetches block `number` of a representation with block size 2 ** (`size_exponent` + 4)
and returns the sensor's response (an aiocoap message)."""


class _Block1Request(BlockwiseRequest):  # type: ignore[misc]  # aiocoap is untyped
    """aiocoap's block-wise client request, for its Block1 half only.

    aiocoap sends a request payload larger than one message in Block1 blocks (RFC 7959 §2.5)
    and then would assemble a block-wise response whole, whatever its size. Here it stops
    after the first response block, which the caller completes with its bounded fetcher.
    """

    @classmethod
    async def _complete_by_requesting_block2(
        cls, protocol: Any, request_to_repeat: Any, initial_response: Any, log: Any
    ) -> Any:
        return initial_response


class ObservationListener(Protocol):
    """What the supervised observations report, one call per event, in order per URI."""

    def registering(self, uri: str) -> None:
        """A registration (GET with Observe = 0) for `uri` is being sent."""

    def answer(self, uri: str, answer: CoapAnswer) -> None:
        """The sensor answered on the observation of `uri`: the registration's answer, a
        notification (newer than every one reported before), or a poll answer that differs
        from the previous one. 4.xx and 5.xx answers are reported here too, and so are
        representations larger than the limit: without payload, with `too_large` set."""

    def unchanged(self, uri: str) -> None:
        """A poll of `uri` (not observable) got the same answer as before."""

    def stale(self, uri: str, reason: str) -> None:
        """Max-Age of the last notification of `uri` passed without a new one."""

    def failed(self, uri: str, reason: str) -> None:
        """A registration or poll of `uri` failed, or its observation broke; a new
        registration follows after a backoff delay."""


def _code_text(code: Any) -> str:
    return str(code.dotted)  # "2.05"


def to_answer(message: aiocoap.Message, *, with_payload: bool = True) -> CoapAnswer:
    cf = message.opt.content_format
    return CoapAnswer(
        code=_code_text(message.code),
        cf=None if cf is None else int(cf),
        payload=bytes(message.payload) if with_payload else b"",
        max_age=message.opt.max_age,
        observe=message.opt.observe,
    )


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


# ---------------------------------------------------------------------------------------------
# Pure decisions
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


def backoff_delay(attempt: int, minimum: float, maximum: float, jitter: float) -> float:
    """Seconds to wait before registration attempt `attempt` (0 = the first retry).

    `minimum` doubling per attempt, capped at `maximum`, then shortened by `jitter` (a number
    in [0, 1), usually random) times `JITTER`: attempt 0 waits between 0.8 and 1 times
    `minimum`, and no wait is ever longer than `maximum`.
    """
    base = min(maximum, minimum * 2.0 ** min(attempt, 64))
    return base * (1.0 - JITTER * min(max(jitter, 0.0), 1.0))


def default_grace(max_age: float) -> float:
    """The smaller of 10 s and 10 % of Max-Age."""
    return min(MAX_GRACE, GRACE_SHARE * max_age)


Verdict = Literal["fresh", "stale", "silent"]


class Freshness:
    """When the last notification of an observation goes stale, and when it is silent.

    `heard()` records a notification (its time and Max-Age); `check(now)` says:

    - ``fresh`` until Max-Age has passed since;
    - ``stale`` once, when Max-Age has passed without another notification;
    - ``silent`` once Max-Age plus the grace has passed, and after ``stale``: time to
      register again.

    A Max-Age of 0 ("do not cache") promises nothing about when the next notification comes:
    it is never reported stale, and silence is judged by the 60 s default instead.
    """

    __slots__ = ("grace", "heard_at", "max_age", "stale")

    def __init__(self, grace: float | None = None) -> None:
        self.grace = grace
        self.heard_at = 0.0
        self.max_age = DEFAULT_MAX_AGE
        self.stale = False

    def heard(self, now: float, max_age: int | None) -> None:
        self.heard_at = now
        self.max_age = DEFAULT_MAX_AGE if max_age is None else max_age
        self.stale = False

    @property
    def stale_at(self) -> float:
        return self.heard_at + self.max_age

    @property
    def silent_at(self) -> float:
        horizon = self.max_age if self.max_age > 0 else DEFAULT_MAX_AGE
        grace = default_grace(horizon) if self.grace is None else self.grace
        return self.heard_at + horizon + grace

    @property
    def next_check(self) -> float:
        """When `check` can next give another answer than ``fresh``."""
        if self.stale or self.max_age <= 0:
            return self.silent_at
        return self.stale_at

    def check(self, now: float) -> Verdict:
        # Stale comes first even when the check runs late, past the silence too: a client
        # always hears that its value went stale before the observation is renewed.
        if not self.stale and self.max_age > 0 and now >= self.stale_at:
            self.stale = True
            return "stale"
        if now >= self.silent_at:
            return "silent"
        return "fresh"


def poll_interval(max_age: int | None, poll_min: float) -> float:
    """A resource without Observe is polled at the larger of its Max-Age and `poll_min`."""
    return max(float(DEFAULT_MAX_AGE if max_age is None else max_age), poll_min)


# ---------------------------------------------------------------------------------------------
# I/O
# ---------------------------------------------------------------------------------------------


class _Observation:
    """The bookkeeping of one supervised upstream observation (one per observed resource, so
    with slots: a dict per instance would cost more than the fields)."""

    __slots__ = (
        "deadline", "fetch", "following", "freshness", "orphans", "registering", "registration",
        "side", "stopping", "task", "timer", "uri",
    )

    def __init__(self, uri: str, grace: float | None, side: CoapSide) -> None:
        self.uri = uri
        self.side = side
        self.task: asyncio.Task[None] | None = None
        self.stopping = False
        self.registering: Any = None
        """aiocoap's request of a registration waiting for its answer, until `deadline`."""
        self.deadline = 0.0
        self.registration: aiocoap.Message | None = None
        """The request of the registration being followed (its token and address identify
        the observation at the sensor, for the deregistration)."""
        self.fetch: asyncio.Task[None] | None = None
        """The block-wise completion of the newest partial notification, if one is running."""
        self.freshness = Freshness(grace)
        self.orphans: tuple[aiocoap.Message, ...] = ()
        """The requests of registrations given up since the last successful one (`_abandon`),
        to deregister once the sensor answers again. The requests alone: their answers are
        not needed for that."""
        self.following: Any = None
        """aiocoap's observation (`ClientObservation`) whose notifications are iterated,
        while they are: ending it ends the iteration."""
        self.timer: asyncio.TimerHandle | None = None
        """The one timer of the observation, for whatever is due first: the registration's
        deadline or the notifications' freshness (`CoapSide._arm`, `CoapSide._check`)."""

    def __call__(self) -> None:
        # The timer calls the observation itself: a bound method and an argument tuple per
        # armed timer would be ~110 bytes more per observation.
        self.side._check(self)


class _Silence(coap_error.NetworkError):  # type: ignore[misc]  # aiocoap is untyped
    """Ends the iteration over an observation that stayed silent past Max-Age + grace.

    It is raised into aiocoap's observation with `ClientObservation.error`, the way aiocoap
    itself ends one that failed. A NetworkError because aiocoap's iterator, when dropped,
    takes those as already reported rather than complaining about an unexpected exception.
    """


def _forget(request: Any) -> None:
    """Free an aiocoap request's token and stop its retransmissions, whatever its state."""
    if not request.response.done():
        request.response.cancel()  # also ends the request's interest (and retransmissions)
        return
    observation = request.observation
    if observation is not None and not observation.cancelled:
        observation.cancel()
    # aiocoap acts on a cancelled observation only when its next notification arrives; a
    # silent sensor never sends one, so the token would stay registered for good.
    compat.stop_interest(request)


class CoapSide:
    """The aiocoap client context and everything that runs on it."""

    def __init__(
        self,
        listener: ObservationListener,
        supervision: SupervisionConfig | None = None,
        *,
        max_representation: int = 1_048_576,
        rng: random.Random | None = None,
        credentials: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        self._listener = listener
        self.supervision = supervision or SupervisionConfig()
        self.max_representation = max_representation
        self._rng = rng or random.Random()
        self._credentials = dict(credentials or {})
        """aiocoap client credentials (`translator.credentials.client_credentials`)."""
        self._context: aiocoap.Context | None = None
        self._observations: dict[str, _Observation] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._shared = contextvars.copy_context()
        """The context of every supervision task and freshness timer, instead of a copy
        each (~60 bytes per observation for each): none of them sets a context variable
        that would have to stay apart (aiocoap's UDP transport sets and clears one within
        a single call)."""
        self._remotes: weakref.WeakValueDictionary[str, Any] | None = (
            None if any("oscore" in item for item in self._credentials.values())
            else weakref.WeakValueDictionary()
        )
        """Sensor origin (``coap://`` with an IP literal) -> the address aiocoap resolved
        for a registration there, while a registration still uses it; see `_address`.
        None when OSCORE is configured: its transport must pick requests by their URI and
        wrap the address itself."""
        self._resolving: dict[str, asyncio.Future[Any]] = {}
        """Origin -> the resolution of its address in progress (`_address`)."""

    async def start(self) -> None:
        # UDP, plus DTLS and OSCORE when credentials ask for them: the defaults would also
        # open TCP/WebSocket/TLS client transports the gateway does not use.
        self._context = await client_context(self._credentials)

    async def shutdown(self) -> None:
        """Deregister every observation at its sensor, then close the context."""
        for uri in list(self._observations):
            self.stop_observation(uri)
        if self._stopping:
            await asyncio.wait(self._stopping, timeout=DEREGISTRATION_TIMEOUT + 1)
        if self._context is not None:
            await close_client_context(self._context)
            self._context = None

    @property
    def context(self) -> aiocoap.Context:
        if self._context is None:
            raise RuntimeError("the CoAP side is not started")
        return self._context

    @property
    def dropped(self) -> dict[str, int]:
        """What the CoAP socket dropped, by kind (``coap.unmatched``, ``coap.request``,
        ``coap.icmp-unmatched``...): datagrams and ICMP errors that answered nothing in
        flight, could not be handled, or were too long (translator/udp_batch.py)."""
        counts: dict[str, int] = {}
        if self._context is not None:
            for reader in readers_of(self._context):
                for kind, count in reader.dropped.items():
                    counts[kind] = counts.get(kind, 0) + count
        return counts

    @property
    def observed(self) -> tuple[str, ...]:
        """The URIs with a supervised observation (registered, registering or waiting)."""
        return tuple(self._observations)

    @property
    def busy(self) -> int:
        """Observation tasks still running, deregistrations included."""
        running = sum(1 for o in self._observations.values() if o.task and not o.task.done())
        return running + len(self._stopping)

    # -- observations: lifecycle -------------------------------------------------------------

    def start_observation(self, uri: str) -> None:
        """Observe `uri`, supervised, until `stop_observation` (no-op when already running)."""
        current = self._observations.get(uri)
        if current is not None and not current.stopping:
            return
        observation = _Observation(uri, self.supervision.grace, self)
        self._observations[uri] = observation
        # Named by its URI alone: that string is held anyway, "observe <uri>" would be
        # another ~90 bytes per observation.
        observation.task = asyncio.create_task(
            self._supervise(observation), name=uri, context=self._shared
        )

    def stop_observation(self, uri: str) -> None:
        observation = self._observations.pop(uri, None)
        if observation is None or observation.stopping:
            return
        observation.stopping = True
        task = asyncio.create_task(self._stop(observation), name=f"deregister {uri}")
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _stop(self, observation: _Observation) -> None:
        task = observation.task
        if task is None or task.done():
            return
        registration = observation.registration
        if (registration is not None and self._send_deregistration(registration)) or (
            registration is None and observation.registering is not None
        ):
            # The sensor's answer to the deregistration ends aiocoap's observation, and
            # with it the task. A registration still waiting for its answer is let finish:
            # if the sensor accepts it, the task deregisters it at once (`_registered`).
            # (Nothing to wait for when nothing could be sent, as for OSCORE.)
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), DEREGISTRATION_TIMEOUT)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # -- observations: reports (never after a stop) ------------------------------------------

    def _answer(self, observation: _Observation, answer: CoapAnswer) -> None:
        if not observation.stopping:
            self._listener.answer(observation.uri, answer)

    def _failed(self, observation: _Observation, reason: str) -> None:
        if not observation.stopping:
            log.info("observation of %s: %s", observation.uri, reason)
            self._listener.failed(observation.uri, reason)

    # -- observations: the supervision loop --------------------------------------------------

    async def _supervise(self, observation: _Observation) -> None:
        """Register, follow (or poll) what the sensor accepts, wait after it ends or fails,
        and again, until the observation is stopped.

        The steps are helpers called from here in turn, and the notifications are iterated
        here too, rather than in coroutines awaiting each other: every coroutine on the
        stack keeps its frame (~300 bytes) for as long as the observation is followed, and
        there is one such stack per observed resource."""
        attempt = 0
        try:
            while not observation.stopping:
                request: Any = None
                sent: Any = None
                first: Any = None
                notification: Any = None
                try:
                    request, sent = await self._register(observation)
                    first = None if request is None else await self._registered(
                        observation, request, sent
                    )
                    if first is None:
                        established = False
                    elif first.opt.observe is None or request.observation is None:
                        established = await self._poll(observation, first)
                    else:
                        established = True
                        order = self._follow(observation, request, first)
                        try:
                            async for notification in request.observation:
                                if observation.stopping:
                                    break  # the answer to our own deregistration
                                self._notified(observation, order, notification)
                            else:
                                self._followed(observation, None)
                        except (_Silence, coap_error.Error, OSError) as exc:
                            self._followed(observation, exc)
                except Exception:  # a bug here must not end the supervision; say it loudly
                    log.exception("observation of %s failed", observation.uri)
                    self._failed(observation, "internal error in the gateway")
                    established = False
                finally:
                    self._unfollow(observation)
                    if request is not None:
                        _forget(request)
                    # Nothing of this registration is kept through the wait.
                    request = sent = first = notification = None
                if observation.stopping:
                    return
                if established:
                    attempt = 0
                delay = backoff_delay(
                    attempt,
                    self.supervision.backoff_min,
                    self.supervision.backoff_max,
                    self._rng.random(),
                )
                attempt += 1
                log.debug("observation of %s: registering again in %.2f s", observation.uri,
                          delay)
                await asyncio.sleep(delay)
        finally:
            if observation.timer is not None:
                observation.timer.cancel()
                observation.timer = None
            if self._observations.get(observation.uri) is observation:
                del self._observations[observation.uri]

    async def _register(self, observation: _Observation) -> tuple[Any, aiocoap.Message | None]:
        """Send a registration (GET with Observe = 0) for the observation's URI; returns
        aiocoap's request and the message sent (aiocoap gives it its token), or None twice
        when the sensor's address was not found (reported)."""
        uri = observation.uri
        self._listener.registering(uri)
        message = aiocoap.Message(
            code=Code.GET, uri=uri, observe=0, size2=0, transport_tuning=_UNRELIABLE
        )
        origin = self._origin(uri)
        if origin is not None:
            try:
                await self._address(origin, message)
            except (coap_error.Error, OSError) as exc:
                self._failed(observation, _describe(exc))
                return None, None
        return self.context.request(message, handle_blockwise=False), message

    async def _address(self, origin: str, message: aiocoap.Message) -> None:
        """Address `message` to the sensor at `origin` (see `_origin`), resolved once for
        all the registrations there while any of them uses the address.

        aiocoap would resolve the address for each request, in a thread of the default
        executor (a burst of registrations starts a pool of threads, ~1 MiB), and keep a
        copy of it with each (~270 bytes per observation). Here one registration at a
        time resolves it, with aiocoap's own `find_remote_and_interface`, and the others
        wait for that and share the result."""
        assert self._remotes is not None
        known = self._remotes.get(origin)
        resolving = self._resolving.get(origin)
        if known is None and resolving is not None:
            await asyncio.wait([resolving])  # its failure is its own: then resolve here
            known = self._remotes.get(origin)
        if known is not None:
            message.remote = known
            return
        resolution = asyncio.ensure_future(self.context.find_remote_and_interface(message))
        self._resolving[origin] = resolution
        try:
            await resolution  # aiocoap sets `message.remote` to the address it found
        finally:
            if self._resolving.get(origin) is resolution:
                del self._resolving[origin]
        # (An address that cannot be referenced weakly, of some other transport, is not
        # shared: the next registration resolves its own.)
        with contextlib.suppress(TypeError):
            self._remotes[origin] = message.remote

    def _origin(self, uri: str) -> str | None:
        """The key of `_remotes` for `uri`: its origin when it is ``coap://`` with an IP
        literal; else None (a host name is resolved by aiocoap for every registration, so
        that a change of its address is followed)."""
        if self._remotes is None:
            return None
        try:
            parsed = parse_coap_uri(uri)
        except UriError:
            return None
        return parsed.origin if parsed.scheme == "coap" and parsed.is_ip_literal else None

    async def _registered(
        self, observation: _Observation, request: Any, sent: aiocoap.Message | None
    ) -> Any:
        """The sensor's 2.xx answer to the registration `sent`, or None once a failure (no
        answer, RST, ICMP, 4.xx/5.xx) is reported, or when the observation is being stopped.

        A registration without an answer may still have reached the sensor (the answer is
        what was lost): it is deregistered before the next one is sent (`_abandon`).

        The deadline is kept by the observation's timer, which then cancels the awaited
        answer (`_check`), rather than by an `asyncio.timeout`: its timer would stay in the
        event loop until it expired, answered or not (asyncio drops cancelled timers
        lazily), a few hundred bytes per registration of the last `registration_timeout`
        seconds."""
        timeout = self.supervision.registration_timeout
        observation.registering = request
        observation.deadline = asyncio.get_running_loop().time() + timeout
        self._arm(observation, observation.deadline)
        try:
            first = await request.response
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # the observation's task is cancelled, not the answer
            self._failed(observation, f"no answer within {timeout:g} s")
            self._abandon(observation, sent)
            return None
        except (coap_error.Error, OSError) as exc:
            self._failed(observation, _describe(exc))
            self._abandon(observation, sent)
            return None
        finally:
            observation.registering = None
            observation.deadline = 0.0  # (the deadline's float is not kept with every one)
        if observation.stopping:
            if first.code.is_successful() and first.opt.observe is not None:
                # Stopped while the answer was on its way: the sensor holds the observation
                # now, and only a deregistration ends it (its next CON notification would
                # meet an RST too, but a NON one nothing).
                self._send_deregistration(first.request, confirmable=False)
            return None
        if not first.code.is_successful():
            self._answer(observation, to_answer(first))
            return None
        return first

    def _follow(self, observation: _Observation, request: Any, first: Any) -> ObserveOrder:
        """The sensor accepted the registration `request`, answering `first` (with
        Observe): forward that and watch the notifications' freshness. Returns the order
        that later notifications must keep (`_notified`)."""
        observation.registration = first.request
        if observation.orphans:
            # The sensor is reachable again: now the deregistration of the observation
            # given up can arrive (if it still exists there).
            for orphan in observation.orphans:
                self._send_deregistration(orphan, confirmable=False)
            observation.orphans = ()
        now = asyncio.get_running_loop().time()
        order = ObserveOrder()
        order.accept(first.opt.observe, now)
        observation.freshness.heard(now, first.opt.max_age)
        self._take(observation, first, observable=True)
        observation.following = request.observation
        self._arm(observation, observation.freshness.next_check)
        return order

    def _notified(self, observation: _Observation, order: ObserveOrder, notification: Any) -> None:
        """A notification of the followed registration: forwarded when it is newer than
        every one before it (RFC 7641 §3.4), else dropped."""
        now = asyncio.get_running_loop().time()
        number = notification.opt.observe
        if number is not None and not order.accept(number, now):
            log.debug("observation of %s: dropped notification %d, older than one already"
                      " forwarded", observation.uri, number)
            return
        observation.freshness.heard(now, notification.opt.max_age)
        self._arm(observation, observation.freshness.next_check)
        self._take(observation, notification)

    def _followed(self, observation: _Observation, ended_by: BaseException | None) -> None:
        """The notifications of the followed registration ended: by the sensor (None), by
        silence (`_Silence`) or by an error. A new registration follows."""
        if observation.stopping:
            return
        if ended_by is None:
            log.info("observation of %s ended by the sensor; registering again",
                     observation.uri)
        elif isinstance(ended_by, _Silence):
            log.info("observation of %s silent for Max-Age + grace; registering again",
                     observation.uri)
            self._abandon(observation, observation.registration)
        else:
            self._failed(observation, _describe(ended_by))
            self._abandon(observation, observation.registration)

    def _abandon(self, observation: _Observation, registration: aiocoap.Message | None) -> None:
        """Give up the registration `registration`, which may hold an observation at the
        sensor, before another one is sent: a sensor must never hold more than one
        observation of a resource from the gateway (each costs a notification per update
        on the constrained network). Deregistered (RFC 7641 §3.6) now, in case the sensor
        hears us, and again after the next successful registration (`_follow`). NON,
        because a CON would hold back the re-registrations behind its retransmissions
        (aiocoap keeps NSTART = 1).

        At most `MAX_ORPHANS` wait for the second try: the first (the observation that was
        followed, when one was: it surely exists at the sensor) and the latest tries."""
        if registration is None:
            return
        self._send_deregistration(registration, confirmable=False)
        orphans = (*observation.orphans, registration)
        if len(orphans) > MAX_ORPHANS:
            orphans = (orphans[0], *orphans[len(orphans) - MAX_ORPHANS + 1 :])
        observation.orphans = orphans

    def _unfollow(self, observation: _Observation) -> None:
        """Forget the registration that was followed (or polled, or tried). Its timer may
        stay armed: it finds nothing to do, or a next registration's deadline (`_check`)."""
        observation.registration = None
        observation.following = None
        self._cancel_fetch(observation)

    def _arm(self, observation: _Observation, when: float) -> None:
        """Have the observation's timer go off by `when` (loop time). A timer armed for
        earlier stays: it re-arms itself when it finds nothing due (`_check`), so that a
        notification costs no timer operation."""
        timer = observation.timer
        if timer is not None:
            if timer.when() <= when:
                return
            timer.cancel()
        observation.timer = asyncio.get_running_loop().call_at(
            when, observation, context=self._shared
        )

    def _check(self, observation: _Observation) -> None:
        """The observation's timer went off: a registration past its deadline gets no
        more waiting; followed notifications are checked for freshness (stale at Max-Age,
        silent at Max-Age + grace)."""
        observation.timer = None
        if observation.stopping:
            return
        now = asyncio.get_running_loop().time()
        registering = observation.registering
        if registering is not None:
            if now < observation.deadline:
                self._arm(observation, observation.deadline)
            else:
                registering.response.cancel()  # `_registered` takes it as the timeout
            return
        following = observation.following
        if following is None:
            return  # between registrations: nothing is due
        verdict = observation.freshness.check(now)
        if verdict == "silent":
            if not following.cancelled:  # else its iteration is ending already
                following.error(_Silence())  # ends the `async for` in `_supervise`
            return
        if verdict == "stale":
            max_age = observation.freshness.max_age
            reason = f"no notification within Max-Age ({max_age} s)"
            log.info("observation of %s: %s", observation.uri, reason)
            self._listener.stale(observation.uri, reason)
        self._arm(observation, observation.freshness.next_check)

    # -- observations: block-wise notifications (RFC 7959 §2.6) ------------------------------

    def _take(
        self, observation: _Observation, message: Any, observable: bool | None = None
    ) -> None:
        """Forward a response or notification that passed the order check: at once when it
        is whole, else after fetching its other blocks. Either way it supersedes a fetch
        still running for an older notification."""
        self._cancel_fetch(observation)
        block2 = message.opt.block2
        if block2 is None or not block2.more:
            try:
                self._check_size(message, message, len(message.payload))
                answer = to_answer(message)
            except RepresentationTooLarge as exc:
                log.info("observation of %s: %s", observation.uri, exc)
                answer = exc.answer
            if observable is not None:
                answer = replace(answer, observable=observable)
            self._answer(observation, answer)
            return
        observation.fetch = asyncio.create_task(
            self._fetch_rest(observation, message, observable), name=f"blocks {observation.uri}"
        )

    def _cancel_fetch(self, observation: _Observation) -> None:
        fetch, observation.fetch = observation.fetch, None
        if fetch is not None and not fetch.done():
            log.debug("observation of %s: a newer notification supersedes a block-wise fetch",
                      observation.uri)
            fetch.cancel()

    async def _fetch_rest(
        self, observation: _Observation, first_block: Any, observable: bool | None
    ) -> None:
        try:
            answer = await self._complete_observed(observation, first_block)
        except (TimeoutError, coap_error.Error, OSError, UpstreamError) as exc:
            log.info("observation of %s: block-wise notification dropped: %s",
                     observation.uri, _describe(exc))
            return
        except Exception:  # a bug: say it loudly; the observation goes on
            log.exception("observation of %s: block-wise fetch failed", observation.uri)
            return
        if answer is not None and observation.fetch is asyncio.current_task():
            observation.fetch = None
            self._answer(observation, replace(answer, observable=observable))

    async def _complete_observed(
        self, observation: _Observation, first: Any
    ) -> CoapAnswer | None:
        """The whole representation that `first` starts, fetching its other blocks; one too
        large comes back as its size-only answer, so that subscribers are told (a notify
        without the payload) rather than left guessing. Other failures raise."""
        try:
            return await self._complete(
                observation.uri, first, self._observed_blocks(observation.uri)
            )
        except RepresentationTooLarge as exc:
            log.info("observation of %s: %s", observation.uri, exc)
            return exc.answer

    def _observed_blocks(self, uri: str) -> BlockFetcher:
        """The later blocks of an observed resource's representation: GETs with a fresh token
        and no Observe (RFC 7959 §2.6), each timed out like a registration."""

        def fetch(number: int, size_exponent: int) -> Awaitable[Any]:
            message = aiocoap.Message(
                code=Code.GET, uri=uri, block2=(number, False, size_exponent), size2=0
            )
            return self._get_block(message, self.supervision.registration_timeout)

        return fetch

    def _check_size(self, message: Any, head: Any, size: int) -> None:
        """Raise RepresentationTooLarge when `size` bytes of the representation that starts
        with `head` are more than the limit, or when `message` (a block with more to come)
        announces more in Size2."""
        limit = self.max_representation
        if size > limit:
            raise RepresentationTooLarge(limit, size, False, head)
        block2 = message.opt.block2
        announced = message.opt.size2
        if block2 is not None and block2.more and announced is not None and announced > limit:
            raise RepresentationTooLarge(limit, int(announced), True, head)

    async def _complete(
        self, uri: str, first_block: Any, fetch: BlockFetcher,
        restarts: int = MAX_BLOCK_RESTARTS,
    ) -> CoapAnswer | None:
        """The whole representation whose first block is `first_block` (itself when it is
        whole), its other blocks fetched one by one with `fetch` and checked against its ETag.

        Raises RepresentationTooLarge as soon as the blocks received, or the size the sensor
        announces (Size2), exceed ``max_representation``: at most one block past the limit
        is fetched. When a later block carries another ETag the representation changed
        under us: start over from block 0, `restarts` times at most. None when it keeps
        changing.
        """
        head = first_block
        for attempt in range(restarts + 1):
            payload = bytearray(head.payload)
            self._check_size(head, head, len(payload))
            etag = head.opt.etag
            block2 = head.opt.block2
            if block2 is not None and block2.more and block2.block_number != 0:
                raise UpstreamError(f"the first block is block {block2.block_number}, not 0")
            while block2 is not None and block2.more:
                size_exponent = min(block2.size_exponent, 6)
                number = len(payload) // (1 << (size_exponent + 4))
                block = await fetch(number, size_exponent)
                if not block.code.is_successful():
                    raise UpstreamError(f"block {number} answered {_code_text(block.code)}")
                block2 = block.opt.block2
                if block2 is None:  # the sensor sent the whole thing after all
                    self._check_size(block, block, len(block.payload))
                    return to_answer(block)
                if block.opt.etag != etag:
                    log.debug("%s changed during a block-wise transfer", uri)
                    if attempt == restarts:
                        break
                    head = await fetch(0, size_exponent)
                    if not head.code.is_successful():
                        raise UpstreamError(f"block 0 answered {_code_text(head.code)}")
                    break
                if block2.start != len(payload):
                    raise UpstreamError(f"block {block2.block_number} is not the one asked for")
                payload += block.payload
                self._check_size(block, head, len(payload))
            else:
                return CoapAnswer(
                    code=_code_text(head.code),
                    cf=None if head.opt.content_format is None else int(head.opt.content_format),
                    payload=bytes(payload),
                    max_age=head.opt.max_age,
                    observe=first_block.opt.observe,
                )
        log.info("%s keeps changing during block-wise transfers", uri)
        return None

    async def _get_block(self, message: aiocoap.Message, timeout: float | None) -> Any:
        """Send one block request (a fresh token, no Observe, no aiocoap block-wise)."""
        pending = self.context.request(message, handle_blockwise=False)
        try:
            async with asyncio.timeout(timeout):
                return await pending.response
        finally:
            if not pending.response.done():
                pending.response.cancel()

    # -- observations: polling resources without Observe -------------------------------------

    async def _poll(self, observation: _Observation, first: Any) -> bool:
        """Report the registration's answer, then poll until a poll fails. True when the
        first answer could be taken whole (or was too large, which is reported too)."""
        try:
            answer = await self._complete_observed(observation, first)
        except (TimeoutError, coap_error.Error, OSError, UpstreamError) as exc:
            self._failed(observation, f"block-wise answer incomplete: {_describe(exc)}")
            return False
        if answer is None:
            return False
        self._answer(observation, replace(answer, observable=False))
        log.info("%s does not support Observe; polling it", observation.uri)
        timeout = self.supervision.registration_timeout
        while not observation.stopping:
            await asyncio.sleep(poll_interval(answer.max_age, self.supervision.poll_min))
            try:
                fresh = await self._send(
                    aiocoap.Message(
                        code=Code.GET, uri=observation.uri, size2=0,
                        transport_tuning=_UNRELIABLE,
                    ),
                    timeout,
                )
            except TimeoutError:
                self._failed(observation, f"no answer within {timeout:g} s")
                return True
            except RepresentationTooLarge as exc:
                fresh = exc.answer
            except UpstreamError as exc:
                self._failed(observation, str(exc))
                return True
            if not fresh.code.startswith("2."):
                self._answer(observation, fresh)
                return True
            if (fresh.code, fresh.cf, fresh.payload, fresh.too_large) != (
                answer.code, answer.cf, answer.payload, answer.too_large
            ):
                self._answer(observation, fresh)
            elif not observation.stopping:
                self._listener.unchanged(observation.uri)
            answer = fresh
        return True

    # -- deregistration ----------------------------------------------------------------------

    def _send_deregistration(
        self, request: aiocoap.Message, *, confirmable: bool = True
    ) -> bool:
        """Send GET with Observe = 1 under the token of the registration `request`
        (RFC 7641 §3.6); True when it was sent.

        aiocoap's public request API always picks a fresh token, so this goes one layer
        down, to the token manager's message layer. While the observation is still open
        here, the sensor's answer ends it; otherwise the answer is ignored. Nothing is sent
        for an observation that no token manager can reach: an OSCORE one (its requests are
        protected by the OSCORE transport, above the token managers).
        """
        if request.remote is None or not request.token:
            return False  # never sent
        message = request.copy(observe=1, mid=None)
        message.token = request.token
        message.remote = request.remote
        if not confirmable:
            message.mtype = None
            message.transport_tuning = _UNRELIABLE
        try:
            return compat.deregister(self.context, request, message)
        except Exception:  # the fallback (cancel) still happens in _stop
            log.debug("deregistration of %s not sent", request.remote, exc_info=True)
            return False

    # -- requests ----------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        uri: str,
        *,
        payload: bytes = b"",
        cf: int | None = None,
        accept: int | None = None,
        confirmable: bool = True,
        timeout: float = 10.0,
    ) -> CoapAnswer:
        """One CoAP request; raises TimeoutError or UpstreamError (RepresentationTooLarge
        for an answer larger than ``max_representation``)."""
        message = aiocoap.Message(
            code=_METHOD_CODES[method],
            uri=uri,
            payload=payload,
            size2=0,  # the sensor may announce a block-wise answer's size
            transport_tuning=aiocoap.Reliable() if confirmable else aiocoap.Unreliable(),
        )
        if cf is not None:
            message.opt.content_format = cf
        if accept is not None:
            message.opt.accept = accept
        return await self._send(message, timeout)

    async def _send(self, message: aiocoap.Message, timeout: float) -> CoapAnswer:
        """Send `message` (in Block1 blocks when its payload needs them) and complete a
        block-wise answer with the bounded fetcher, all within `timeout`."""
        uri = message.get_request_uri()
        pending = _Block1Request(self.context, message)
        try:
            async with asyncio.timeout(timeout):
                first = await pending.response
                # Only a GET may start over when the representation changes under it.
                restarts = MAX_BLOCK_RESTARTS if message.code == Code.GET else 0
                answer = await self._complete(
                    uri, first, self._repeated_blocks(message), restarts
                )
        except TimeoutError:
            # Frees the token. (A CON goes on being retransmitted below: aiocoap's UDP
            # message layer cannot cancel one.)
            pending.response.cancel()
            raise
        except asyncio.CancelledError:
            pending.response.cancel()
            raise
        except coap_error.Error as exc:
            raise UpstreamError(_describe(exc)) from exc
        except OSError as exc:
            raise UpstreamError(_describe(exc)) from exc
        if answer is None:
            raise UpstreamError("the representation changed during the block-wise transfer")
        return answer

    def _repeated_blocks(self, request: aiocoap.Message) -> BlockFetcher:
        """The later blocks of the answer to `request`: the request again with Block2 and a
        fresh token, without its payload (as aiocoap does; RFC 7959 §3.3), to the endpoint
        that answered."""

        def fetch(number: int, size_exponent: int) -> Awaitable[Any]:
            message = request.copy(
                payload=b"", mid=None, token=None, block1=None, observe=None,
                block2=(number, False, size_exponent),
            )
            return self._get_block(message, None)

        return fetch

    async def discover(self, origin: str) -> str:
        """GET `origin`/.well-known/core; returns the link-format text (UpstreamError)."""
        answer = await self.request(
            "GET", origin + "/.well-known/core", timeout=DISCOVERY_TIMEOUT
        )
        if not answer.code.startswith("2."):
            raise UpstreamError(f"/.well-known/core answered {answer.code}")
        return answer.payload.decode("utf-8", errors="replace")
