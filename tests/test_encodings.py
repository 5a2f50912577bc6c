"""The encodings' pure parts: subprotocol choice, client frames in CBOR, the forms of a notify
(CBOR with the sensor's own data item, compact), and when a subscription may take a compact
frame. The end-to-end behaviour is in test_encodings_e2e.py."""

from __future__ import annotations

import json

import cbor2
import pytest

from translator.core.frames import BAD_REQUEST, FrameError, Request, Subscribe
from translator.core.hub import Deliver, Hub, NotifyMeta
from translator.web.encodings import (
    CBOR_SUBPROTOCOL,
    JSON_SUBPROTOCOL,
    MAX_CBOR_DEPTH,
    CompactState,
    Outgoing,
    UnsupportedSubprotocol,
    choose_subprotocol,
    compact_object,
    parse_client_frame,
    to_cbor,
    ws_frame,
)

URI = "coap://127.0.0.1/temperature"


# --- subprotocols ------------------------------------------------------------------------------


def test_a_client_naming_no_subprotocol_gets_json() -> None:
    assert choose_subprotocol([]) is None


@pytest.mark.parametrize("offered", [[JSON_SUBPROTOCOL], [CBOR_SUBPROTOCOL]])
def test_each_subprotocol_is_chosen_when_offered(offered: list[str]) -> None:
    assert choose_subprotocol(offered) == offered[0]


def test_the_client_preference_order_wins_and_unknown_ones_are_skipped() -> None:
    offered = ["chat", CBOR_SUBPROTOCOL, JSON_SUBPROTOCOL]
    assert choose_subprotocol(offered) == CBOR_SUBPROTOCOL


def test_only_unknown_subprotocols_are_refused_naming_the_supported_ones() -> None:
    with pytest.raises(UnsupportedSubprotocol) as caught:
        choose_subprotocol(["mqtt", "coap-ws-gateway.v2.json"])
    assert JSON_SUBPROTOCOL in str(caught.value) and CBOR_SUBPROTOCOL in str(caught.value)


# --- client frames -------------------------------------------------------------------------------


def test_a_cbor_subscribe_parses_like_its_json_twin() -> None:
    obj = {"type": "subscribe", "id": 7, "name": "temperature", "compact": True}
    from_cbor = parse_client_frame(cbor2.dumps(obj), cbor=True)
    assert from_cbor == parse_client_frame(json.dumps(obj), cbor=False)
    assert from_cbor == Subscribe(id=7, name="temperature", compact=True)


def test_compact_must_be_a_boolean() -> None:
    with pytest.raises(FrameError, match="'compact' must be a boolean"):
        parse_client_frame('{"type":"subscribe","name":"t","compact":1}', cbor=False)


def test_a_text_frame_on_a_cbor_connection_is_a_bad_request() -> None:
    with pytest.raises(FrameError, match="text frames are not supported") as caught:
        parse_client_frame('{"type":"ping"}', cbor=True)
    assert caught.value.code == BAD_REQUEST


def test_a_binary_frame_on_a_json_connection_is_a_bad_request() -> None:
    with pytest.raises(FrameError, match=CBOR_SUBPROTOCOL) as caught:
        parse_client_frame(cbor2.dumps({"type": "ping"}), cbor=False)
    assert caught.value.code == BAD_REQUEST


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (b"\xff", "not valid CBOR"),
        (cbor2.dumps([1, 2]), "must be a CBOR map"),
        (cbor2.dumps({"type": "ping"}) + b"\x00", "bytes after the data item"),
        (b"\x81" * (MAX_CBOR_DEPTH + 2) + b"\x00", "not valid CBOR"),
        (cbor2.dumps({"type": b"ping"}), "string field 'type'"),
    ],
)
def test_bad_cbor_frames_are_bad_requests(message: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why) as caught:
        parse_client_frame(message, cbor=True)
    assert caught.value.code == BAD_REQUEST


def test_a_cbor_request_value_keeps_its_tags_unresolved() -> None:
    # Tag 28 (shareable) around an array and tag 29 (shared ref) pointing at it: resolved,
    # they would build a cycle; kept, they are forwarded as written.
    value = cbor2.CBORTag(28, [cbor2.CBORTag(29, 0)])
    obj = {"type": "request", "method": "PUT", "name": "led", "value": value, "cf": 60}
    frame = parse_client_frame(cbor2.dumps(obj), cbor=True)
    assert isinstance(frame, Request)
    assert frame.value == value
    big = parse_client_frame(cbor2.dumps({**obj, "value": 2**70}), cbor=True)
    assert isinstance(big, Request) and big.value == 2**70


# --- gateway frames ----------------------------------------------------------------------------


NOTIFY = json.dumps({
    "type": "notify", "sub": "s1", "uri": URI, "seq": 5, "code": "2.05", "cf": 60,
    "value": "18446744073709551616", "ts": 1.5, "max_age": 60,
}, separators=(",", ":"))
BIGNUM = cbor2.dumps(2**64)  # the sensor's own item; JSON maps it to a string


