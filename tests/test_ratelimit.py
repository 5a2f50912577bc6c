"""Tests for translator.core.ratelimit: the token bucket and the connection limiter (fake clock)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from translator.core.ratelimit import ConnectionLimiter, TokenBucket, client_key


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- TokenBucket -----------------------------------------------------------------------------


def test_bucket_starts_full_and_empties_after_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=50, burst=100, clock=clock)
    assert all(bucket.take() for _ in range(100))
    assert not bucket.take()
    assert not bucket.take()


def test_bucket_refills_at_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=5, clock=clock)
    for _ in range(5):
        assert bucket.take()
    assert not bucket.take()
    clock.advance(0.05)  # half a token
    assert not bucket.take()
    clock.advance(0.05)
    assert bucket.take()
    assert not bucket.take()
    clock.advance(0.35)  # 3.5 tokens
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]


def test_bucket_never_holds_more_than_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=100, burst=3, clock=clock)
    clock.advance(3600)
    assert [bucket.take() for _ in range(4)] == [True, True, True, False]
    assert bucket.available == pytest.approx(0)


def test_failed_take_consumes_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1, burst=2, clock=clock)
    assert bucket.take(2)
    clock.advance(1.5)
    assert not bucket.take(2)
    assert bucket.available == pytest.approx(1.5)
    assert bucket.take()


def test_rate_zero_is_unlimited() -> None:
    bucket = TokenBucket(rate=0, burst=1, clock=FakeClock())
    assert bucket.unlimited
    assert all(bucket.take() for _ in range(10_000))
    assert bucket.available == math.inf
    assert bucket.retry_after() == 0


def test_retry_after() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=4, burst=2, clock=clock)
    assert bucket.retry_after() == 0
    bucket.take(2)
    assert bucket.retry_after() == pytest.approx(0.25)
    assert bucket.retry_after(2) == pytest.approx(0.5)
    assert bucket.retry_after(3) == math.inf
    clock.advance(0.25)
    assert bucket.retry_after() == 0
    assert bucket.take()


def test_clock_going_back_adds_nothing() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10, burst=1, clock=clock)
    assert bucket.take()
    clock.advance(-100)
    assert not bucket.take()
    clock.advance(0.1)
    assert bucket.take()


@pytest.mark.parametrize(
    ("rate", "burst", "error"),
    [
        (-1, 1, ValueError),
        (math.inf, 1, ValueError),
        (math.nan, 1, ValueError),
        (1, 0, ValueError),
        (1, 1.5, TypeError),
        (True, 1, TypeError),
        ("1", 1, TypeError),
    ],
)
def test_bucket_rejects_bad_settings(rate: object, burst: object, error: type) -> None:
    with pytest.raises(error):
        TokenBucket(rate=rate, burst=burst, clock=FakeClock())  # type: ignore[arg-type]


def test_negative_take() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=1, burst=1, clock=FakeClock()).take(-1)


def test_default_clock_is_monotonic_and_works() -> None:
    bucket = TokenBucket(rate=1, burst=2)
    assert bucket.take() and bucket.take()
    assert not bucket.take()


@given(
    st.floats(min_value=0.1, max_value=1000),
    st.integers(min_value=1, max_value=200),
    st.lists(st.floats(min_value=0, max_value=2), max_size=200),
)
def test_takes_never_exceed_burst_plus_rate_times_time(
    rate: float, burst: int, gaps: list[float]
) -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=rate, burst=burst, clock=clock)
    taken = 0
    for gap in gaps:
        clock.advance(gap)
        taken += sum(bucket.take() for _ in range(3))
    elapsed = sum(gaps)
    assert taken <= burst + rate * elapsed + 1e-6


# --- ConnectionLimiter -------------------------------------------------------------------------


def test_total_limit() -> None:
    limiter = ConnectionLimiter(max_total=3, max_per_ip=10)
    assert [limiter.try_acquire(f"10.0.0.{i}") for i in range(3)] == [None, None, None]
    reason = limiter.try_acquire("10.0.0.9")
    assert reason == "too many connections (limit 3)"
    assert limiter.total == 3
    limiter.release("10.0.0.1")
    assert limiter.try_acquire("10.0.0.9") is None


def test_per_ip_limit() -> None:
    limiter = ConnectionLimiter(max_total=100, max_per_ip=2)
    assert limiter.try_acquire("10.0.0.1") is None
    assert limiter.try_acquire("10.0.0.1") is None
    assert limiter.try_acquire("10.0.0.1") == "too many connections from this address (limit 2)"
    assert limiter.try_acquire("10.0.0.2") is None
    assert limiter.count("10.0.0.1") == 2
    limiter.release("10.0.0.1")
    assert limiter.try_acquire("10.0.0.1") is None


def test_refusal_counts_nothing() -> None:
    limiter = ConnectionLimiter(max_total=1, max_per_ip=1)
    assert limiter.try_acquire("a") is None
    assert limiter.try_acquire("a") is not None
    assert limiter.try_acquire("b") is not None
    assert limiter.total == 1 and limiter.count("a") == 1 and limiter.count("b") == 0


def test_release_without_acquire_is_an_error() -> None:
    limiter = ConnectionLimiter(max_total=5, max_per_ip=5)
    with pytest.raises(ValueError, match="without a matching"):
        limiter.release("10.0.0.1")
    limiter.try_acquire("10.0.0.1")
    limiter.release("10.0.0.1")
    with pytest.raises(ValueError):
        limiter.release("10.0.0.1")
    assert limiter.total == 0


def test_released_addresses_are_forgotten() -> None:
    limiter = ConnectionLimiter(max_total=10_000, max_per_ip=1)
    for i in range(1000):
        assert limiter.try_acquire(f"10.0.{i // 256}.{i % 256}") is None
    for i in range(1000):
        limiter.release(f"10.0.{i // 256}.{i % 256}")
    assert limiter.total == 0
    assert limiter._by_key == {}


def test_ipv4_mapped_and_ipv6_prefix_grouping() -> None:
    limiter = ConnectionLimiter(max_total=100, max_per_ip=2)
    assert limiter.try_acquire("192.0.2.1") is None
    assert limiter.try_acquire("::ffff:192.0.2.1") is None
    assert limiter.try_acquire("192.0.2.1") is not None
    # One IPv6 host owns its /64: all of it counts as one address.
    assert limiter.try_acquire("2001:db8:0:1::1") is None
    assert limiter.try_acquire("2001:db8:0:1:ffff::2") is None
    assert limiter.try_acquire("2001:db8:0:1::3") is not None
    assert limiter.try_acquire("2001:db8:0:2::1") is None
    limiter.release("2001:db8:0:1::99")
    assert limiter.count("2001:db8:0:1::1") == 1


def test_ipv6_prefix_128_counts_each_address() -> None:
    limiter = ConnectionLimiter(max_total=100, max_per_ip=1, ipv6_prefix=128)
    assert limiter.try_acquire("2001:db8::1") is None
    assert limiter.try_acquire("2001:db8::2") is None
    assert limiter.try_acquire("2001:db8:0:0::1") is not None


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::/64"),
        ("[2001:db8::1]", "2001:db8::/64"),
        ("::1", "::/64"),
        ("fe80::1%eth0", "fe80::/64"),
        ("not-an-ip", "not-an-ip"),
        ("", ""),
    ],
)
def test_client_key(ip: str, key: str) -> None:
    assert client_key(ip) == key


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"max_total": 0, "max_per_ip": 1}, ValueError),
        ({"max_total": 1, "max_per_ip": 0}, ValueError),
        ({"max_total": 1.0, "max_per_ip": 1}, TypeError),
        ({"max_total": 1, "max_per_ip": 1, "ipv6_prefix": 129}, ValueError),
    ],
)
def test_limiter_rejects_bad_settings(kwargs: dict[str, object], error: type) -> None:
    with pytest.raises(error):
        ConnectionLimiter(**kwargs)  # type: ignore[arg-type]


@given(st.lists(st.tuples(st.booleans(), st.sampled_from(["a", "b", "c", "::1", "::2"]))))
def test_limiter_counts_match_a_model(operations: list[tuple[bool, str]]) -> None:
    limiter = ConnectionLimiter(max_total=4, max_per_ip=2)
    model: dict[str, int] = {}
    for acquire, ip in operations:
        key = client_key(ip)
        if acquire:
            admitted = limiter.try_acquire(ip) is None
            expected = sum(model.values()) < 4 and model.get(key, 0) < 2
            assert admitted is expected
            if admitted:
                model[key] = model.get(key, 0) + 1
        elif model.get(key, 0) > 0:
            limiter.release(ip)
            model[key] -= 1
        assert limiter.total == sum(model.values()) <= 4
