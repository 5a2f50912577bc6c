"""The supervision of upstream observations, without sockets.

The pure decisions of translator/coap/supervision.py: `ObserveOrder` (RFC 7641 §3.4),
`backoff_delay`, the phase table and its waits (`Supervisor`: a 4.xx answer waits long),
`Freshness` (late at Max-Age + grace, the default grace at least 2 s) and `poll_interval`;
then the follow loop of `Observations` fed by a stand-in aiocoap observation, so the
gateway's own ordering and freshness are tested apart from aiocoap's.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any, Final

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from hypothesis import given
from hypothesis import strategies as st

from translator.coap.answers import CoapAnswer
from translator.coap.observations import Observations, _Observation
from translator.coap.supervision import (
    CLIENT_ERROR_BACKOFF_MAX,
    DEFAULT_MAX_AGE,
    OBSERVATION_RESET_TIME,
    OBSERVE_MODULUS,
    OBSERVE_WINDOW,
    TRANSITIONS,
    Freshness,
    ObserveOrder,
    Supervisor,
    backoff_delay,
    default_grace,
    observe_is_newer,
    poll_interval,
)
from translator.config import SupervisionConfig

# --- ObserveOrder ---------------------------------------------------------------------------------


def test_first_notification_is_always_accepted() -> None:
    assert ObserveOrder().accept(12345, 0.0)


def test_newer_accepted_older_and_equal_dropped() -> None:
    order = ObserveOrder()
    assert order.accept(5, 0.0)
    assert order.accept(6, 0.1)
    assert not order.accept(6, 0.2)  # the same number again
    assert not order.accept(4, 0.3)
    assert order.accept(100, 0.4)
    assert not order.accept(99, 0.5)


def test_window_edges_of_24_bit_numbers() -> None:
    assert observe_is_newer(0, OBSERVE_WINDOW - 1)
    assert not observe_is_newer(0, OBSERVE_WINDOW)  # exactly 2^23 ahead: older (wrapped)
    assert observe_is_newer(OBSERVE_MODULUS - 1, 0)  # wraps around
    assert observe_is_newer(OBSERVE_MODULUS - 10, 5)
    assert not observe_is_newer(5, OBSERVE_MODULUS - 10)
    assert not observe_is_newer(7, 7)


def test_wraparound_in_a_stream() -> None:
    order = ObserveOrder()
    numbers = [OBSERVE_MODULUS - 2, OBSERVE_MODULUS - 1, 0, 1, 2]
    assert all(order.accept(n, 0.0) for n in numbers)
    assert not order.accept(OBSERVE_MODULUS - 1, 0.0)


def test_128_second_rule() -> None:
    order = ObserveOrder()
    assert order.accept(1000, 0.0)
    assert not order.accept(3, OBSERVATION_RESET_TIME)  # not *more* than 128 s yet
    assert order.accept(3, OBSERVATION_RESET_TIME + 0.001)  # the sensor restarted its counter
    assert order.accept(4, OBSERVATION_RESET_TIME + 1)


def test_reset_starts_over() -> None:
    order = ObserveOrder()
    assert order.accept(1000, 0.0)
    assert not order.accept(0, 1.0)
    order.reset()  # a fresh registration: the sensor's numbering starts again
    assert order.accept(0, 1.0)
    assert order.accept(1, 1.1)


@given(
    st.lists(st.integers(1, 1000), min_size=1, max_size=60),
    st.integers(0, OBSERVE_MODULUS - 1),
    st.randoms(use_true_random=False),
)
def test_any_arrival_order_forwards_an_increasing_run_ending_at_the_newest(
    steps: list[int], start: int, rng: Any
) -> None:
    """Notifications numbered in order (with gaps, wrapping at 2^24) arrive shuffled within
    128 s: what is accepted is in sending order, and the newest one is always accepted."""
    sent = []
    counter = start
    for index, step in enumerate(steps):
        counter = (counter + step) % OBSERVE_MODULUS
        sent.append((index, counter))
    arrival = list(sent)
    rng.shuffle(arrival)
    order = ObserveOrder()
    accepted = [index for index, number in arrival if order.accept(number, 1.0)]
    assert accepted == sorted(accepted)
    assert accepted[-1] == len(sent) - 1


# --- backoff --------------------------------------------------------------------------------------


def test_backoff_doubles_from_min_to_max() -> None:
    delays = [backoff_delay(n, 1.0, 60.0, 0.0) for n in range(9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]


def test_backoff_jitter_only_shortens_and_by_at_most_a_fifth() -> None:
    assert backoff_delay(0, 1.0, 60.0, 0.999) == pytest.approx(0.8, abs=0.001)
    assert backoff_delay(10, 1.0, 60.0, 0.5) == pytest.approx(54.0)
    for jitter in (0.0, 0.3, 0.99):
        assert 0.8 * 60 <= backoff_delay(50, 1.0, 60.0, jitter) <= 60


def test_backoff_huge_attempt_numbers_do_not_overflow() -> None:
    assert backoff_delay(10_000, 1.0, 60.0, 0.0) == 60.0
    assert backoff_delay(3, 0.0, 0.0, 0.5) == 0.0


@given(st.integers(0, 200), st.floats(0, 100), st.floats(0, 1000), st.floats(0, 1))
def test_backoff_never_exceeds_max(attempt: int, low: float, high: float, jitter: float) -> None:
    high = max(low, high)
    assert 0.0 <= backoff_delay(attempt, low, high, jitter) <= high


# --- phases and waits ----------------------------------------------------------------------------


def supervisor() -> Supervisor:
    return Supervisor(backoff_min=1.0, backoff_max=60.0, client_error_backoff=60.0)


def test_every_phase_has_a_way_out_and_waiting_leads_to_registering() -> None:
    phases = {phase for phase, _ in TRANSITIONS} | set(TRANSITIONS.values())
    assert phases == {"registering", "following", "polling", "waiting"}
    for phase in phases:
        assert any(start == phase for start, _ in TRANSITIONS), phase
    assert [after for (phase, _), after in TRANSITIONS.items() if phase == "waiting"] == [
        "registering"]


def test_an_event_the_phase_does_not_have_is_a_bug() -> None:
    with pytest.raises(ValueError, match="no transition from 'registering' on 'ended'"):
        supervisor().on("ended")


def test_failed_registrations_back_off_and_an_accepted_one_starts_over() -> None:
    s = supervisor()
    waits = []
    for _ in range(4):
        waits.append(s.on("failed"))
        s.on("elapsed")
    assert waits == [1, 2, 4, 8]
    assert s.on("observable") is None and s.phase == "following"
    assert s.on("ended") == 1  # the sensor was reachable a moment ago
    s.on("elapsed")
    assert s.on("failed") == 1


def test_a_client_error_waits_long_and_longer_until_a_2xx_answer() -> None:
    s = supervisor()
    waits = []
    for _ in range(8):
        waits.append(s.on("client error"))
        s.on("elapsed")
    assert waits == [60, 120, 240, 480, 960, 1920, 3600, 3600]
    assert s.on("failed") == 1  # the network's own pace is apart
    s.on("elapsed")
    s.on("not observable")
    assert s.on("client error") == 60  # counted again from the last 2.xx answer
    assert CLIENT_ERROR_BACKOFF_MAX == 3600


def test_a_client_error_ending_an_observation_waits_long_too() -> None:
    s = supervisor()
    s.on("observable")
    assert s.on("client error") == 60
    assert Supervisor(0.05, 0.3, 7200.0).on("client error", jitter=0.5) == 7200 * 0.9


# --- Freshness ------------------------------------------------------------------------------------


def test_default_grace_is_a_tenth_of_max_age_within_2_and_10_s() -> None:
    assert default_grace(60) == 6.0
    assert default_grace(1000) == 10.0
    assert default_grace(1) == 2.0  # libcoap's /time: Max-Age 1, a notification a second
    assert default_grace(20) == 2.0


def test_late_at_max_age_plus_grace_stale_then_silent() -> None:
    freshness = Freshness()
    freshness.heard(100.0, 10)
    assert freshness.late_at == 112.0
    assert freshness.check(111.9) == "fresh"
    assert freshness.check(112.0) == "stale"
    assert freshness.check(112.0) == "silent"  # stale is said once, then time to renew
    assert freshness.reason() == "no notification within Max-Age (10 s) and 2 s of grace"


def test_a_sensor_notifying_at_max_age_with_jitter_stays_fresh() -> None:
    freshness = Freshness()
    rng = random.Random(7)
    now = 0.0
    freshness.heard(now, 1)
    for _ in range(10_000):
        now += 1.0 + rng.uniform(-0.3, 1.9)  # up to 1.9 s late
        assert freshness.check(now) == "fresh"
        freshness.heard(now, 1)


def test_a_notification_makes_it_fresh_again() -> None:
    freshness = Freshness()
    freshness.heard(0.0, 10)
    assert freshness.check(12.0) == "stale"
    freshness.heard(12.5, 5)
    assert freshness.check(13.0) == "fresh"
    assert freshness.late_at == 19.5
    assert freshness.check(19.5) == "stale"


def test_configured_grace_and_default_max_age() -> None:
    freshness = Freshness(grace=0.25)
    freshness.heard(0.0, None)  # no Max-Age option: 60 s (RFC 7252 §5.10.5)
    assert freshness.late_at == DEFAULT_MAX_AGE + 0.25
    zero = Freshness(grace=0)
    zero.heard(0.0, 1)
    assert zero.check(1.0) == "stale"


def test_max_age_zero_is_never_stale_and_silent_after_the_default() -> None:
    freshness = Freshness()
    freshness.heard(0.0, 0)
    assert freshness.check(0.0) == "fresh"
    assert freshness.late_at == 66.0
    assert freshness.check(65.9) == "fresh"
    assert freshness.check(66.0) == "silent"


def test_poll_interval() -> None:
    assert poll_interval(None, 5.0) == 60.0
    assert poll_interval(0, 5.0) == 5.0
    assert poll_interval(30, 5.0) == 30.0


# --- the follow loop with a stand-in observation --------------------------------------------------


class Recorder:
    """An ObservationListener that records what it is told."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.changed = asyncio.Event()

    def _add(self, kind: str, value: Any) -> None:
        self.events.append((kind, value))
        self.changed.set()

    def registering(self, uri: str) -> None:
        self._add("registering", uri)

    def answer(self, uri: str, answer: CoapAnswer) -> None:
        self._add("answer", answer)

    def unchanged(self, uri: str) -> None:
        self._add("unchanged", uri)

    def stale(self, uri: str, reason: str) -> None:
        self._add("stale", reason)

    def failed(self, uri: str, reason: str) -> None:
        self._add("failed", reason)

    def payloads(self) -> list[bytes]:
        return [value.payload for kind, value in self.events if kind == "answer"]


