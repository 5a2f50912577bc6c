"""Conditional notifications (translator/core/conditions.py and the hub's use of it), pure.

The cases follow draft-ietf-core-conditional-attributes: its parameter rules (4.00 Bad
Request), its examples (appendix "Examples": c.pmin, c.pmax, c.gt, c.gt with c.pmax) and the
band and edge rules of its text.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from translator.core import frames
from translator.core.conditions import (
    Condition,
    ConditionError,
    WakeQueue,
    Watch,
    parse_condition,
    parse_pointer,
    qualifies,
    resolve_pointer,
    select,
    with_fields,
)
from translator.core.frames import FrameError
from translator.core.hub import Deliver, Hub, Repeat, Wake

# --- parameters ------------------------------------------------------------------------------


@pytest.mark.parametrize(("cond", "parameter"), [
    ({"pmin": 0}, "cond.pmin"),
    ({"pmin": -1}, "cond.pmin"),
    ({"pmin": "1"}, "cond.pmin"),
    ({"pmin": True}, "cond.pmin"),
    ({"pmax": 0}, "cond.pmax"),
    ({"pmin": 5, "pmax": 2}, "cond.pmax"),
    ({"st": 0}, "cond.st"),
    ({"st": -0.5}, "cond.st"),
    ({"gt": "25"}, "cond.gt"),
    ({"lt": None}, "cond.lt"),
    ({"band": True}, "cond.band"),
    ({"band": 1, "gt": 2}, "cond.band"),
    ({"edge": 1}, "cond.edge"),
    ({"edge": "true"}, "cond.edge"),
    ({"edge": True, "gt": 1}, "cond.edge"),
    ({"epmin": 1}, "cond.epmin"),
    ({"c.pmin": 1}, "cond.c.pmin"),
    ({"path": "v"}, "cond.path"),
    ({"path": "/a~2b"}, "cond.path"),
    ({"path": 3}, "cond.path"),
    ({"path": "/\ud800"}, "cond.path"),
    ({"path": "/" + "a" * 300}, "cond.path"),
    ({"path": "/a" * 40}, "cond.path"),
    ([], "cond"),
])
def test_invalid_parameters_are_refused_naming_the_parameter(cond: Any, parameter: str) -> None:
    with pytest.raises(ConditionError) as caught:
        parse_condition(cond)
    assert caught.value.parameter == parameter
    assert str(caught.value).startswith(f"'{parameter}'")


def test_subscribe_frame_with_bad_cond_is_bad_request_naming_it() -> None:
    with pytest.raises(FrameError) as caught:
        frames.parse(json.dumps({"type": "subscribe", "id": 1, "name": "t", "cond": {"st": 0}}))
    assert caught.value.code == frames.BAD_REQUEST
    assert "'cond.st'" in caught.value.message and caught.value.frame_id == 1


def test_valid_conditions_parse() -> None:
    c = parse_condition({"pmin": 1, "pmax": 1, "gt": 25, "lt": 10.5, "band": True,
                         "st": 0.5, "path": "/0/v"})
    assert (c.pmin, c.pmax, c.gt, c.lt, c.st, c.band, c.tokens) == (
        1.0, 1.0, 25, 10.5, 0.5, True, ("0", "v"))
    assert c.to_json() == {"pmin": 1.0, "pmax": 1.0, "gt": 25, "lt": 10.5, "st": 0.5,
                           "band": True, "path": "/0/v"}
    sub = frames.parse(json.dumps({"type": "subscribe", "name": "t", "cond": {"edge": False}}))
    assert isinstance(sub, frames.Subscribe) and sub.cond == Condition(edge=False)
    plain = frames.parse(json.dumps({"type": "subscribe", "name": "t"}))
    assert isinstance(plain, frames.Subscribe) and plain.cond is None


# --- RFC 6901 ----------------------------------------------------------------------------------

RFC6901_DOCUMENT = {
    "foo": ["bar", "baz"], "": 0, "a/b": 1, "c%d": 2, "e^f": 3, "g|h": 4, "i\\j": 5,
    "k\"l": 6, " ": 7, "m~n": 8,
}


@pytest.mark.parametrize(("pointer", "expected"), [
    ("", RFC6901_DOCUMENT), ("/foo", ["bar", "baz"]), ("/foo/0", "bar"), ("/", 0),
    ("/a~1b", 1), ("/c%d", 2), ("/e^f", 3), ("/g|h", 4), ("/i\\j", 5), ("/k\"l", 6),
    ("/ ", 7), ("/m~0n", 8),
])
def test_json_pointer_rfc6901_examples(pointer: str, expected: Any) -> None:
    assert resolve_pointer(RFC6901_DOCUMENT, parse_pointer(pointer)) == expected


@pytest.mark.parametrize("pointer", ["/foo/2", "/foo/01", "/foo/-", "/nope", "/foo/0/x"])
def test_json_pointer_to_nothing_says_where(pointer: str) -> None:
    with pytest.raises(LookupError):
        resolve_pointer(RFC6901_DOCUMENT, parse_pointer(pointer))


def test_select_reports_why_a_condition_cannot_apply() -> None:
    senml = Condition(st=1, path="/0/v", tokens=("0", "v"))
    assert select(senml, {"value": [{"n": "h", "v": 45.5}]}) == (45.5, None)
    assert "not found" in (select(senml, {"value": [{"n": "h"}]})[1] or "")
    assert "needs a number" in (select(senml, {"value": [{"v": "x"}]})[1] or "")
    assert "no decoded value" in (select(senml, {"payload_b64": "AA=="})[1] or "")
    assert "boolean" in (select(Condition(edge=True), {"value": 1})[1] or "")
    assert select(Condition(pmin=1), {"value": "text"}) == ("text", None)


# --- which updates qualify (the draft's text) -------------------------------------------------


def test_gt_fires_on_crossing_relative_to_the_last_value_sent() -> None:
    c = Condition(gt=25)
    assert qualifies(c, 26, 18.5, 18.5)        # crosses upward
    assert not qualifies(c, 27, 26, 26)        # continues to rise: nothing
    assert qualifies(c, 24, 27, 27)            # drops below: notifies
    assert not qualifies(c, 24.5, 18.5, 26)    # relative to the last *sent*, not the previous
    assert not qualifies(c, 25, 18.5, 18.5)    # 25 is not greater than 25


def test_lt_fires_on_crossing() -> None:
    c = Condition(lt=10)
    assert qualifies(c, 9, 12, 12) and not qualifies(c, 8, 9, 9) and qualifies(c, 11, 8, 8)


def test_st_fires_on_a_change_of_at_least_st_since_the_last_value_sent() -> None:
    c = Condition(st=0.5)
    assert not qualifies(c, 20.4, 20.0, 20.0)
    assert qualifies(c, 20.5, 20.0, 20.4)      # >= st
    assert qualifies(c, 19.5, 20.0, 20.0)      # either direction
    assert not qualifies(c, 20.3, 20.0, 20.6)  # the previous update does not matter


def test_any_parameter_suffices() -> None:
    c = Condition(gt=25, st=5)
    assert qualifies(c, 26, 24, 24) and qualifies(c, 10, 16, 16) and not qualifies(c, 22, 24, 24)


@pytest.mark.parametrize(("cond", "inside", "outside"), [
    (Condition(band=True, lt=10), [10, 11, 1e9], [9.99, -3]),             # band minimum
    (Condition(band=True, gt=30), [30, 29, -1e9], [30.01, 40]),           # band maximum
    (Condition(band=True, gt=10, lt=20), [10, 15, 20], [9.9, 20.1]),      # in-band, inclusive
    (Condition(band=True, gt=20, lt=10), [20.1, 9.9, 100], [20, 10, 15]),  # out-of-band
])
def test_band_notifies_while_in_band(cond: Condition, inside: list[float],
                                     outside: list[float]) -> None:
    for value in inside:
        assert qualifies(cond, value, value, value), value   # every update in band
    for value in outside:
        assert not qualifies(cond, value, 15, 15), value


def test_band_with_st_needs_both() -> None:
    c = Condition(band=True, gt=10, lt=20, st=2)
    assert qualifies(c, 15, 12, 12) and not qualifies(c, 13, 12, 12)
    assert not qualifies(c, 25, 12, 12)


def test_edge_rising_and_falling() -> None:
    rising, falling = Condition(edge=True), Condition(edge=False)
    assert qualifies(rising, True, True, False) and not qualifies(rising, False, True, True)
    assert not qualifies(rising, True, True, True)
    assert qualifies(falling, False, True, True) and not qualifies(falling, True, False, False)


def test_no_value_parameter_means_every_update() -> None:
    assert qualifies(Condition(pmin=1), 5, 5, 5)


# --- the state machine: the draft's examples -------------------------------------------------


def v(value: Any) -> dict[str, Any]:
    return {"value": value}


def test_draft_pmin_example_last_value_of_the_window_is_sent_when_it_ends() -> None:
    watch = Watch(Condition(pmin=10))
    assert watch.initial(0, 1, v(18.5)) == "send"
    assert watch.wake_at is None
    assert watch.update(6, 2, v(23), "t2") == "hold"
    assert watch.wake_at == 10
    assert watch.update(9, 3, v(26), "t3") == "hold"     # replaces 23: no backlog
    assert watch.wake(9.5, "t3") == ("drop", None)       # too early
    assert watch.wake(10, "t3") == ("send", "t3")
    assert (watch.sent_seq, watch.sent_value, watch.wake_at) == (3, 26, None)
    assert watch.update(12, 4, v(27), "t4") == "hold"    # pmin counts from the last sent
    assert watch.wake_at == 20


def test_pmin_last_word_when_updates_stopped() -> None:
    watch = Watch(Condition(pmin=1))
    watch.initial(0, 1, v(1))
    for i in range(2, 50):                               # a burst inside the window
        assert watch.update(0.01 * i, i, v(i), f"t{i}") == "hold"
    assert watch.wake(1.0, "t49") == ("send", "t49")     # one frame, the newest
    assert watch.wake(2.0, "t49") == ("drop", None)
    assert watch.update(5, 50, v(50), "t50") == "send"   # window long over: at once


def test_draft_pmax_example_repeat_of_an_unchanged_state() -> None:
    watch = Watch(Condition(pmax=20))
    watch.initial(9, 1, v(18.5))
    assert watch.update(16, 2, v(23), "t2") == "send"    # no value parameter: every update
    assert watch.wake_at == 36
    assert watch.wake(36, "t2") == ("repeat", None)
    assert (watch.sent_seq, watch.wake_at) == (2, 56)


def test_draft_gt_example() -> None:
    watch = Watch(Condition(gt=25))
    watch.initial(9, 1, v(18.5))
    assert watch.update(12, 2, v(20), "t2") == "drop"
    assert watch.update(16, 3, v(26), "t3") == "send"
    assert watch.update(18, 4, v(28), "t4") == "drop"


def test_draft_gt_and_pmax_example_pmax_sends_the_current_state() -> None:
    watch = Watch(Condition(gt=25, pmax=20))
    watch.initial(9, 1, v(18.5))
    assert watch.update(20, 2, v(23), "t2") == "drop"
    assert watch.wake(29, "t2") == ("send", "t2")        # pmax: 23, newer than 18.5
    assert watch.sent_value == 23
    assert watch.update(37, 3, v(26), "t3") == "send"    # crosses 25


def test_st_held_value_is_cleared_by_a_newer_one_that_does_not_qualify() -> None:
    watch = Watch(Condition(st=1, pmin=1))
    watch.initial(0, 1, v(20.0))
    assert watch.update(0.2, 2, v(21.5), "t2") == "hold"
    assert watch.update(0.4, 3, v(20.2), "t3") == "drop"
    assert watch.wake_at is None
    assert watch.wake(1.0, "t3") == ("drop", None)


def test_held_edge_is_an_event_and_stays_held() -> None:
    watch = Watch(Condition(edge=True, pmin=1))
    watch.initial(0, 1, v(False))
    assert watch.update(0.1, 2, v(True), "rise") == "hold"
    assert watch.update(0.2, 3, v(False), "fall") == "drop"
    assert watch.wake(1.0, "fall") == ("send", "rise")
    assert watch.update(1.5, 4, v(True), "rise2") == "hold"  # False -> True again


def test_a_value_the_condition_cannot_apply_to_is_delivered_with_the_reason() -> None:
    watch = Watch(Condition(st=1, path="/0/v", tokens=("0", "v")))
    watch.initial(0, 1, v([{"v": 1}]))
    assert watch.error is None
    assert watch.update(1, 2, v([{"n": "x"}]), "t2") == "send"
    assert watch.error is not None and "not found" in watch.error
    assert watch.update(2, 3, v([{"v": 1.2}]), "t3") == "send"  # after an error: a change
    assert watch.error is None
    assert watch.update(3, 4, v([{"v": 1.5}]), "t4") == "drop"


def test_first_update_after_a_subscribe_without_a_value_is_sent_at_once() -> None:
    watch = Watch(Condition(st=100, pmin=10))
    assert watch.update(5, 1, v(1), "t1") == "send"


def test_with_fields_adds_before_the_closing_brace() -> None:
    text = '{"type":"notify","seq":3}'
    assert json.loads(with_fields(text, {"cond_error": "a \"b\"", "repeat": True})) == {
        "type": "notify", "seq": 3, "cond_error": "a \"b\"", "repeat": True}


# --- the wake queue ----------------------------------------------------------------------------


def test_wake_queue_orders_replaces_and_forgets() -> None:
    queue: WakeQueue[str] = WakeQueue()
    assert queue.next_at is None
    queue.set("a", 5)
    queue.set("b", 3)
    queue.set("a", 1)                      # moved earlier: the old entry is stale
    assert queue.next_at == 1
    assert queue.due(2) == ["a"]
    assert queue.next_at == 3
    queue.set("c", 4)
    queue.remove("b")
    assert queue.due(10) == ["c"]
    assert queue.next_at is None and len(queue) == 0


def test_wake_queue_stays_small_when_deadlines_move() -> None:
    queue: WakeQueue[int] = WakeQueue()
    for step in range(10_000):
        queue.set(step % 10, float(step))
    assert len(queue) == 10
    assert len(queue._heap) <= 2 * 10 + 64 + 1
    queue.remove(0)
    for key in range(1, 10):
        queue.remove(key)
    assert queue._heap == []               # nothing keeps a removed key alive


# --- the hub -----------------------------------------------------------------------------------

URI = "coap://sensor.example/temperature"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def make_hub(clock: Clock, **kwargs: Any) -> Hub[str]:
    return Hub(linger=0, min_pmax=0.1, monotonic=clock, clock=lambda: 1.0, **kwargs)


def update(hub: Hub[str], value: float | bool | None) -> list[Any]:
    payload = b"\xf6" if value is None else json.dumps(value).encode()
    return hub.upstream_response(URI, code="2.05", cf=50, payload=payload)


def delivered(commands: list[Any], conn: str) -> list[dict[str, Any]]:
    return [json.loads(c.text) for c in commands if isinstance(c, Deliver) and conn in c.targets]


def notifies(commands: list[Any], conn: str) -> list[dict[str, Any]]:
    return [f for f in delivered(commands, conn) if f["type"] == "notify"]


def wakes(commands: list[Any]) -> list[float | None]:
    return [c.at for c in commands if isinstance(c, Wake)]


def test_hub_plain_subscribers_unchanged_conditional_ones_filtered() -> None:
    clock = Clock()
    hub = make_hub(clock)
    hub.subscribe("plain", URI)
    update(hub, 20.0)
    out = hub.subscribe("st", URI, cond=Condition(st=1))
    assert [f["value"] for f in notifies(out, "st")] == [20.0]   # current value at once
    commands = update(hub, 20.4)
    assert [f["value"] for f in notifies(commands, "plain")] == [20.4]
    assert delivered(commands, "st") == []
    commands = update(hub, 21.1)
    assert len([c for c in commands if isinstance(c, Deliver)]) == 1  # one text for both
    assert notifies(commands, "st")[0]["value"] == 21.1


def test_hub_encodes_each_variant_once() -> None:
    clock = Clock()
    hub = make_hub(clock)
    for conn in ("a", "b", "c"):
        hub.subscribe(conn, URI, cond=Condition(st=1, path="/x", tokens=("x",)))
    hub.subscribe("d", URI, cond=Condition(st=1))
    commands = [c for c in update(hub, 5.0) if isinstance(c, Deliver) and '"notify"' in c.text]
    by_targets = {c.targets: c.text for c in commands}
    assert set(by_targets) == {("a", "b", "c"), ("d",)}
    error_frame = json.loads(by_targets[("a", "b", "c")])
    assert "not found" in error_frame["cond_error"] and error_frame["value"] == 5.0
    assert "cond_error" not in json.loads(by_targets[("d",)])


def test_hub_pmin_wake_and_the_last_word() -> None:
    clock = Clock()
    hub = make_hub(clock)
    hub.subscribe("plain", URI)
    update(hub, 1.0)
    out = hub.subscribe("c", URI, cond=Condition(pmin=0.5))
    assert wakes(out) == []                       # nothing held, no pmax: no timer
    clock.now += 0.1
    first = update(hub, 2.0)
    assert delivered(first, "c") == [] and wakes(first) == [100.5]
    clock.now += 0.1
    assert wakes(update(hub, 3.0)) == []          # the same time: no new Wake
    clock.now = 100.5
    out = hub.wake()
    assert [f["value"] for f in notifies(out, "c")] == [3.0]
    assert wakes(out) == []                       # nothing more to wake for


def test_hub_pmax_repeat_has_the_same_seq_and_ts_marked_repeat() -> None:
    clock = Clock()
    hub = make_hub(clock)
    hub.subscribe("plain", URI)
    update(hub, 1.0)
    out = hub.subscribe("c", URI, cond=Condition(pmax=2))
    first = notifies(out, "c")[0]
    assert wakes(out) == [102.0]
    clock.now = 102.0
    out = hub.wake()
    repeats = [c for c in out if isinstance(c, Repeat)]
    assert len(repeats) == 1 and repeats[0].replaces == first["sub"]
    repeat = json.loads(repeats[0].text)
    assert repeat.pop("repeat") is True
    assert repeat == first
    assert wakes(out) == [104.0]


def test_hub_unsubscribe_and_disconnect_cancel_the_timer() -> None:
    clock = Clock()
    hub = make_hub(clock)
    hub.subscribe("plain", URI)
    update(hub, 1.0)
    hub.subscribe("a", URI, cond=Condition(pmax=2))
    hub.subscribe("b", URI, cond=Condition(pmax=3))
    out = hub.unsubscribe("a", hub.resource(URI).sub)  # type: ignore[union-attr]
    assert wakes(out) == [103.0]
    assert wakes(hub.disconnect("b")) == [None]
    assert hub.resource(URI).watches is None  # type: ignore[union-attr]
    assert len(hub._wakes) == 0


def test_hub_resubscribe_replaces_or_removes_the_condition() -> None:
    clock = Clock()
    hub = make_hub(clock)
    hub.subscribe("plain", URI)
    update(hub, 1.0)
    hub.subscribe("c", URI, cond=Condition(pmax=2))
    assert wakes(hub.subscribe("c", URI)) == [None]
    assert notifies(update(hub, 1.01), "c")[0]["value"] == 1.01
    hub.subscribe("c", URI, cond=Condition(st=5))
    assert delivered(update(hub, 2.0), "c") == []


def test_hub_min_pmax_and_since_with_cond() -> None:
    clock = Clock()
    hub = Hub[str](linger=0, min_pmax=1.0, monotonic=clock)
    with pytest.raises(FrameError) as caught:
        hub.subscribe("c", URI, frame_id=7, cond=Condition(pmax=0.5))
    assert caught.value.code == frames.BAD_REQUEST and "min_pmax" in caught.value.message
    assert hub.subscriptions_of("c") == ()
    hub.subscribe("plain", URI)
    update(hub, 1.0)
    update(hub, 2.0)
    epoch = hub.epoch_of(hub.resource(URI))  # type: ignore[arg-type]
    out = hub.subscribe("c", URI, since=frames.Since(epoch, 1), cond=Condition(st=1))
    frames_out = delivered(out, "c")
    assert frames_out[0]["type"] == "subscribed" and frames_out[0]["recovered"] is False
    assert [f.get("replay") for f in frames_out[1:]] == [None]    # the current value only
    assert frames_out[1]["value"] == 2.0


def test_hub_repeats_due_together_share_one_text() -> None:
    clock = Clock()
    hub = make_hub(clock)
    hub.subscribe("plain", URI)
    update(hub, 1.0)
    for conn in ("a", "b", "c"):
        hub.subscribe(conn, URI, cond=Condition(pmax=2))
    clock.now = 102.0
    repeats = [c for c in hub.wake() if isinstance(c, Repeat)]
    assert len(repeats) == 1 and repeats[0].targets == ("a", "b", "c")
    assert hub.deliveries_total == 1 + 3   # the update to "plain", then the repeats


def test_hub_a_moved_resource_keeps_its_conditional_subscriptions_timers() -> None:
    clock = Clock()
    hub = make_hub(clock)
    hub.subscribe("plain", URI)
    update(hub, 1.0)
    hub.subscribe("c", URI, cond=Condition(pmax=2))
    moved = "coap://other.example/temperature"
    hub.move(URI, moved)                      # its endpoint registered from another address
    clock.now = 102.0
    repeats = [c for c in hub.wake() if isinstance(c, Repeat)]
    assert len(repeats) == 1 and repeats[0].targets == ("c",)
    hub.disconnect("c")
    assert len(hub._wakes) == 0
