"""The slow-consumer policy of one connection's outbox, without sockets."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from translator.core.outbox import OVERFLOW_BYTES, OVERFLOW_FRAMES, Outbox


def outbox(**limits: float) -> Outbox:
    settings: dict[str, float] = {"max_pending_bytes": 10_000, "max_frames": 100, "max_lag": 30}
    settings.update(limits)
    return Outbox(
        max_pending_bytes=int(settings["max_pending_bytes"]),
        max_frames=int(settings["max_frames"]),
        max_lag=settings["max_lag"],
    )


def drain(box: Outbox) -> list[str]:
    out = []
    while (text := box.pop()) is not None:
        out.append(text)
    return out


def test_newer_notify_replaces_the_unsent_one_and_goes_last() -> None:
    box = outbox()
    box.push("n1-s1", "s1", 0)
    box.push("status", None, 0)
    box.push("n1-s2", "s2", 0)
    box.push("n2-s1", "s1", 0)
    assert len(box) == 3 and box.replaced == 1
    assert drain(box) == ["status", "n1-s2", "n2-s1"]


def test_frames_without_key_are_never_dropped() -> None:
    box = outbox()
    for number in range(5):
        box.push(f"response {number}", None, 0)
    assert drain(box) == [f"response {number}" for number in range(5)]


def test_a_notify_being_written_is_not_replaced() -> None:
    box = outbox()
    box.push("old", "s1", 0)
    assert box.pop() == "old"  # the writer took it
    box.push("new", "s1", 0)
    assert box.replaced == 0 and drain(box) == ["new"]


def test_byte_and_frame_bounds() -> None:
    box = outbox(max_pending_bytes=10)
    assert box.push("12345", None, 0) is None
    assert box.push("123456", None, 0) == OVERFLOW_BYTES
    box = outbox(max_frames=2)
    assert box.push("a", None, 0) is None and box.push("b", None, 0) is None
    assert box.push("c", None, 0) == OVERFLOW_FRAMES
    # Replacing does not count twice.
    box = outbox(max_frames=1, max_pending_bytes=5)
    for number in range(50):
        assert box.push(f"n{number}", "s1", 0) is None


def test_behind_from_first_push_until_written_empty() -> None:
    box = outbox(max_lag=30)
    assert not box.lagging(100)
    box.push("a", None, 10)
    assert not box.lagging(40) and box.lagging(40.5)
    box.pop()
    assert box.lagging(41)  # popped but not yet written: still behind
    box.written(41)
    assert box.behind_since is None and not box.lagging(1000)
    box.push("b", None, 50)
    box.push("c", None, 60)
    box.pop()
    box.written(70)
    assert box.behind_since == 70  # one frame still waits, behind since the last write


def test_a_slow_client_that_keeps_taking_frames_is_never_lagging() -> None:
    """Frames come faster than they are written, so the outbox is never empty; each frame
    written restarts the count, and only a stall longer than max_lag is lagging."""
    box = outbox(max_lag=30)
    now = 0.0
    for _ in range(1000):  # 1000 writes, 20 s apart: 20 000 s with frames always waiting
        box.push("n", "s1", now)
        box.push("n", "s1", now)
        assert box.pop() is not None
        box.push("n", "s1", now)
        now += 20
        assert not box.lagging(now)
        box.written(now)
    assert box.frames == 1 and not box.lagging(now + 30) and box.lagging(now + 30.5)


@given(st.lists(st.tuples(st.sampled_from(["s1", "s2", "s3", None]), st.integers(0, 9))))
def test_order_and_accounting(pushes: list[tuple[str | None, int]]) -> None:
    box = outbox(max_pending_bytes=10**9, max_frames=10**9)
    expected: list[str] = []
    for number, (key, _) in enumerate(pushes):
        text = f"{key}:{number}"
        box.push(text, key, 0)
        if key is not None:
            expected = [t for t in expected if not t.startswith(f"{key}:")]
        expected.append(text)
    assert box.pending_bytes == sum(len(t) for t in expected) and len(box) == len(expected)
    assert drain(box) == expected
    assert box.pending_bytes == 0 and len(box) == 0


def test_replaced_notifications_do_not_pile_up_behind_the_live_ones() -> None:
    box = Outbox(max_pending_bytes=10**9, max_frames=10**6, max_lag=60)
    keys = [f"s{i}" for i in range(256)]
    for round_ in range(1000):  # a fast sensor per key, and a writer that takes nothing
        for key in keys:
            assert box.push(f"notify {key} {round_}", key, 0.0) is None
    assert box.frames == 256
    assert box._queue is not None and len(box._queue) <= 2 * 256 + 17
    popped = [box.pop() for _ in range(256)]
    assert popped == [f"notify {key} 999" for key in keys]
    assert box.pop() is None


def test_pending_bytes_are_utf8_bytes() -> None:
    box = Outbox(max_pending_bytes=10, max_frames=10, max_lag=60)
    assert box.push("é" * 4, None, 0.0) is None  # 4 characters, 8 bytes
    assert box.pending_bytes == 8
    assert box.push("ab€", None, 0.0) == OVERFLOW_BYTES  # 5 bytes more: 13 > 10