def notification(observe: int | None, payload: bytes, max_age: int | None = None) -> Any:
    message = aiocoap.Message(code=Code.CONTENT, payload=payload, observe=observe)
    if max_age is not None:
        message.opt.max_age = max_age
    return message


class StandInObservation:
    """What the follow loop uses of aiocoap's `ClientObservation`: async iteration,
    `cancelled`, and `error()`, which ends the iteration with that exception. Unlike
    aiocoap's, it does not filter anything, so the gateway's own ordering is on its own."""

    def __init__(self, items: list[Any]) -> None:
        self._items = items
        self._ended = asyncio.Event()
        self._error: BaseException | None = None
        self.cancelled = False

    def end(self) -> None:
        """The sensor ends the observation (the iteration stops)."""
        self._ended.set()

    def error(self, exception: BaseException) -> None:
        self.cancelled = True
        self._error = exception
        self._ended.set()

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Any]:
        for item in self._items:
            yield item
        await self._ended.wait()
        if self._error is not None:
            raise self._error


class StandInRequest:
    """What the supervision uses of an aiocoap request once it is answered: its
    `observation`, and its `response` (cancelled when the registration is forgotten)."""

    def __init__(self, items: list[Any]) -> None:
        self.observation = StandInObservation(items)
        self.response: asyncio.Future[Any] = asyncio.get_running_loop().create_future()


