"""Tests for translator.core.hub: the I/O-free subscription core (events in, commands out).

Connections are plain hashable objects (strings, object()); the clock is fake. Expectations
come from the protocol contract: one upstream observation per resource, shared sub ids,
cached values for late joiners, linger/stop lifecycle, pinned resources, status frames,
limits, and one Deliver command (one serialized text) per fan-out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from translator.core.frames import LIMIT, NOT_FOUND, FrameError
from translator.core.hub import (
    DEFAULT_MAX_AGE,
    TRANSITIONS,
    Command,
    Deliver,
    Hub,
    StartLinger,
    StartObservation,
    StopObservation,
    transition,
)

NOW = 1000.0
ORIGIN = "coap://h:5683"
TEMP = f"{ORIGIN}/temperature"
HUM = f"{ORIGIN}/humidity"
OTHER = "coap://other:5683/x"
LINKS = '</temperature>;rt="temperature-c";if="sensor";ct=60;obs,</status>;ct=0'

Conn = Any


def make_hub(**kwargs: Any) -> Hub[Conn]:
    kwargs.setdefault("clock", lambda: NOW)
    return Hub(**kwargs)


def delivers(commands: Sequence[Command[Conn]]) -> list[Deliver[Conn]]:
    return [c for c in commands if isinstance(c, Deliver)]


def lifecycle(commands: Sequence[Command[Conn]]) -> list[Command[Conn]]:
    """The non-Deliver commands, in order."""
    return [c for c in commands if not isinstance(c, Deliver)]


def frames_to(commands: Sequence[Command[Conn]], conn: Conn) -> list[dict[str, Any]]:
    """The frames `conn` receives from these commands, decoded, in order."""
    return [json.loads(c.text) for c in delivers(commands) if conn in c.targets]


def types_to(commands: Sequence[Command[Conn]], conn: Conn) -> list[str]:
    return [frame["type"] for frame in frames_to(commands, conn)]


def ok(hub: Hub[Conn], uri: str, payload: bytes = b"21.5", **kwargs: Any) -> list[Command[Conn]]:
    """A 2.05 application/json answer from the sensor."""
    kwargs.setdefault("cf", 50)
    return hub.upstream_response(uri, code="2.05", payload=payload, **kwargs)


def sub_of(hub: Hub[Conn], conn: Conn, uri: str) -> str:
    commands = hub.subscribe(conn, uri)
    return str(frames_to(commands, conn)[0]["sub"])


# --- subscribe ---------------------------------------------------------------------------------


def test_first_subscribe_replies_and_starts_one_observation() -> None:
    hub = make_hub()
    commands = hub.subscribe("a", TEMP, 1)
    assert len(commands) == 2
    reply = commands[0]
    assert isinstance(reply, Deliver)
    assert reply.targets == ("a",)
    frame = json.loads(reply.text)
    assert frame == {"type": "subscribed", "id": 1, "sub": frame["sub"], "uri": TEMP,
                     "epoch": f"{hub.epoch}-{frame['sub']}"}
    assert isinstance(frame["sub"], str) and frame["sub"]
    assert commands[1] == StartObservation(TEMP)
    assert hub.observed_uris == (TEMP,)
    assert hub.subscriptions_of("a") == (frame["sub"],)


def test_second_subscriber_shares_observation_and_sub() -> None:
    hub = make_hub()
    first = sub_of(hub, "a", TEMP)
    commands = hub.subscribe("b", TEMP, "x")
    assert lifecycle(commands) == []
    assert frames_to(commands, "b") == [
        {"type": "subscribed", "id": "x", "sub": first, "uri": TEMP,
         "epoch": f"{hub.epoch}-{first}"}
    ]
    assert frames_to(commands, "a") == []
    assert hub.subscriptions_of("b") == (first,)


def test_different_resources_get_different_subs_and_observations() -> None:
    hub = make_hub()
    c1 = hub.subscribe("a", TEMP)
    c2 = hub.subscribe("a", HUM)
    assert lifecycle(c1) == [StartObservation(TEMP)]
    assert lifecycle(c2) == [StartObservation(HUM)]
    s1, s2 = frames_to(c1, "a")[0]["sub"], frames_to(c2, "a")[0]["sub"]
    assert s1 != s2
    assert set(hub.subscriptions_of("a")) == {s1, s2}
    assert set(hub.observed_uris) == {TEMP, HUM}


def test_subscribing_twice_is_idempotent() -> None:
    hub = make_hub()
    sub = sub_of(hub, "a", TEMP)
    again = hub.subscribe("a", TEMP, 2)
    assert lifecycle(again) == []
    assert frames_to(again, "a")[0] == {"type": "subscribed", "id": 2, "sub": sub, "uri": TEMP,
                                        "epoch": f"{hub.epoch}-{sub}"}
    assert hub.subscriptions_of("a") == (sub,)
    notify = delivers(ok(hub, TEMP))
    assert len(notify) == 2  # status online, then the notification
    for command in notify:
        assert command.targets == ("a",)
    # One unsubscribe is enough to leave: the subscription was held once.
    hub.unsubscribe("a", sub)
    assert hub.subscriptions_of("a") == ()
    assert delivers(ok(hub, TEMP)) == []


def test_many_subscribers_get_one_deliver_with_one_text() -> None:
    hub = make_hub()
    conns = [object() for _ in range(5)]
    sub = ""
    for conn in conns:
        sub = sub_of(hub, conn, TEMP)
    ok(hub, TEMP)  # the online status
    commands = ok(hub, TEMP, b"22")
    assert len(commands) == 1
    command = commands[0]
    assert isinstance(command, Deliver)
    assert len(command.targets) == len(conns)
    assert set(command.targets) == set(conns)
    frame = json.loads(command.text)
    assert frame["sub"] == sub
    assert frame["value"] == 22


def test_notify_frame_contents() -> None:
    hub = make_hub()
    sub = sub_of(hub, "a", TEMP)
    commands = hub.upstream_response(TEMP, code="2.05", cf=60, payload=bytes.fromhex("f94d60"),
                                     max_age=30)
    assert types_to(commands, "a") == ["status", "notify"]
    status, notify = frames_to(commands, "a")
    assert status == {"type": "status", "sub": sub, "uri": TEMP, "state": "online"}
    assert notify == {"type": "notify", "sub": sub, "uri": TEMP, "seq": 1, "code": "2.05",
                      "cf": 60, "value": 21.5, "ts": NOW, "max_age": 30}
    assert list(notify) == ["type", "sub", "uri", "seq", "code", "cf", "value", "ts", "max_age"]


def test_notify_defaults_and_explicit_time() -> None:
    hub = make_hub()
    hub.subscribe("a", TEMP)
    frame = frames_to(ok(hub, TEMP, now=1234.5), "a")[-1]
    assert frame["max_age"] == DEFAULT_MAX_AGE == 60
    assert frame["ts"] == 1234.5
    assert frames_to(ok(hub, TEMP), "a")[-1]["ts"] == NOW


def test_seq_counts_accepted_updates_only() -> None:
    hub = make_hub()
    hub.subscribe("a", TEMP)
    seqs = []
    for code in ["2.05", "2.05", "4.04", "5.03", "2.05", "2.05"]:
        commands = hub.upstream_response(TEMP, code=code, cf=50, payload=b"1")
        seqs += [f["seq"] for f in frames_to(commands, "a") if f["type"] == "notify"]
    assert seqs == [1, 2, 3, 4]


# --- status ------------------------------------------------------------------------------------


def test_error_code_goes_offline_once_then_online_again() -> None:
    hub = make_hub()
    sub = sub_of(hub, "a", TEMP)
    first = hub.upstream_response(TEMP, code="4.04", cf=None, payload=b"")
    assert len(first) == 1
    (status,) = frames_to(first, "a")
    assert status["type"] == "status"
    assert (status["sub"], status["uri"], status["state"], status["code"]) == (
        sub, TEMP, "offline", "4.04")
    assert set(status) <= {"type", "sub", "uri", "state", "reason", "code"}
    assert hub.upstream_response(TEMP, code="4.04", cf=None, payload=b"") == []
    back = ok(hub, TEMP)
    assert types_to(back, "a") == ["status", "notify"]
    online = frames_to(back, "a")[0]
    # Every change after the first answer says why (issue 3); the first `online` does not.
    assert online == {"type": "status", "sub": sub, "uri": TEMP, "state": "online",
                      "reason": "the sensor answers again"}
    assert ok(hub, TEMP, b"2") and types_to(ok(hub, TEMP, b"3"), "a") == ["notify"]


def test_upstream_status_only_when_it_changes() -> None:
    hub = make_hub()
    hub.subscribe("a", TEMP)
    hub.subscribe("b", TEMP)
    commands = hub.upstream_status(TEMP, "offline", "no answer")
    assert len(commands) == 1
    command = commands[0]
    assert isinstance(command, Deliver)
    assert set(command.targets) == {"a", "b"}
    frame = json.loads(command.text)
    assert (frame["state"], frame["reason"]) == ("offline", "no answer")
    assert "code" not in frame
    assert hub.upstream_status(TEMP, "offline", "no answer") == []
    assert hub.upstream_status(TEMP, "stale", "quiet") == []  # only a fresh value goes stale
    ok(hub, TEMP)
    assert len(hub.upstream_status(TEMP, "stale", "quiet")) == 1


def test_late_joiner_gets_cached_value_same_text_object() -> None:
    hub = make_hub()
    hub.subscribe("a", TEMP)
    ok(hub, TEMP)
    (delivered,) = ok(hub, TEMP, b"23")
    assert isinstance(delivered, Deliver)
    commands = hub.subscribe("b", TEMP, 9)
    assert lifecycle(commands) == []
    assert types_to(commands, "b") == ["subscribed", "notify"]
    cached = delivers(commands)[1]
    assert cached.targets == ("b",)
    assert cached.text is delivered.text
    assert json.loads(cached.text)["seq"] == 2


def test_late_joiner_of_offline_resource_gets_status_after_subscribed() -> None:
    hub = make_hub()
    hub.subscribe("a", TEMP)
    hub.upstream_response(TEMP, code="4.04", cf=None, payload=b"")
    commands = hub.subscribe("b", TEMP)
    assert types_to(commands, "b") == ["subscribed", "status"]
    status = frames_to(commands, "b")[1]
    assert (status["state"], status["code"]) == ("offline", "4.04")


def test_late_joiner_of_value_then_offline_gets_both_in_order() -> None:
    hub = make_hub()
    hub.subscribe("a", TEMP)
    ok(hub, TEMP)
    hub.upstream_status(TEMP, "offline", "timeout")
    commands = hub.subscribe("b", TEMP)
    assert types_to(commands, "b") == ["subscribed", "notify", "status"]
    assert frames_to(commands, "b")[2]["state"] == "offline"


def test_late_joiner_of_online_resource_gets_no_status() -> None:
    hub = make_hub()
    hub.subscribe("a", TEMP)
    hub.upstream_status(TEMP, "offline", "timeout")
    ok(hub, TEMP)
    assert types_to(hub.subscribe("b", TEMP), "b") == ["subscribed", "notify"]


def test_no_upstream_events_for_unknown_or_unobserved_resources() -> None:
    hub = make_hub(linger=0)
    assert ok(hub, TEMP) == []
    assert hub.upstream_status(TEMP, "offline", "x") == []
    sub = sub_of(hub, "a", TEMP)
    hub.unsubscribe("a", sub)
    assert ok(hub, TEMP) == []  # a late answer after StopObservation
    assert hub.upstream_status(TEMP, "offline", "x") == []
    hub.subscribe("a", TEMP)
    assert [f["seq"] for f in frames_to(ok(hub, TEMP), "a") if f["type"] == "notify"] == [1]


# --- unsubscribe, linger, disconnect ----------------------------------------------------------


def test_unsubscribe_last_subscriber_starts_linger_then_stops() -> None:
    hub = make_hub(linger=5.0)
    sub = sub_of(hub, "a", TEMP)
    commands = hub.unsubscribe("a", sub, "u1")
    assert frames_to(commands, "a") == [{"type": "unsubscribed", "id": "u1", "sub": sub}]
    linger = lifecycle(commands)
    assert len(linger) == 1
    assert isinstance(linger[0], StartLinger)
    assert (linger[0].uri, linger[0].delay) == (TEMP, 5.0)
    assert hub.subscriptions_of("a") == ()
    assert hub.observed_uris == (TEMP,)  # still observed while lingering
    assert hub.linger_expired(TEMP, linger[0].generation) == [StopObservation(TEMP)]
    assert not hub.observed_uris
    assert hub.linger_expired(TEMP, linger[0].generation) == []


def test_unsubscribe_with_linger_zero_stops_at_once() -> None:
    hub = make_hub(linger=0)
    sub = sub_of(hub, "a", TEMP)
    assert lifecycle(hub.unsubscribe("a", sub)) == [StopObservation(TEMP)]
    assert hub.observed_uris == ()


def test_unsubscribe_not_last_keeps_observing() -> None:
    hub = make_hub(linger=0)
    sub = sub_of(hub, "a", TEMP)
    hub.subscribe("b", TEMP)
    assert lifecycle(hub.unsubscribe("a", sub)) == []
    assert hub.observed_uris == (TEMP,)
    (notify,) = ok(hub, TEMP)[1:]
    assert isinstance(notify, Deliver) and notify.targets == ("b",)


def test_subscribe_during_linger_cancels_it() -> None:
    hub = make_hub(linger=5.0)
    sub = sub_of(hub, "a", TEMP)
    (linger,) = lifecycle(hub.unsubscribe("a", sub))
    assert isinstance(linger, StartLinger)
    commands = hub.subscribe("b", TEMP)
    assert lifecycle(commands) == []  # still observed: no second StartObservation
    assert frames_to(commands, "b")[0]["sub"] == sub
    assert hub.linger_expired(TEMP, linger.generation) == []
    assert hub.observed_uris == (TEMP,)
    # The next linger has a new generation; only that one stops the observation.
    (linger2,) = lifecycle(hub.disconnect("b"))
    assert isinstance(linger2, StartLinger)
    assert linger2.generation != linger.generation
    assert hub.linger_expired(TEMP, linger.generation) == []
    assert hub.linger_expired(TEMP, linger2.generation) == [StopObservation(TEMP)]


def test_seq_and_sub_continue_after_a_linger_stop() -> None:
    hub = make_hub(linger=5.0)
    sub = sub_of(hub, "a", TEMP)
    ok(hub, TEMP)
    (last,) = ok(hub, TEMP, b"2")
    assert isinstance(last, Deliver)
    (linger,) = lifecycle(hub.unsubscribe("a", sub))
    assert isinstance(linger, StartLinger)
    assert hub.linger_expired(TEMP, linger.generation) == [StopObservation(TEMP)]
    again = hub.subscribe("a", TEMP)
    assert lifecycle(again) == [StartObservation(TEMP)]
    assert frames_to(again, "a")[0]["sub"] == sub
    notifies = [f for f in frames_to(ok(hub, TEMP, b"3"), "a") if f["type"] == "notify"]
    assert [f["seq"] for f in notifies] == [3]


def test_state_is_forgotten_when_the_observation_stops() -> None:
    hub = make_hub(linger=0)
    sub = sub_of(hub, "a", TEMP)
    hub.upstream_response(TEMP, code="4.04", cf=None, payload=b"")
    hub.unsubscribe("a", sub)
    # A new observation starts from scratch: no stale "offline" for the new subscriber,
    # and the same error reported again is a state change again.
    assert "status" not in types_to(hub.subscribe("b", TEMP), "b")
    assert types_to(hub.upstream_response(TEMP, code="4.04", cf=None, payload=b""), "b") == [
        "status"]


def test_unsubscribe_unknown_sub_is_not_found() -> None:
    hub = make_hub()
    sub = sub_of(hub, "a", TEMP)
    for conn, wrong in [("b", sub), ("a", "s999"), ("never-seen", sub), ("a", "")]:
        with pytest.raises(FrameError) as info:
            hub.unsubscribe(conn, wrong, "q")
        assert (info.value.code, info.value.frame_id) == (NOT_FOUND, "q")
    assert hub.subscriptions_of("a") == (sub,)
    assert hub.observed_uris == (TEMP,)
    hub.unsubscribe("a", sub)
    with pytest.raises(FrameError) as info:
        hub.unsubscribe("a", sub, 4)
    assert info.value.code == NOT_FOUND


def test_max_subscriptions() -> None:
    hub = make_hub(max_subscriptions=2)
    hub.subscribe("a", TEMP)
    hub.subscribe("a", HUM)
    with pytest.raises(FrameError) as info:
        hub.subscribe("a", OTHER, "z")
    assert (info.value.code, info.value.frame_id) == (LIMIT, "z")
    assert len(hub.subscriptions_of("a")) == 2
    assert OTHER not in hub.observed_uris
    # Re-subscribing to a held resource is not a new subscription; other connections have
    # their own budget.
    assert types_to(hub.subscribe("a", TEMP), "a") == ["subscribed"]
    assert lifecycle(hub.subscribe("b", OTHER)) == [StartObservation(OTHER)]


def test_disconnect_removes_every_subscription() -> None:
    hub = make_hub(linger=0)
    hub.connect("a")
    hub.subscribe("a", TEMP)
    hub.subscribe("a", HUM)
    hub.subscribe("b", HUM)
    assert hub.connection_count == 2
    commands = hub.disconnect("a")
    assert delivers(commands) == []
    assert lifecycle(commands) == [StopObservation(TEMP)]
    assert hub.subscriptions_of("a") == ()
    assert hub.connection_count == 1
    assert hub.observed_uris == (HUM,)
    for command in delivers(ok(hub, HUM)):
        assert command.targets == ("b",)
    assert hub.disconnect("a") == []
    assert hub.disconnect("nobody") == []


def test_disconnect_lingers_each_resource() -> None:
    hub = make_hub(linger=2.5)
    hub.subscribe("a", TEMP)
    hub.subscribe("a", HUM)
    commands = hub.disconnect("a")
    assert {(c.uri, c.delay) for c in commands if isinstance(c, StartLinger)} == {
        (TEMP, 2.5), (HUM, 2.5)}
    assert len(commands) == 2


# --- pinned resources --------------------------------------------------------------------------


def test_pinned_resources_are_observed_at_startup_and_never_stopped() -> None:
    hub = make_hub(linger=0, pinned=[TEMP])
    assert hub.observed_uris == ()
    assert hub.startup() == [StartObservation(TEMP)]
    assert hub.startup() == []
    assert ok(hub, TEMP) == []  # cached, nobody to tell
    commands = hub.subscribe("a", TEMP)
    assert lifecycle(commands) == []
    assert types_to(commands, "a") == ["subscribed", "notify"]
    sub = frames_to(commands, "a")[0]["sub"]
    assert lifecycle(hub.unsubscribe("a", sub)) == []
    hub.subscribe("b", TEMP)
    assert hub.disconnect("b") == []
    for generation in range(-2, 10):
        assert hub.linger_expired(TEMP, generation) == []
    assert set(hub.observed_uris) == {TEMP}
    assert [f["seq"] for f in frames_to(ok(hub, TEMP), "b")] == []


def test_pinned_resource_subscribed_before_startup_is_observed_once() -> None:
    hub = make_hub(pinned=[TEMP])
    assert lifecycle(hub.subscribe("a", TEMP)) == [StartObservation(TEMP)]
    assert hub.startup() == []


# --- names, links, listing ---------------------------------------------------------------------


def test_sensor_names() -> None:
    hub = make_hub(sensors={"temp": TEMP})
    assert hub.uri_for_name("temp") == TEMP
    assert hub.uri_for_name("nope") is None


def test_set_links_and_advertised_cf() -> None:
    hub = make_hub()
    hub.set_links(ORIGIN, LINKS)
    assert hub.advertised_cf(TEMP) == 60
    assert hub.advertised_cf(f"{ORIGIN}/status") == 0
    assert hub.advertised_cf(HUM) is None


def test_advertised_cf_is_used_when_the_answer_has_none() -> None:
    hub = make_hub()
    hub.set_links(ORIGIN, LINKS)
    hub.subscribe("a", TEMP)
    frame = frames_to(hub.upstream_response(TEMP, code="2.05", cf=None,
                                            payload=bytes.fromhex("f94d60")), "a")[-1]
    assert frame["value"] == 21.5
    assert frame["cf"] is None


@pytest.mark.parametrize(
    ("ct", "cf"),
    [("60", 60), ('"60 50"', 60), ("0", 0), ("65535", 65535), ("65536", None), ("x", None),
     ('"²"', None), ('"٣"', None), ("9" * 5000, None), ('""', None)],
    ids=["60", "list", "0", "max", "too-big", "word", "superscript-2", "arabic-indic-3",
         "5000-digits", "empty"],
)
def test_link_ct_values(ct: str, cf: int | None) -> None:
    hub = make_hub()
    hub.set_links(ORIGIN, f"</a>;ct={ct},</b>;ct=42")
    assert hub.advertised_cf(f"{ORIGIN}/a") == cf
    assert hub.advertised_cf(f"{ORIGIN}/b") == 42  # one bad attribute does not lose the rest


def test_set_links_href_forms() -> None:
    hub = make_hub()
    hub.set_links(ORIGIN, '<relative>;ct=1,<coap://Other:5683/abs>;ct=2,<coap://bad host/x>;ct=3')
    assert hub.advertised_cf(f"{ORIGIN}/relative") == 1
    assert hub.advertised_cf("coap://other:5683/abs") == 2
    assert [e["uri"] for e in hub.list_entries(lambda uri: True)] == [
        f"{ORIGIN}/relative", "coap://other:5683/abs"]


def test_list_entries_merges_sensors_links_and_subscriptions() -> None:
    hub = make_hub(sensors={"temp": TEMP, "hum": HUM})
    hub.set_links(ORIGIN, LINKS)
    sub = sub_of(hub, "a", OTHER)
    ok(hub, OTHER, b'{"on":true}')
    entries = {e["uri"]: e for e in hub.list_entries(lambda uri: True)}
    assert set(entries) == {TEMP, HUM, f"{ORIGIN}/status", OTHER}

    temp = entries[TEMP]
    assert (temp["name"], temp["observable"], temp["cf"], temp["rt"], temp["if"]) == (
        "temp", True, 60, "temperature-c", "sensor")
    assert isinstance(temp["sub"], str)
    assert "value" not in temp

    hum = entries[HUM]
    assert hum["name"] == "hum"
    assert (hum["cf"], hum["rt"], hum["if"]) == (None, None, None)

    status = entries[f"{ORIGIN}/status"]
    assert status["name"] is None
    assert status["cf"] == 0
    assert not status["observable"]
    assert (status["rt"], status["if"]) == (None, None)

    other = entries[OTHER]
    assert other["sub"] == sub
    assert other["value"] == {"on": True}
    assert other["ts"] == NOW
    assert other["name"] is None
    for entry in entries.values():
        assert {"uri", "name", "observable", "cf", "rt", "if"} <= set(entry)
    assert len({e["sub"] for e in entries.values() if "sub" in e}) == len(
        [e for e in entries.values() if "sub" in e])
    json.dumps(list(entries.values()), allow_nan=False)


def test_list_entries_filters_with_the_predicate() -> None:
    hub = make_hub(sensors={"temp": TEMP})
    hub.set_links(ORIGIN, LINKS)
    hub.subscribe("a", OTHER)
    seen: list[str] = []

    def allowed(uri: str) -> bool:
        seen.append(uri)
        return uri.startswith(ORIGIN) and not uri.endswith("/status")

    assert [e["uri"] for e in hub.list_entries(allowed)] == [TEMP]
    assert set(seen) == {TEMP, f"{ORIGIN}/status", OTHER}
    assert hub.list_entries(lambda uri: False) == []


@pytest.mark.parametrize(("cf", "payload"), [
    (50, b'{"t": 0.1, "big": 123456789012345678901234567890, "s": "\\u00e9\\n"}'),
    (50, b"{not json"),  # payload_b64 and decode_error
    (42, b"\x00\x01"),  # opaque: payload_b64 alone
    (None, b""),  # no payload: no value fields
])
def test_list_shows_the_value_fields_of_the_latest_notify_exactly(
    cf: int | None, payload: bytes
) -> None:
    """The listing reads the value back from the kept notify text: the same fields with
    the same values as the notify itself (and as the decoded payload before it)."""
    hub = make_hub()
    sub_of(hub, "a", OTHER)
    (notify,) = [f for f in frames_to(ok(hub, OTHER, payload, cf=cf), "a")
                 if f["type"] == "notify"]
    (entry,) = hub.list_entries(lambda uri: True)
    fields = ("value", "payload_b64", "decode_error")
    assert {k: entry[k] for k in fields if k in entry} == {
        k: notify[k] for k in fields if k in notify
    }
    assert entry["ts"] == NOW


def test_an_online_status_is_not_kept_for_late_joiners_but_others_are() -> None:
    hub = make_hub()
    sub_of(hub, "a", OTHER)
    ok(hub, OTHER)
    resource = hub.resource(OTHER)
    assert resource is not None and resource.last_status is None
    assert [f["type"] for f in frames_to(hub.subscribe("b", OTHER), "b")] == [
        "subscribed", "notify"]
    hub.upstream_stale(OTHER, "no notification within Max-Age (60 s)")
    assert [f["type"] for f in frames_to(hub.subscribe("c", OTHER), "c")] == [
        "subscribed", "notify", "status"]


def test_observe_flag_of_an_answer_shows_in_the_listing() -> None:
    hub = make_hub()
    hub.subscribe("a", OTHER)
    ok(hub, OTHER, observe=False)
    (entry,) = hub.list_entries(lambda uri: True)
    assert entry["observable"] is False


# --- random sequences --------------------------------------------------------------------------

CONNS = ("a", "b", "c")
URIS = (f"{ORIGIN}/1", f"{ORIGIN}/2", f"{ORIGIN}/3")
PINNED = URIS[2]


class HubMachine(RuleBasedStateMachine):
    """Drive a hub with random events and compare with a simple model of the contract."""

    LINGER = 5.0

    def __init__(self) -> None:
        super().__init__()
        self.hub: Hub[str] = make_hub(linger=self.LINGER, pinned=[PINNED])
        self.subs: dict[str, set[str]] = {uri: set() for uri in URIS}
        self.observing = {uri: False for uri in URIS}
        self.pending: dict[str, int | None] = dict.fromkeys(URIS)
        self.issued: dict[str, list[int]] = {uri: [] for uri in URIS}
        self.sub_ids: dict[str, str] = {}
        self.seq = dict.fromkeys(URIS, 0)
        self.connected: set[str] = set()
        self.ids = 0
        for command in self.hub.startup():
            self.apply(command)
        assert self.observing[PINNED]

    # -- helpers --------------------------------------------------------------------------

    def apply(self, command: Command[str]) -> None:
        """Check a lifecycle command against the model and update the model."""
        if isinstance(command, Deliver):
            assert set(command.targets) <= self.connected, "delivery to a gone connection"
            assert len(set(command.targets)) == len(command.targets)
        elif isinstance(command, StartObservation):
            assert not self.observing[command.uri], "observation started twice"
            self.observing[command.uri] = True
            self.pending[command.uri] = None
        elif isinstance(command, StopObservation):
            assert self.observing[command.uri], "stopping what is not observed"
            assert command.uri != PINNED
            assert not self.subs[command.uri]
            self.observing[command.uri] = False
            self.pending[command.uri] = None
        else:
            assert isinstance(command, StartLinger)
            assert self.LINGER > 0
            assert command.delay == self.LINGER
            assert command.generation not in self.issued[command.uri]
            assert not self.subs[command.uri]
            self.issued[command.uri].append(command.generation)
            self.pending[command.uri] = command.generation

    def expect_release(self, uri: str) -> list[Command[str]]:
        """The lifecycle commands the last subscriber leaving `uri` must produce."""
        if self.subs[uri] or uri == PINNED:
            return []
        if self.LINGER > 0:
            return [StartLinger(uri, self.LINGER, -1)]  # generation checked in apply
        return [StopObservation(uri)]

    @staticmethod
    def shape(commands: Sequence[Command[str]]) -> list[Any]:
        return [
            (type(c).__name__, c.uri) for c in commands if not isinstance(c, Deliver)
        ]

    # -- rules ----------------------------------------------------------------------------

    @rule(conn=st.sampled_from(CONNS))
    def connect(self, conn: str) -> None:
        self.hub.connect(conn)
        self.connected.add(conn)

    @rule(conn=st.sampled_from(CONNS), uri=st.sampled_from(URIS))
    def subscribe(self, conn: str, uri: str) -> None:
        self.connected.add(conn)
        self.ids += 1
        commands = self.hub.subscribe(conn, uri, self.ids)
        first = commands[0]
        assert isinstance(first, Deliver) and first.targets == (conn,)
        reply = json.loads(first.text)
        assert (reply["type"], reply["id"], reply["uri"]) == ("subscribed", self.ids, uri)
        assert self.sub_ids.setdefault(uri, reply["sub"]) == reply["sub"]
        for deliver in delivers(commands):
            assert deliver.targets == (conn,)
        expected = [] if self.observing[uri] else [("StartObservation", uri)]
        assert self.shape(commands) == expected
        for command in commands:
            self.apply(command)
        self.subs[uri].add(conn)
        self.pending[uri] = None  # a pending linger no longer applies

    @rule(conn=st.sampled_from(CONNS), uri=st.sampled_from(URIS))
    def unsubscribe(self, conn: str, uri: str) -> None:
        sub = self.sub_ids.get(uri, "s-unknown")
        if conn not in self.subs[uri]:
            with pytest.raises(FrameError) as info:
                self.hub.unsubscribe(conn, sub, "u")
            assert info.value.code == NOT_FOUND
            return
        commands = self.hub.unsubscribe(conn, sub, "u")
        assert frames_to(commands, conn) == [{"type": "unsubscribed", "id": "u", "sub": sub}]
        assert len(delivers(commands)) == 1
        self.subs[uri].discard(conn)
        assert self.shape(commands) == self.shape(self.expect_release(uri))
        for command in commands:
            self.apply(command)

    @rule(conn=st.sampled_from(CONNS))
    def disconnect(self, conn: str) -> None:
        held = [uri for uri in URIS if conn in self.subs[uri]]
        commands = self.hub.disconnect(conn)
        self.connected.discard(conn)
        assert delivers(commands) == []
        expected = []
        for uri in held:
            self.subs[uri].discard(conn)
            expected += self.shape(self.expect_release(uri))
        assert sorted(self.shape(commands)) == sorted(expected)
        for command in commands:
            self.apply(command)

    @rule(uri=st.sampled_from(URIS), pick=st.integers(0, 40), issued=st.booleans())
    def linger_expired(self, uri: str, pick: int, issued: bool) -> None:
        if issued and self.issued[uri]:
            generation = self.issued[uri][pick % len(self.issued[uri])]
        else:
            generation = pick - 5
        commands = self.hub.linger_expired(uri, generation)
        due = self.pending[uri] is not None and generation == self.pending[uri]
        assert commands == ([StopObservation(uri)] if due else [])
        for command in commands:
            self.apply(command)

    @rule(uri=st.sampled_from(URIS), code=st.sampled_from(["2.05", "2.05", "4.04", "5.03"]))
    def upstream_response(self, uri: str, code: str) -> None:
        commands = self.hub.upstream_response(uri, code=code, cf=50, payload=b"1")
        if not self.observing[uri]:
            assert commands == []
            return
        assert self.shape(commands) == []
        for command in delivers(commands):
            self.apply(command)
            assert set(command.targets) == self.subs[uri]
        if code.startswith("2."):
            self.seq[uri] += 1
            if self.subs[uri]:
                notify = json.loads(delivers(commands)[-1].text)
                assert (notify["type"], notify["seq"]) == ("notify", self.seq[uri])
                assert notify["sub"] == self.sub_ids[uri]

    # -- invariants -----------------------------------------------------------------------

    @invariant()
    def observing_count_is_the_observed_resources(self) -> None:
        assert self.hub.observing_count == sum(self.observing.values())

    @invariant()
    def observing_iff_needed(self) -> None:
        needed = {
            uri for uri in URIS
            if self.subs[uri] or uri == PINNED or self.pending[uri] is not None
        }
        assert {uri for uri in URIS if self.observing[uri]} == needed
        assert set(self.hub.observed_uris) == needed

    @invariant()
    def subscriptions_match_subscribers(self) -> None:
        for conn in CONNS:
            held = set(self.hub.subscriptions_of(conn))
            assert len(held) == len(self.hub.subscriptions_of(conn))
            by_resource = set()
            for uri in URIS:
                resource = self.hub.resource(uri)
                if resource is not None and conn in resource.subscribers:
                    by_resource.add(resource.sub)
            assert held == by_resource
            assert held == {self.sub_ids[uri] for uri in URIS if conn in self.subs[uri]}


class HubMachineNoLinger(HubMachine):
    LINGER = 0.0


TestHubMachine = HubMachine.TestCase
TestHubMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
TestHubMachineNoLinger = HubMachineNoLinger.TestCase
TestHubMachineNoLinger.settings = settings(max_examples=100, stateful_step_count=40,
                                           deadline=None)


@given(st.lists(st.tuples(st.sampled_from(CONNS), st.sampled_from(URIS)), max_size=30),
       st.integers(1, 5))
def test_fan_out_is_one_command_to_exactly_the_subscribers(
    pairs: list[tuple[str, str]], payload: int
) -> None:
    hub = make_hub()
    expected: dict[str, set[str]] = {}
    for conn, uri in pairs:
        hub.subscribe(conn, uri)
        expected.setdefault(uri, set()).add(conn)
    for uri, conns in expected.items():
        ok(hub, uri)
        commands = ok(hub, uri, str(payload).encode())
        assert len(commands) == 1
        command = commands[0]
        assert isinstance(command, Deliver)
        assert sorted(command.targets) == sorted(conns)
        assert json.loads(command.text)["value"] == payload


def test_rediscovery_replaces_links_and_resolves_network_path_references() -> None:
    hub: Hub[str] = Hub(linger=0)
    origin = "coap://127.0.0.1:5683"
    hub.set_links(origin, '</a>;ct=60;obs,</b>;ct=0,<//10.0.0.9/c>;rt="x"')
    uris = {e["uri"] for e in hub.list_entries(lambda uri: True)}
    assert uris == {f"{origin}/a", f"{origin}/b", "coap://10.0.0.9:5683/c"}
    assert hub.advertised_cf(f"{origin}/a") == 60
    hub.set_links(origin, "</b>;ct=50")
    assert {e["uri"] for e in hub.list_entries(lambda uri: True)} == {f"{origin}/b"}
    assert hub.advertised_cf(f"{origin}/b") == 50
    assert hub.advertised_cf(f"{origin}/a") is None


def test_idle_resources_are_forgotten_beyond_the_bound() -> None:
    hub: Hub[str] = Hub(linger=0, max_idle_resources=3, sensors={"named": "coap://h:5683/n"})
    subs = []
    for number in range(10):
        uri = f"coap://h:5683/r{number}"
        subs.append(hub.subscribe("c", uri)[0].text)
        hub.unsubscribe("c", json.loads(subs[-1])["sub"])
    hub.subscribe("c", "coap://h:5683/n")
    hub.disconnect("c")
    remembered = {e["uri"] for e in hub.list_entries(lambda uri: True)}
    assert remembered == {"coap://h:5683/n", "coap://h:5683/r7", "coap://h:5683/r8",
                          "coap://h:5683/r9"}
    # A forgotten resource comes back with a new, never reused sub.
    again = json.loads(hub.subscribe("d", "coap://h:5683/r0")[0].text)["sub"]
    assert again not in {json.loads(text)["sub"] for text in subs}


# --- supervision: the online / stale / offline table ------------------------------------------


def test_state_table() -> None:
    assert transition(None, "answered") == ("online", None)  # the first answer: no reason
    assert transition("online", "answered") == ("online", None)
    assert transition("stale", "answered") == ("online", "updates resumed")
    assert transition("offline", "answered") == ("online", "the sensor answers again")
    assert transition("online", "expired", "quiet") == ("stale", "quiet")
    for state in (None, "online", "stale", "offline"):
        assert transition(state, "failed", "no answer") == ("offline", "no answer")
    # Only a fresh value goes stale, once.
    assert transition(None, "expired", "x") is None
    assert transition("stale", "expired", "x") is None
    assert transition("offline", "expired", "x") is None
    assert {new for new, _ in TRANSITIONS.values()} == {"online", "stale", "offline"}


def statuses(commands: Sequence[Command[Conn]], conn: Conn) -> list[tuple[str, str | None]]:
    return [(f["state"], f.get("reason")) for f in frames_to(commands, conn)
            if f["type"] == "status"]


def test_online_stale_offline_online_with_reasons() -> None:
    hub = make_hub()
    hub.subscribe("a", TEMP)
    assert statuses(ok(hub, TEMP), "a") == [("online", None)]
    assert statuses(hub.upstream_stale(TEMP, "no notification within Max-Age (60 s)"), "a") == [
        ("stale", "no notification within Max-Age (60 s)")]
    assert hub.upstream_stale(TEMP, "again") == []
    assert statuses(hub.upstream_failed(TEMP, "no answer within 10 s"), "a") == [
        ("offline", "no answer within 10 s")]
    assert hub.upstream_failed(TEMP, "no answer within 10 s") == []
    # Still offline, but for another reason: clients hear about it.
    assert statuses(hub.upstream_failed(TEMP, "Network error"), "a") == [
        ("offline", "Network error")]
    back = ok(hub, TEMP, b"2")
    assert statuses(back, "a") == [("online", "the sensor answers again")]
    assert types_to(back, "a") == ["status", "notify"]
    hub.upstream_stale(TEMP, "quiet")
    assert statuses(ok(hub, TEMP, b"3"), "a") == [("online", "updates resumed")]
    assert statuses(ok(hub, TEMP, b"4"), "a") == []


def test_late_joiner_of_a_stale_resource_gets_the_stale_status() -> None:
    hub = make_hub()
    hub.subscribe("a", TEMP)
    ok(hub, TEMP)
    hub.upstream_stale(TEMP, "quiet")
    commands = hub.subscribe("b", TEMP)
    assert types_to(commands, "b") == ["subscribed", "notify", "status"]
    assert frames_to(commands, "b")[2]["state"] == "stale"


def test_unchanged_poll_answer_brings_it_online_without_a_notify() -> None:
    hub = make_hub()
    hub.subscribe("a", TEMP)
    ok(hub, TEMP, observe=False)
    hub.upstream_failed(TEMP, "no answer within 10 s")
    commands = hub.upstream_unchanged(TEMP, now=NOW + 30)
    assert types_to(commands, "a") == ["status"]
    assert statuses(commands, "a") == [("online", "the sensor answers again")]
    (entry,) = [e for e in hub.list_entries(lambda uri: True) if e["uri"] == TEMP]
    assert entry["last_update"] == NOW + 30 and entry["notifications"] == 1
    assert hub.upstream_unchanged(TEMP) == []


def test_list_shows_supervision_counters() -> None:
    hub = make_hub()
    hub.subscribe("a", TEMP)
    hub.subscribe("b", TEMP)
    hub.upstream_registering(TEMP)
    ok(hub, TEMP, observe=True, now=NOW + 1)
    ok(hub, TEMP, b"2", observe=True, now=NOW + 2)
    hub.upstream_failed(TEMP, "the sensor ended the observation")
    hub.upstream_registering(TEMP)
    hub.upstream_registering(OTHER)  # not observed: not counted anywhere
    (entry,) = [e for e in hub.list_entries(lambda uri: True) if e["uri"] == TEMP]
    assert (entry["state"], entry["registrations"], entry["notifications"],
            entry["subscribers"], entry["last_update"], entry["observable"]) == (
        "offline", 2, 2, 2, NOW + 2, True)


def test_observable_follows_the_latest_answer() -> None:
    hub = make_hub()
    hub.subscribe("a", TEMP)
    ok(hub, TEMP, observe=False)
    assert hub.list_entries(lambda uri: True)[0]["observable"] is False
    hub.upstream_response(TEMP, code="5.03", cf=None, payload=b"", observe=False)
    assert hub.list_entries(lambda uri: True)[0]["observable"] is False
    ok(hub, TEMP, observe=True)  # after a firmware update, say
    assert hub.list_entries(lambda uri: True)[0]["observable"] is True
    ok(hub, TEMP, observe=None)  # a notification says nothing about it
    assert hub.list_entries(lambda uri: True)[0]["observable"] is True


def test_supervision_events_after_stop_are_ignored() -> None:
    hub = make_hub(linger=0)
    sub = sub_of(hub, "a", TEMP)
    ok(hub, TEMP)
    hub.unsubscribe("a", sub)
    assert hub.upstream_stale(TEMP, "x") == []
    assert hub.upstream_failed(TEMP, "x") == []
    assert hub.upstream_unchanged(TEMP) == []
    assert hub.upstream_registering(TEMP) == []
    (entry,) = [e for e in hub.list_entries(lambda uri: True) if e["uri"] == TEMP]
    assert entry["state"] is None and entry["registrations"] == 0


# --- representations larger than max_upstream_bytes --------------------------------------------


def test_too_large_representation_is_a_notify_saying_so_once_for_everyone() -> None:
    hub = make_hub(max_upstream_bytes=2048)
    sub = sub_of(hub, "a", TEMP)
    hub.subscribe("b", TEMP)
    ok(hub, TEMP)  # seq 1
    commands = hub.upstream_too_large(TEMP, 3072, code="2.05", cf=112, max_age=30, now=1234.5)
    (deliver,) = delivers(commands)  # one text for both subscribers, replacing older notifies
    assert set(deliver.targets) == {"a", "b"} and deliver.replaces == sub
    notify = json.loads(deliver.text)
    assert notify == {
        "type": "notify", "sub": sub, "uri": TEMP, "seq": 2, "code": "2.05", "cf": 112,
        "decode_error": "representation larger than max_upstream_bytes (2048 bytes): "
                        "3072 bytes or more; dropped",
        "ts": 1234.5, "max_age": 30,
    }
    # The explanation is the cached value: a late joiner gets it, and so does the listing.
    assert frames_to(hub.subscribe("c", TEMP), "c")[1] == notify
    (entry,) = hub.list_entries(lambda uri: True)
    assert entry["decode_error"] == notify["decode_error"] and "value" not in entry
    assert entry["notifications"] == 2 and entry["state"] == "online"


def test_too_large_first_answer_goes_online_and_error_codes_stay_status() -> None:
    hub = make_hub()
    hub.subscribe("a", TEMP)
    first = hub.upstream_too_large(TEMP, 2_000_000, observe=True)
    assert types_to(first, "a") == ["status", "notify"]
    assert "1048576 bytes" in frames_to(first, "a")[1]["decode_error"]
    assert hub.list_entries(lambda uri: True)[0]["observable"] is True
    # Not a 2.xx: no notify, the resource goes offline as for any error answer.
    failed = hub.upstream_too_large(TEMP, 2_000_000, code="5.03")
    assert frames_to(failed, "a") == [{
        "type": "status", "sub": frames_to(first, "a")[1]["sub"], "uri": TEMP,
        "state": "offline", "reason": "the sensor answered 5.03", "code": "5.03",
    }]


def test_too_large_after_stop_is_ignored() -> None:
    hub = make_hub(linger=0)
    sub = sub_of(hub, "a", TEMP)
    hub.unsubscribe("a", sub)
    assert hub.upstream_too_large(TEMP, 5000) == []


# --- bounded observations (issue 13 §3) -------------------------------------------------------


def _observing(hub: Hub[Conn]) -> set[str]:
    return set(hub.observed_uris)


def test_churn_on_one_connection_keeps_its_observations_within_its_subscriptions() -> None:
    hub = make_hub(linger=5.0, max_subscriptions=2)
    hub.connect("a")
    stops = 0
    for index in range(500):
        uri = f"{ORIGIN}/r{index}"
        commands = hub.subscribe("a", uri, index)
        stops += sum(isinstance(c, StopObservation) for c in commands)
        sub = hub.resource(uri)
        assert sub is not None
        hub.unsubscribe("a", sub.sub)
        assert len(_observing(hub)) <= 2
        assert hub.observing_count == len(_observing(hub))
    assert stops >= 497  # each new observation past the bound ended a lingering one


def test_a_connection_full_of_subscriptions_gets_limit_not_a_reclaim_of_others() -> None:
    hub = make_hub(linger=5.0, max_subscriptions=2)
    for conn in ("a", "b"):
        hub.connect(conn)
    hub.subscribe("b", f"{ORIGIN}/b1")
    hub.unsubscribe("b", hub.resource(f"{ORIGIN}/b1").sub)  # type: ignore[union-attr]
    hub.subscribe("a", f"{ORIGIN}/a1")
    hub.subscribe("a", f"{ORIGIN}/a2")
    with pytest.raises(FrameError) as refused:
        hub.subscribe("a", f"{ORIGIN}/a3", "x")
    assert refused.value.code == LIMIT and refused.value.frame_id == "x"
    assert f"{ORIGIN}/b1" in _observing(hub)  # b's lingering one was not taken


def test_the_global_bound_ends_the_oldest_lingering_observation_or_refuses() -> None:
    hub = make_hub(linger=5.0, max_observations=3, pinned=[TEMP])
    hub.startup()
    for conn in ("a", "b"):
        hub.connect(conn)
    hub.subscribe("a", f"{ORIGIN}/a1")
    hub.unsubscribe("a", hub.resource(f"{ORIGIN}/a1").sub)  # type: ignore[union-attr]
    hub.subscribe("b", f"{ORIGIN}/b1")
    assert _observing(hub) == {TEMP, f"{ORIGIN}/a1", f"{ORIGIN}/b1"}
    commands = hub.subscribe("b", f"{ORIGIN}/b2")
    assert lifecycle(commands) == [StopObservation(f"{ORIGIN}/a1"),
                                   StartObservation(f"{ORIGIN}/b2")]
    with pytest.raises(FrameError) as refused:  # nothing left to end: the pinned one stays
        hub.subscribe("a", f"{ORIGIN}/a2")
    assert refused.value.code == LIMIT and "max_observations" in refused.value.message
    assert hub.observing_count == 3


def test_resubscribing_to_a_lingering_observation_needs_no_room() -> None:
    hub = make_hub(linger=5.0, max_observations=1)
    hub.connect("a")
    hub.subscribe("a", TEMP)
    hub.unsubscribe("a", hub.resource(TEMP).sub)  # type: ignore[union-attr]
    assert lifecycle(hub.subscribe("a", TEMP)) == []
    assert hub.observing_count == 1


def test_what_a_gone_connection_left_lingering_counts_only_globally() -> None:
    hub = make_hub(linger=5.0, max_subscriptions=1, max_observations=10)
    hub.connect("a")
    hub.subscribe("a", TEMP)
    hub.disconnect("a")
    hub.connect("a")  # the same object again, as a new connection
    assert lifecycle(hub.subscribe("a", HUM)) == [StartObservation(HUM)]
    assert _observing(hub) == {TEMP, HUM}


def test_idle_resources_are_bounded_in_bytes_with_their_cached_values() -> None:
    hub = make_hub(linger=0, max_idle_bytes=64 * 1024)
    hub.connect("a")
    big = b"x" * 10_000  # a 10 kB text value, cached in each notify
    for index in range(50):
        uri = f"{ORIGIN}/r{index}"
        hub.subscribe("a", uri)
        hub.upstream_response(uri, code="2.05", cf=0, payload=big)
        hub.unsubscribe("a", hub.resource(uri).sub)  # type: ignore[union-attr]
        assert hub.idle_bytes <= 64 * 1024
    kept = [i for i in range(50) if hub.resource(f"{ORIGIN}/r{i}") is not None]
    assert 3 <= len(kept) <= 6 and kept == list(range(50 - len(kept), 50))  # the newest
    # A resource subscribed again leaves the idle ones, and its bytes with it.
    hub.subscribe("a", f"{ORIGIN}/r49")
    assert hub.idle_bytes < 64 * 1024 - 10_000
