"""Supervised upstream observations over aiocoap: the I/O that carries out
translator/coap/supervision.py.

Each observation is one task, named by its URI and kept until the hub stops it, that runs
this loop (the phases and waits are `Supervisor`'s)::

    register: GET with Observe = 0 ──answer with Observe──▶ follow: `async for` over aiocoap's
        │  (registration_timeout)                            observation, in order (RFC 7641
        │                                                    §3.4), block-wise completed
        │                                                    (RFC 7959 §2.6), Max-Age watched
        ├──answer without Observe──▶ poll: GET every max(Max-Age, poll_min) until one fails
        │                                                         │
        │ no answer, RST, ICMP, 4.xx/5.xx                         │ ended by the sensor, an
        ▼                                                         ▼ error, or late past
    wait: backoff (slow after a 4.xx), jitter ◀─────────────────── Max-Age + grace
        └──▶ register again

What arrives is reported through the `ObservationListener` as plain values (`CoapAnswer`)
and short reasons. A representation that cannot be taken (larger than the limit, a
block-wise transfer that breaks RFC 7959 or misses ``transfer_timeout``) is reported as an
answer without payload that says why; the observation goes on.

Timing. One timer per observation, for the registration's deadline and then the
notifications' freshness, re-arms itself lazily at most once per Max-Age: a notification
only records the time it arrived, so there is no task and no timer operation per
notification. When the observation is late past Max-Age + grace, the timer reports it stale
and then ends aiocoap's observation with an error (`_Silence`), which ends the `async for`.

Memory. Everything above is held once per observed resource, next to aiocoap's own objects
for the observation (~5.5 KiB), so the gateway's share is kept small: the supervision task's
one coroutine calls the steps of a registration in turn and iterates the notifications
itself (a coroutine frame per nested step would stay allocated), the task and its timer
share one context, the bookkeeping has slots, and the address of a sensor is resolved once
and shared by the registrations there (translator/coap/addresses.py).

Registrations and polls are NON: the registration timeout and the backoff are their
retransmission. A CON that the gateway gave up on would stay in aiocoap's retransmission
(aiocoap cannot cancel it), hold back every later CON to the same sensor (NSTART = 1), and
reach the sensor long after as a registration nobody listens to. Block fetches stay CON.

Stopping an observation deregisters it at the sensor (a CON GET with Observe = 1 and the
observation's token, RFC 7641 §3.6), so that a sensor notifying with NON stops at once.
Whenever an observation is replaced, the old one is deregistered before the new
registration goes out, so that a sensor never holds more than one observation of a resource
from the gateway: one given up for silence or broken by an error, and a registration that
got no answer (the answer may be what was lost), is deregistered with NON, once at once and
once more after the next successful registration. (An OSCORE observation cannot be
deregistered that way; it is dropped at once.)

This module is over 500 lines because the supervision loop, its timer and the steps it
calls share the per-observation bookkeeping and its memory budget; split, each part would
need the others' internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
from dataclasses import replace
from typing import Any, Final, Protocol

import aiocoap
from aiocoap import error as coap_error
from aiocoap.numbers.codes import Code

from translator import compat
from translator.coap import exchanges
from translator.coap.addresses import SharedAddresses
from translator.coap.answers import (
    CoapAnswer,
    RepresentationTooLarge,
    UpstreamError,
    describe,
    to_answer,
)
from translator.coap.supervision import Event, Freshness, ObserveOrder, Supervisor, poll_interval
from translator.config import SupervisionConfig

__all__ = ["DEREGISTRATION_TIMEOUT", "MAX_ORPHANS", "ObservationListener", "Observations"]

log = logging.getLogger(__name__)

DEREGISTRATION_TIMEOUT: Final = 2.0
"""How long a stop waits for the sensor to confirm the deregistration before dropping it."""
MAX_ORPHANS: Final = 4
"""Registrations given up (silence, an error, no answer) that are deregistered once more
after the next successful registration, at most (`Observations._abandon`)."""

_UNRELIABLE: Final = aiocoap.Unreliable()
"""NON: registrations, polls and deregistrations after silence (see the module docstring).
One instance for all of them: it only carries constants."""


class ObservationListener(Protocol):
    """What the supervised observations report, one call per event, in order per URI."""

    def registering(self, uri: str) -> None:
        """A registration (GET with Observe = 0) for `uri` is being sent."""

    def answer(self, uri: str, answer: CoapAnswer) -> None:
        """The sensor answered on the observation of `uri`: the registration's answer, a
        notification (newer than every one reported before), or a poll answer that differs
        from the previous one. 4.xx and 5.xx answers are reported here too, and so are
        representations that could not be taken: without payload, with `too_large` or
        `broken` set."""

    def unchanged(self, uri: str) -> None:
        """A poll of `uri` (not observable) got the same answer as before."""

    def stale(self, uri: str, reason: str) -> None:
        """Max-Age and the grace passed since the last notification of `uri`."""

    def failed(self, uri: str, reason: str) -> None:
        """A registration or poll of `uri` failed, or its observation broke; a new
        registration follows after a backoff delay."""


def _event_of(code: Any) -> Event:
    """The supervision event of an error answer: a client error (4.xx) or a failure."""
    return "client error" if code.class_ == 4 else "failed"


class _Observation:
    """The bookkeeping of one supervised upstream observation (one per observed resource, so
    with slots: a dict per instance would cost more than the fields)."""

    __slots__ = (
        "deadline", "fetch", "following", "freshness", "orphans", "owner", "registering",
        "registration", "stopping", "task", "timer", "uri",
    )

    def __init__(self, uri: str, grace: float | None, owner: Observations) -> None:
        self.uri = uri
        self.owner = owner
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
        to deregister once the sensor answers again."""
        self.following: Any = None
        """aiocoap's observation (`ClientObservation`) whose notifications are iterated,
        while they are: ending it ends the iteration."""
        self.timer: asyncio.TimerHandle | None = None
        """The one timer of the observation, for whatever is due first: the registration's
        deadline or the notifications' freshness (`Observations._arm`, `_check`)."""

    def __call__(self) -> None:
        # The timer calls the observation itself: a bound method and an argument tuple per
        # armed timer would be ~110 bytes more per observation.
        self.owner._check(self)