class StandInObservations(Observations):
    """Observations whose first registration is answered by stand-ins instead of a sensor:
    `first` (with Observe), then the notifications of `request`. Its next registration ends
    the test: it stops the observation."""

    def __init__(self, recorder: Recorder, supervision: SupervisionConfig,
                 request: StandInRequest, first: Any) -> None:
        super().__init__(recorder, supervision, max_representation=1_048_576,
                         rng=random.Random(1), share_addresses=False)
        first.request = aiocoap.Message(code=Code.GET)  # no address: nothing to deregister
        self.answers = [(request, first)]

    async def _register(self, observation: _Observation) -> Any:
        if not self.answers:
            observation.stopping = True
            return None, None
        request, self.first = self.answers.pop()
        return request, self.first.request

    async def _registered(self, observation: _Observation, request: Any, sent: Any) -> Any:
        return self.first


def supervise(side: Observations, grace: float | None = None) -> tuple[_Observation, Any]:
    observation = _Observation("coap://h:5683/x", grace, side)
    return observation, side._supervise(observation)


IMMEDIATE: Final = {"backoff_min": 0.001, "backoff_max": 0.001}  # 0 is a config error
"""A registration again at once after one ends (the stand-in's second one ends the test)."""


async def test_follow_forwards_only_newer_notifications() -> None:
    recorder = Recorder()
    request = StandInRequest([
        notification(3, b"3"), notification(2, b"late 2"), notification(5, b"5"),
        notification(4, b"late 4"), notification(5, b"again 5"), notification(6, b"6"),
    ])
    side = StandInObservations(recorder, SupervisionConfig(**IMMEDIATE), request,
                               notification(1, b"1"))
    _, supervision = supervise(side)
    task = asyncio.create_task(supervision)
    async with asyncio.timeout(5):
        while recorder.payloads()[-1:] != [b"6"]:
            recorder.changed.clear()
            await recorder.changed.wait()
    request.observation.end()
    async with asyncio.timeout(5):
        await task
    assert recorder.payloads() == [b"1", b"3", b"5", b"6"]
    assert request.response.cancelled()  # the registration was forgotten