def test_to_cbor_keeps_keys_and_embeds_the_sensors_data_item() -> None:
    message = to_cbor(NOTIFY, BIGNUM)
    assert BIGNUM in message
    decoded = cbor2.loads(message)
    assert list(decoded) == list(json.loads(NOTIFY))
    assert decoded["value"] == 2**64
    assert cbor2.loads(to_cbor(NOTIFY))["value"] == "18446744073709551616"


def test_ws_frame_marks_text_and_binary() -> None:
    assert ws_frame("ab") == b"\x81\x02ab"
    assert ws_frame(b"ab") == b"\x82\x02ab"
    assert ws_frame(b"x" * 200)[:4] == b"\x82\x7e\x00\xc8"


def test_compact_object_keeps_what_a_client_cannot_infer() -> None:
    full = {**json.loads(NOTIFY), "replay": True}
    assert list(compact_object(full, ())) == ["type", "sub", "seq", "value", "ts", "replay"]
    assert "cf" in compact_object(full, ("cf",))
    # What conditional notifications add (a pmax repeat, a cond_error) always stays.
    conditional = {**json.loads(NOTIFY), "repeat": True, "cond_error": "not a number"}
    assert list(compact_object(conditional, ())) == [
        "type", "sub", "seq", "value", "ts", "repeat", "cond_error"]
    assert compact_object(full, None) is full


def test_outgoing_makes_each_form_once_and_shares_it() -> None:
    outgoing = Outgoing(NOTIFY, NotifyMeta(5, BIGNUM, ()))
    forms = {(cbor, compact): outgoing.form(cbor, compact)
             for cbor in (False, True) for compact in (False, True)}
    for (cbor, compact), made in forms.items():
        assert outgoing.form(cbor, compact) is made  # not encoded again
        message, framed = made
        assert framed == ws_frame(message)
    assert forms[False, False][0] is NOTIFY
    compact_json = json.loads(forms[False, True][0])
    assert set(compact_json) == {"type", "sub", "seq", "value", "ts"}
    compact_cbor = cbor2.loads(forms[True, True][0])
    assert compact_cbor == {**compact_json, "value": 2**64}
    assert len(forms[True, True][0]) < len(forms[False, True][0]) < len(NOTIFY)


def test_the_first_update_of_a_stream_is_complete_even_when_compact_is_asked() -> None:
    outgoing = Outgoing(NOTIFY, NotifyMeta(1, None, None))
    assert outgoing.form(False, True)[0] == NOTIFY


def test_compact_state_takes_compact_only_right_after_the_previous_update() -> None:
    state = CompactState()
    assert not state
    state.want("s1")
    assert not state.take("s1", NotifyMeta(3, None, ()), backlog=False)  # the first: complete
    assert state.take("s1", NotifyMeta(4, None, ()), backlog=False)
    assert not state.take("s1", NotifyMeta(6, None, ()), backlog=False)  # a gap
    assert not state.take("s1", NotifyMeta(7, None, ()), backlog=True)  # may be replaced
    assert state.take("s1", NotifyMeta(8, None, ()), backlog=False)
    assert not state.take("s2", NotifyMeta(9, None, ()), backlog=False)  # not compact
    state.forget("s1")
    assert not state


# --- what the hub hands over -------------------------------------------------------------------


def _notify_delivers(commands: list[object]) -> list[Deliver[str]]:
    return [c for c in commands if isinstance(c, Deliver) and c.meta is not None]


def test_the_hub_hands_over_the_sensors_cbor_item_and_what_changed() -> None:
    hub: Hub[str] = Hub(clock=lambda: 100.0)
    hub.subscribe("a", URI)
    item = cbor2.dumps(cbor2.CBORTag(1234, b"\x00\x01"))
    first = _notify_delivers(hub.upstream_response(URI, code="2.05", cf=60, payload=item))
    assert first[0].meta == NotifyMeta(1, item, None)
    same = _notify_delivers(hub.upstream_response(URI, code="2.05", cf=60, payload=item))
    assert same[0].meta == NotifyMeta(2, item, ())
    other = _notify_delivers(
        hub.upstream_response(URI, code="2.05", cf=50, payload=b"1", max_age=5)
    )
    assert other[0].meta == NotifyMeta(3, None, ("cf", "max_age"))
    undecodable = _notify_delivers(hub.upstream_response(URI, code="2.05", cf=60, payload=b"\xff"))
    assert undecodable[0].meta is not None and undecodable[0].meta.cbor_value is None
    # A late joiner's cached notify carries the item too, and counts as complete.
    hub.upstream_response(URI, code="2.05", cf=60, payload=item)
    joined = _notify_delivers(hub.subscribe("b", URI))
    assert joined[0].meta == NotifyMeta(5, item, None)