class _Silence(coap_error.NetworkError):  # type: ignore[misc]  # aiocoap is untyped
    """Ends the iteration over an observation late past Max-Age + grace.

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


class Observations:
    """Every supervised observation on one aiocoap context (`context`, set once started)."""

    def __init__(
        self,
        listener: ObservationListener,
        supervision: SupervisionConfig,
        *,
        max_representation: int,
        rng: random.Random,
        share_addresses: bool,
    ) -> None:
        self._listener = listener
        self.supervision = supervision
        self.max_representation = max_representation
        self._rng = rng
        self.context: Any = None
        self._observations: dict[str, _Observation] = {}
        self._stopping: set[asyncio.Task[None]] = set()
        self._shared = contextvars.copy_context()
        """The context of every supervision task and freshness timer, instead of a copy
        each (~60 bytes per observation for each): none of them sets a context variable
        that would have to stay apart (aiocoap's UDP transport sets and clears one within
        a single call)."""
        self._addresses = SharedAddresses() if share_addresses else None
        """The sensors' addresses, resolved once for all their registrations; None when
        OSCORE is configured: its transport must pick requests by their URI and wrap the
        address itself."""

    @property
    def observed(self) -> tuple[str, ...]:
        return tuple(self._observations)

    @property
    def busy(self) -> int:
        running = sum(1 for o in self._observations.values() if o.task and not o.task.done())
        return running + len(self._stopping)

    # -- lifecycle -------------------------------------------------------------------------

    def start(self, uri: str) -> None:
        """Observe `uri`, supervised, until `stop` (no-op when already running)."""
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

    def stop(self, uri: str) -> None:
        observation = self._observations.pop(uri, None)
        if observation is None or observation.stopping:
            return
        observation.stopping = True
        task = asyncio.create_task(self._stop(observation), name=f"deregister {uri}")
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def stop_all(self) -> None:
        """Stop every observation, and wait (boundedly) for the deregistrations."""
        for uri in list(self._observations):
            self.stop(uri)
        if self._stopping:
            await asyncio.wait(self._stopping, timeout=DEREGISTRATION_TIMEOUT + 1)

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

    # -- reports (never after a stop) --------------------------------------------------------

    def _answer(self, observation: _Observation, answer: CoapAnswer) -> None:
        if not observation.stopping:
            self._listener.answer(observation.uri, answer)

    def _failed(self, observation: _Observation, reason: str) -> None:
        if not observation.stopping:
            log.info("observation of %s: %s", observation.uri, reason,
                     extra={"uri": observation.uri})
            self._listener.failed(observation.uri, reason)

    # -- the supervision loop ----------------------------------------------------------------

    async def _supervise(self, observation: _Observation) -> None:
        """Register, follow (or poll) what the sensor accepts, wait after it ends or fails,
        and again, until the observation is stopped.

        The steps are helpers called from here in turn, and the notifications are iterated
        here too, rather than in coroutines awaiting each other: every coroutine on the
        stack keeps its frame (~300 bytes) for as long as the observation is followed, and
        there is one such stack per observed resource."""
        settings = self.supervision
        supervisor = Supervisor(
            settings.backoff_min, settings.backoff_max, settings.client_error_backoff
        )
        try:
            while not observation.stopping:
                request: Any = None
                sent: Any = None
                first: Any = None
                notification: Any = None
                event: Event = "failed"
                try:
                    request, sent = await self._register(observation)
                    first = None if request is None else await self._registered(
                        observation, request, sent
                    )
                    if first is None:
                        event = "failed"
                    elif not first.code.is_successful():
                        event = _event_of(first.code)
                    elif first.opt.observe is None or request.observation is None:
                        supervisor.on("not observable")
                        event = await self._poll(observation, first)
                    else:
                        supervisor.on("observable")
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
                        # A 4.xx notification ends it too; a 5.xx one is an ending like
                        # any other: the sensor was reachable a moment ago.
                        last = notification
                        client_error = last is not None and last.code.class_ == 4
                        event = "client error" if client_error else "ended"
                except Exception:  # a bug here must not end the supervision; say it loudly
                    log.exception("observation of %s failed", observation.uri)
                    self._failed(observation, "internal error in the gateway")
                    event = "failed" if supervisor.phase == "registering" else "ended"
                finally:
                    self._unfollow(observation)
                    if request is not None:
                        _forget(request)
                    # Nothing of this registration is kept through the wait.
                    request = sent = first = notification = None
                if observation.stopping:
                    return
                delay = supervisor.on(event, self._rng.random())
                assert delay is not None
                log.debug("observation of %s: registering again in %.2f s", observation.uri,
                          delay)
                await asyncio.sleep(delay)
                supervisor.on("elapsed")
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
        if self._addresses is not None:
            try:
                await self._addresses.address(self.context, uri, message)
            except (coap_error.Error, OSError) as exc:
                self._failed(observation, describe(exc))
                return None, None
        return self.context.request(message, handle_blockwise=False), message

    async def _registered(
        self, observation: _Observation, request: Any, sent: aiocoap.Message | None
    ) -> Any:
        """The sensor's answer to the registration `sent` (an error code is reported
        here), or None once a failure (no answer, RST, ICMP) is reported, or when the
        observation is being stopped.

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
                if observation.stopping and sent is not None:
                    # Stopped with the registration unanswered: it may have reached the
                    # sensor all the same (the answer is what is missing), so it is
                    # deregistered as one given up is (`_abandon`).
                    self._send_deregistration(sent, confirmable=False)
                raise  # the observation's task is cancelled, not the answer
            self._failed(observation, f"no answer within {timeout:g} s")
            self._abandon(observation, sent)
            return None
        except (coap_error.Error, OSError) as exc:
            self._failed(observation, describe(exc))
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
        self._arm(observation, observation.freshness.late_at)
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
        self._arm(observation, observation.freshness.late_at)
        self._take(observation, notification)

    def _followed(self, observation: _Observation, ended_by: BaseException | None) -> None:
        """The notifications of the followed registration ended: by the sensor (None), by
        silence (`_Silence`) or by an error. A new registration follows."""
        if observation.stopping:
            return
        if ended_by is None:
            log.info("observation of %s ended by the sensor; registering again",
                     observation.uri, extra={"uri": observation.uri})
        elif isinstance(ended_by, _Silence):
            log.info("observation of %s late past Max-Age + grace; registering again",
                     observation.uri, extra={"uri": observation.uri})
            self._abandon(observation, observation.registration)
        else:
            self._failed(observation, describe(ended_by))
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
        more waiting; followed notifications are checked for freshness (stale, then
        silent, at Max-Age + grace)."""
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
        freshness = observation.freshness
        verdict = freshness.check(now)
        if verdict == "silent":
            if not following.cancelled:  # else its iteration is ending already
                following.error(_Silence())  # ends the `async for` in `_supervise`
            return
        if verdict == "stale":
            reason = freshness.reason()
            log.info("observation of %s: %s", observation.uri, reason,
                     extra={"uri": observation.uri})
            self._listener.stale(observation.uri, reason)
            self._arm(observation, now)  # silent now: register again
            return
        self._arm(observation, freshness.late_at)

    # -- representations (block-wise ones completed, RFC 7959 §2.6) --------------------------

    def _take(
        self, observation: _Observation, message: Any, observable: bool | None = None
    ) -> None:
        """Forward a response or notification that passed the order check: at once when it
        is whole, else after fetching its other blocks. Either way it supersedes a fetch
        still running for an older notification."""
        self._cancel_fetch(observation)
        try:
            answer = exchanges.whole(message, self.max_representation)
        except UpstreamError as exc:
            log.info("observation of %s: %s", observation.uri, exc,
                     extra={"uri": observation.uri})
            answer = exchanges.unusable(message, exc)
            if answer is None:
                return
        if answer is None:
            observation.fetch = asyncio.create_task(
                self._fetch_rest(observation, message, observable),
                name=f"blocks {observation.uri}",
            )
            return
        self._answer(observation, answer if observable is None
                     else replace(answer, observable=observable))

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
            answer = await self._complete(observation, first_block)
        except Exception:  # a bug: say it loudly; the observation goes on
            log.exception("observation of %s: block-wise fetch failed", observation.uri)
            return
        if answer is not None and observation.fetch is asyncio.current_task():
            observation.fetch = None
            self._answer(observation, replace(answer, observable=observable))

    async def _complete(self, observation: _Observation, first: Any) -> CoapAnswer | None:
        """The whole representation that `first` starts, its other blocks fetched within
        ``transfer_timeout``; one that cannot be taken comes back as an answer without
        payload that says why (`exchanges.unusable`); None when it kept changing."""
        settings = self.supervision
        deadline = asyncio.timeout(settings.transfer_timeout)
        fetch = exchanges.observed_blocks(
            self.context, observation.uri, settings.registration_timeout
        )
        try:
            async with deadline:
                return await exchanges.complete(first, fetch, self.max_representation)
        except TimeoutError:
            failure: BaseException = exchanges.BrokenTransfer(
                "block-wise transfer not complete within transfer_timeout "
                f"({settings.transfer_timeout:g} s)"
                if deadline.expired()
                else f"a block not answered within {settings.registration_timeout:g} s",
                first,
            )
        except (UpstreamError, coap_error.Error, OSError) as exc:
            failure = exc
        log.info("observation of %s: %s", observation.uri, describe(failure),
                 extra={"uri": observation.uri})
        return exchanges.unusable(first, failure)

    # -- polling resources without Observe ---------------------------------------------------

    async def _poll(self, observation: _Observation, first: Any) -> Event:
        """Report the registration's answer, then poll until a poll fails or answers with an
        error code; the supervision event that ended it."""
        answer = await self._complete(observation, first)
        if answer is not None:
            self._answer(observation, replace(answer, observable=False))
        log.info("%s does not support Observe; polling it", observation.uri)
        timeout = self.supervision.registration_timeout
        while not observation.stopping:
            await asyncio.sleep(poll_interval(
                None if answer is None else answer.max_age, self.supervision.poll_min
            ))
            message = aiocoap.Message(
                code=Code.GET, uri=observation.uri, size2=0, transport_tuning=_UNRELIABLE
            )
            try:
                fresh = await exchanges.send(
                    self.context, message, timeout, self.max_representation
                )
            except TimeoutError:
                self._failed(observation, f"no answer within {timeout:g} s")
                return "ended"
            except (RepresentationTooLarge, exchanges.BrokenTransfer) as exc:
                fresh = exc.answer
            except UpstreamError as exc:
                self._failed(observation, str(exc))
                return "ended"
            if not fresh.code.startswith("2."):
                self._answer(observation, fresh)
                return "client error" if fresh.code.startswith("4.") else "ended"
            if answer is None or (fresh.code, fresh.cf, fresh.payload, fresh.too_large,
                                  fresh.broken) != (answer.code, answer.cf, answer.payload,
                                                    answer.too_large, answer.broken):
                self._answer(observation, fresh)
            elif not observation.stopping:
                self._listener.unchanged(observation.uri)
            answer = fresh
        return "ended"

    # -- deregistration ----------------------------------------------------------------------

    def _send_deregistration(
        self, request: aiocoap.Message, *, confirmable: bool = True
    ) -> bool:
        """Send GET with Observe = 1 under the token of the registration `request`
        (RFC 7641 §3.6); True when it was sent.

        aiocoap's public request API always picks a fresh token, so this goes one layer
        down (`compat.deregister`). While the observation is still open here, the sensor's
        answer ends it; otherwise the answer is ignored. Nothing is sent for an observation
        that no token manager can reach: an OSCORE one (its requests are protected by the
        OSCORE transport, above the token managers).
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