async def test_follow_reports_stale_then_ends_when_silent() -> None:
    recorder = Recorder()
    request = StandInRequest([])  # no notification after the first: silence
    first = notification(0, b"0", max_age=1)
    side = StandInObservations(recorder, SupervisionConfig(grace=0.05, **IMMEDIATE),
                               request, first)
    observation, supervision = supervise(side, 0.05)
    loop = asyncio.get_running_loop()
    started = loop.time()
    async with asyncio.timeout(5):
        # Max-Age 1 s and 0.05 s of grace: stale, and the follow loop ends, after 1.05 s.
        await supervision
    assert loop.time() - started >= 1.05
    assert [kind for kind, _ in recorder.events] == ["answer", "stale"]
    assert recorder.events[1][1] == "no notification within Max-Age (1 s) and 0.05 s of grace"
    assert observation.timer is None and observation.following is None
    assert request.observation.cancelled  # aiocoap's observation ended with the silence
    assert observation.orphans == (first.request,)  # to be deregistered after the next one


def test_a_whole_notification_larger_than_the_limit_is_reported_without_payload() -> None:
    recorder = Recorder()
    side = Observations(recorder, SupervisionConfig(), max_representation=1000,
                        rng=random.Random(1), share_addresses=False)
    observation = _Observation("coap://h:5683/x", None, side)
    side._take(observation, notification(7, b"z" * 1001), observable=True)
    side._take(observation, notification(8, b"z" * 1000))
    assert [kind for kind, _ in recorder.events] == ["answer", "answer"]
    (_, big), (_, fits) = recorder.events
    assert big == CoapAnswer(code="2.05", cf=None, payload=b"", max_age=None, observe=7,
                             observable=True, too_large=1001)
    assert fits.payload == b"z" * 1000 and fits.too_large is None
