"""Tests for translator.core.frames: parsing client frames and serializing gateway frames.

The expectations come from the protocol contract (docs/protocol.md / the project issue),
not from reading the implementation: ids, the bad-input table, request field rules and the
exact shape of every gateway frame.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from translator.core import frames
from translator.core.frames import (
    BAD_REQUEST,
    MISSING,
    ErrorFrame,
    FrameError,
    ListResources,
    Notify,
    Ping,
    Pong,
    Request,
    Resources,
    Response,
    Status,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    parse,
)

URI = "coap://sensor.example:5683/temperature"
CANONICAL_METHODS = ("GET", "POST", "PUT", "DELETE", "FETCH", "PATCH", "iPATCH")


def j(obj: dict[str, Any]) -> str:
    return json.dumps(obj)


def reject(data: str | bytes) -> FrameError:
    """Parse `data`, which must be rejected, and return the error."""
    with pytest.raises(FrameError) as info:
        parse(data)
    return info.value


def request(**fields: Any) -> str:
    return j({"type": "request", "id": 7, "method": "GET", "uri": URI, **fields})


# --- ids ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame_id",
    [0, 1, -5, 2**63, 10**30, "", "a", "x" * 64, "é✓😀", "  spaced  ", "0"],
    ids=repr,
)
def test_valid_ids_are_kept_exactly(frame_id: str | int) -> None:
    frame = parse(j({"type": "ping", "id": frame_id}))
    assert frame == Ping(id=frame_id)
    assert type(frame.id) is type(frame_id)
    reply = json.loads(Pong(frame.id).serialize())
    assert reply == {"type": "pong", "id": frame_id}


def test_frame_without_id_has_id_none() -> None:
    assert parse('{"type":"ping"}') == Ping(id=None)
    assert json.loads(Pong(None).serialize()) == {"type": "pong", "id": None}


@pytest.mark.parametrize(
    "bad_id",
    [None, True, False, 1.5, 1.0, "x" * 65, [], [1], {}, {"a": 1}],
    ids=repr,
)
@pytest.mark.parametrize("frame_type", ["ping", "list", "subscribe", "nonsense"])
def test_invalid_id_is_bad_request_with_null_id(bad_id: Any, frame_type: str) -> None:
    error = reject(j({"type": frame_type, "id": bad_id, "uri": URI}))
    assert error.code == BAD_REQUEST
    assert error.frame_id is None
    assert json.loads(error.to_frame().serialize())["id"] is None


def test_id_with_lone_surrogate_is_rejected() -> None:
    # "\ud800" is a legal JSON escape, but echoing it would make the reply unencodable as
    # UTF-8 (the WebSocket writer would fail), so it is not a usable id.
    error = reject('{"type":"ping","id":"\\ud800"}')
    assert (error.code, error.frame_id) == (BAD_REQUEST, None)
    error.to_frame().serialize().encode("utf-8")


def test_id_of_valid_surrogate_pair_is_accepted() -> None:
    assert parse('{"type":"ping","id":"\\ud83d\\ude00"}') == Ping(id="😀")


# --- the bad-input table -----------------------------------------------------------------------

BAD_INPUT: list[tuple[str, str | bytes, str | int | None]] = [
    # (label, data, the id the error must carry)
    ("not json", "hello", None),
    ("empty text", "", None),
    ("whitespace only", "   ", None),
    ("truncated object", '{"type":"ping","id":1', None),
    ("trailing garbage", '{"type":"ping","id":1} x', None),
    ("single quotes", "{'type':'ping'}", None),
    ("array", '[{"type":"ping","id":1}]', None),
    ("string", '"ping"', None),
    ("number", "42", None),
    ("null", "null", None),
    ("true", "true", None),
    ("empty object", "{}", None),
    ("no type but id", '{"id":3}', 3),
    ("no type, string id", '{"id":"abc","uri":"x"}', "abc"),
    ("unknown type", '{"type":"subscribed","id":4}', 4),
    ("type wrong case", '{"type":"PING","id":4}', 4),
    ("type is a number", '{"type":1,"id":"n"}', "n"),
    ("type is null", '{"type":null,"id":5}', 5),
    ("type is a list", '{"type":["ping"],"id":5}', 5),
    ("unknown type, bad id", '{"type":"nope","id":1.5}', None),
    ("NaN id", '{"type":"ping","id":NaN}', None),
    ("NaN elsewhere", '{"type":"ping","id":1,"extra":NaN}', None),
    ("Infinity", '{"type":"ping","id":1,"extra":Infinity}', None),
    ("-Infinity", '{"type":"ping","id":1,"extra":[-Infinity]}', None),
    ("overflowing float is Infinity", '{"type":"ping","id":1,"extra":1e400}', None),
    ("overflowing value", request(x=0).replace('"x": 0', '"value": -1e999'), None),
    ("deep nesting", '{"type":"ping","id":1,"x":' + "[" * 100_000 + "]" * 100_000 + "}", None),
    ("binary frame", b'{"type":"ping","id":1}', None),
    ("empty binary frame", b"", None),
]


@pytest.mark.parametrize(("data", "expected_id"), [row[1:] for row in BAD_INPUT],
                         ids=[row[0] for row in BAD_INPUT])
def test_bad_input_table(data: str | bytes, expected_id: str | int | None) -> None:
    error = reject(data)
    assert error.code == BAD_REQUEST
    assert error.frame_id == expected_id
    assert type(error.frame_id) is type(expected_id)
    reply = json.loads(error.to_frame().serialize())
    assert reply["type"] == "error"
    assert reply["error"] == BAD_REQUEST
    assert reply["id"] == expected_id
    assert isinstance(reply["message"], str) and reply["message"]


# --- subscribe / unsubscribe / list / ping ----------------------------------------------------


def test_subscribe_by_uri() -> None:
    assert parse(j({"type": "subscribe", "id": 1, "uri": URI})) == Subscribe(id=1, uri=URI)


def test_subscribe_by_name() -> None:
    frame = parse(j({"type": "subscribe", "id": "a", "name": "temperature"}))
    assert frame == Subscribe(id="a", uri=None, name="temperature")


def test_unknown_fields_are_ignored() -> None:
    frame = parse(j({"type": "subscribe", "id": 1, "uri": URI, "zzz": [1, {"q": None}],
                     "method": 5, "timeout": "never"}))
    assert frame == Subscribe(id=1, uri=URI)
    assert parse(j({"type": "ping", "id": 2, "uri": 5, "value": None})) == Ping(id=2)
    assert parse(j({"type": "list", "id": 3, "sub": []})) == ListResources(id=3)


BAD_SUBSCRIBE: list[tuple[str, dict[str, Any]]] = [
    ("neither uri nor name", {}),
    ("both uri and name", {"uri": URI, "name": "temperature"}),
    ("uri not a string", {"uri": 5}),
    ("uri is a list", {"uri": [URI]}),
    ("empty uri", {"uri": ""}),
    ("name not a string", {"name": True}),
    ("empty name", {"name": ""}),
    ("both, one of them bad", {"uri": URI, "name": 1}),
]


@pytest.mark.parametrize("fields", [row[1] for row in BAD_SUBSCRIBE],
                         ids=[row[0] for row in BAD_SUBSCRIBE])
def test_bad_subscribe(fields: dict[str, Any]) -> None:
    error = reject(j({"type": "subscribe", "id": "s-1", **fields}))
    assert (error.code, error.frame_id) == (BAD_REQUEST, "s-1")


def test_unsubscribe() -> None:
    assert parse(j({"type": "unsubscribe", "id": 2, "sub": "s1"})) == Unsubscribe(id=2, sub="s1")


@pytest.mark.parametrize("fields", [{}, {"sub": 1}, {"sub": ""}, {"sub": None}, {"sub": ["s1"]}],
                         ids=repr)
def test_bad_unsubscribe(fields: dict[str, Any]) -> None:
    error = reject(j({"type": "unsubscribe", "id": 2, **fields}))
    assert (error.code, error.frame_id) == (BAD_REQUEST, 2)


def test_list_and_ping() -> None:
    assert parse('{"type":"list","id":9}') == ListResources(id=9)
    assert parse('{"type":"ping"}') == Ping(id=None)
    assert parse('{"id":"p","type":"ping"}') == Ping(id="p")


# --- request -----------------------------------------------------------------------------------


def test_request_defaults() -> None:
    frame = parse(request())
    assert isinstance(frame, Request)
    assert frame.id == 7
    assert frame.method == "GET"
    assert (frame.uri, frame.name) == (URI, None)
    assert frame.value is MISSING
    assert not frame.has_value
    assert frame.payload is None
    assert frame.cf is None
    assert frame.accept is None
    assert frame.confirmable is True
    assert frame.timeout == 10.0
    assert isinstance(frame.timeout, float)


@pytest.mark.parametrize("method", CANONICAL_METHODS)
def test_methods_are_spelled_exactly(method: str) -> None:
    frame = parse(request(method=method))
    assert isinstance(frame, Request)
    assert frame.method == method
    for spelling in {method.lower(), method.upper(), method.swapcase()} - {method}:
        assert reject(request(method=spelling)).code == BAD_REQUEST


@pytest.mark.parametrize("key", ["cf", "accept"])
def test_null_cf_or_accept_is_bad_request(key: str) -> None:
    assert reject(request(method="GET", **{key: None})).code == BAD_REQUEST


def test_request_by_name() -> None:
    frame = parse(j({"type": "request", "id": 1, "method": "PUT", "name": "led", "value": True}))
    assert isinstance(frame, Request)
    assert (frame.uri, frame.name, frame.method, frame.value) == (None, "led", "PUT", True)


@pytest.mark.parametrize(
    "value", [0, 21.5, "on", True, False, [1, "a"], {"a": {"b": [None]}}, -(10**20)], ids=repr
)
def test_value_defaults_cf_to_60(value: Any) -> None:
    frame = parse(request(method="PUT", value=value))
    assert isinstance(frame, Request)
    assert frame.has_value
    assert frame.value == value
    assert frame.cf == 60
    assert frame.payload is None


def test_null_value_is_a_value() -> None:
    frame = parse(request(method="PUT", value=None))
    assert isinstance(frame, Request)
    assert frame.has_value
    assert frame.value is None
    assert frame.cf == 60


def test_explicit_cf_wins_over_the_value_default() -> None:
    frame = parse(request(method="PUT", value="on", cf=0))
    assert isinstance(frame, Request)
    assert frame.cf == 0


@pytest.mark.parametrize("raw", [b"", b"\x00\xff\x10", b"hello world", bytes(range(256))],
                         ids=repr)
def test_payload_b64_is_decoded(raw: bytes) -> None:
    frame = parse(request(method="POST", payload_b64=base64.b64encode(raw).decode(), cf=42))
    assert isinstance(frame, Request)
    assert frame.payload == raw
    assert frame.cf == 42
    assert not frame.has_value


def test_payload_b64_without_cf_has_no_cf() -> None:
    frame = parse(request(method="POST", payload_b64="AAE="))
    assert isinstance(frame, Request)
    assert frame.payload == b"\x00\x01"
    assert frame.cf is None


@pytest.mark.parametrize("cf", [0, 1, 60, 65535])
def test_cf_and_accept_bounds_accepted(cf: int) -> None:
    frame = parse(request(cf=cf, accept=cf))
    assert isinstance(frame, Request)
    assert (frame.cf, frame.accept) == (cf, cf)


@pytest.mark.parametrize("confirmable", [True, False])
def test_confirmable(confirmable: bool) -> None:
    frame = parse(request(confirmable=confirmable))
    assert isinstance(frame, Request)
    assert frame.confirmable is confirmable


@pytest.mark.parametrize(
    ("timeout", "expected"), [(60, 60.0), (60.0, 60.0), (0.001, 0.001), (1, 1.0), (5e-324, 5e-324)]
)
def test_timeout_accepted(timeout: float, expected: float) -> None:
    frame = parse(request(timeout=timeout))
    assert isinstance(frame, Request)
    assert frame.timeout == expected
    assert isinstance(frame.timeout, float)


BAD_REQUEST_FIELDS: list[tuple[str, dict[str, Any]]] = [
    ("no method", {"method": None}),
    ("method missing", {"method": ...}),
    ("method not a string", {"method": 1}),
    ("empty method", {"method": ""}),
    ("unknown method", {"method": "GETT"}),
    ("method with spaces", {"method": " GET"}),
    ("method OBSERVE", {"method": "OBSERVE"}),
    ("dotless-i iPATCH", {"method": "\u0131patch"}),
    ("long-s POST", {"method": "po\u017ft"}),
    ("no target", {"uri": ...}),
    ("both targets", {"name": "led"}),
    ("uri not a string", {"uri": 1}),
    ("value and payload_b64", {"value": 1, "payload_b64": "AA=="}),
    ("null value and payload_b64", {"value": None, "payload_b64": "AA=="}),
    ("payload_b64 not base64", {"payload_b64": "!!!!"}),
    ("payload_b64 missing padding", {"payload_b64": "YQ"}),
    ("payload_b64 url-safe alphabet", {"payload_b64": "-_-_"}),
    ("payload_b64 with newline", {"payload_b64": "AAAA\nAAAA"}),
    ("payload_b64 with space", {"payload_b64": "AA AA"}),
    ("payload_b64 non-ascii", {"payload_b64": "ÄÄÄÄ"}),
    ("payload_b64 not a string", {"payload_b64": 5}),
    ("payload_b64 null", {"payload_b64": None}),
    ("payload_b64 list", {"payload_b64": ["AA=="]}),
    ("cf negative", {"cf": -1}),
    ("cf too big", {"cf": 65536}),
    ("cf float", {"cf": 60.0}),
    ("cf string", {"cf": "60"}),
    ("cf bool", {"cf": True}),
    ("accept negative", {"accept": -1}),
    ("accept too big", {"accept": 70000}),
    ("accept string", {"accept": "50"}),
    ("accept bool", {"accept": False}),
    ("confirmable int", {"confirmable": 1}),
    ("confirmable string", {"confirmable": "true"}),
    ("confirmable null", {"confirmable": None}),
    ("timeout zero", {"timeout": 0}),
    ("timeout float zero", {"timeout": 0.0}),
    ("timeout negative", {"timeout": -1}),
    ("timeout above 60", {"timeout": 60.0001}),
    ("timeout 61", {"timeout": 61}),
    ("timeout huge int", {"timeout": 10**100}),
    ("timeout bool true", {"timeout": True}),
    ("timeout bool false", {"timeout": False}),
    ("timeout string", {"timeout": "10"}),
    ("timeout null", {"timeout": None}),
]


@pytest.mark.parametrize("fields", [row[1] for row in BAD_REQUEST_FIELDS],
                         ids=[row[0] for row in BAD_REQUEST_FIELDS])
def test_bad_request_fields(fields: dict[str, Any]) -> None:
    obj: dict[str, Any] = {"type": "request", "id": "r9", "method": "GET", "uri": URI}
    for key, value in fields.items():
        if value is ...:
            del obj[key]
        else:
            obj[key] = value
    error = reject(j(obj))
    assert error.code == BAD_REQUEST
    assert error.frame_id == "r9"
    assert json.loads(error.to_frame().serialize())["id"] == "r9"


# --- gateway frames ----------------------------------------------------------------------------


def assert_compact(text: str) -> None:
    """Compact: exactly what json.dumps with (",", ":") separators produces, no spaces."""
    assert text == json.dumps(json.loads(text), separators=(",", ":"), ensure_ascii=False)
    assert ", " not in text and ": " not in text


def test_subscribed_and_unsubscribed() -> None:
    text = Subscribed(id=1, sub="s1", uri=URI).serialize()
    assert text == f'{{"type":"subscribed","id":1,"sub":"s1","uri":"{URI}"}}'
    assert Unsubscribed(id="u", sub="s1").serialize() == (
        '{"type":"unsubscribed","id":"u","sub":"s1"}'
    )


def test_pong_and_resources() -> None:
    assert Pong(None).serialize() == '{"type":"pong","id":null}'
    text = Resources(3, ({"uri": URI, "name": "t"},)).serialize()
    assert json.loads(text) == {"type": "resources", "id": 3,
                                "resources": [{"uri": URI, "name": "t"}]}
    assert_compact(text)


def test_response() -> None:
    text = Response("r", "2.05", 60, {"value": {"t": 21.5}}).serialize()
    assert json.loads(text) == {"type": "response", "id": "r", "code": "2.05", "cf": 60,
                                "value": {"t": 21.5}}
    assert_compact(text)
    assert json.loads(Response(1, "2.04", None).serialize()) == {
        "type": "response", "id": 1, "code": "2.04", "cf": None}


def test_error_frame() -> None:
    assert ErrorFrame(5, "not_found", "no such sub").serialize() == (
        '{"type":"error","id":5,"error":"not_found","message":"no such sub"}'
    )
    with_code = json.loads(ErrorFrame("x", "upstream_error", "m", code="4.04").serialize())
    assert with_code == {"type": "error", "id": "x", "error": "upstream_error", "message": "m",
                         "code": "4.04"}


def test_frame_error_to_frame() -> None:
    error = FrameError(frames.LIMIT, "too many", "q")
    assert str(error) == "too many"
    assert error.to_frame() == ErrorFrame(id="q", error="limit", message="too many")


def test_notify_fields_and_order() -> None:
    text = Notify(sub="s2", uri=URI, seq=3, code="2.05", cf=60, body={"value": 21.5},
                  ts=1000.0, max_age=30).serialize()
    assert_compact(text)
    obj = json.loads(text)
    assert list(obj) == ["type", "sub", "uri", "seq", "code", "cf", "value", "ts", "max_age"]
    assert obj == {"type": "notify", "sub": "s2", "uri": URI, "seq": 3, "code": "2.05",
                   "cf": 60, "value": 21.5, "ts": 1000.0, "max_age": 30}


def test_notify_with_undecodable_payload() -> None:
    body = {"payload_b64": "AAE=", "decode_error": "bad"}
    obj = json.loads(Notify("s1", URI, 1, "2.05", None, body, 1.5, 60).serialize())
    assert list(obj) == ["type", "sub", "uri", "seq", "code", "cf", "payload_b64",
                         "decode_error", "ts", "max_age"]
    assert "value" not in obj
    assert obj["cf"] is None


@pytest.mark.parametrize(("ts", "shown"), [(1000.1234567, 1000.123457), (math.inf, None),
                                             (math.nan, None)])
def test_notify_ts(ts: float, shown: float | None) -> None:
    obj = json.loads(Notify("s1", URI, 1, "2.05", 0, {}, ts, 60).serialize())
    assert obj["ts"] == shown


def test_status_frames() -> None:
    assert Status("s1", URI, "online").serialize() == (
        f'{{"type":"status","sub":"s1","uri":"{URI}","state":"online"}}'
    )
    obj = json.loads(Status("s1", URI, "offline", reason="the sensor answered 4.04",
                            code="4.04").serialize())
    assert obj == {"type": "status", "sub": "s1", "uri": URI, "state": "offline",
                   "reason": "the sensor answered 4.04", "code": "4.04"}
    assert "code" not in json.loads(Status("s1", URI, "stale", reason="quiet").serialize())


def test_serialization_keeps_non_ascii_and_refuses_nan() -> None:
    text = Response(1, "2.05", 0, {"value": "21 °C"}).serialize()
    assert "21 °C" in text
    with pytest.raises(ValueError):
        Response(1, "2.05", 60, {"value": math.nan}).serialize()


# --- properties --------------------------------------------------------------------------------

FRAME_TYPES = (Subscribe, Unsubscribe, Request, ListResources, Ping)
KEYS = ["type", "id", "uri", "name", "sub", "method", "value", "payload_b64", "cf", "accept",
        "confirmable", "timeout"]

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # includes NaN and +/-Infinity: json.dumps writes them as NaN/Infinity
    | st.text(max_size=70)
    | st.sampled_from(["subscribe", "unsubscribe", "request", "list", "ping", URI, "GET",
                       "ipatch", "AA==", "s1"])
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8) | st.sampled_from(KEYS), children, max_size=4),
    max_leaves=12,
)
frame_objects = st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), json_values,
                                max_size=8)


def _has_non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, list):
        return any(_has_non_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_has_non_finite(v) for v in value.values())
    return False


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_parse_outcome(data: str) -> frames.ClientFrame | FrameError:
    """Run parse; anything other than a frame or a FrameError fails the test."""
    try:
        frame = parse(data)
    except FrameError as error:
        assert error.code == BAD_REQUEST
        text = error.to_frame().serialize()
        text.encode("utf-8")  # must be sendable in a text frame
        assert json.loads(text)["id"] == error.frame_id
        return error
    assert isinstance(frame, FRAME_TYPES)
    return frame


@given(st.text())
@example("")
@example("{")
@example('{"type":"ping","id":"\\udfff"}')
@example('{"type":"request","method":"GET","uri":"x","payload_b64":"\\u00e9"}')
def test_parse_arbitrary_text_never_raises_anything_else(data: str) -> None:
    _check_parse_outcome(data)


@given(frame_objects)
@example({"type": "request", "id": 1, "method": "iPATCH", "uri": URI, "value": math.inf})
@example({"type": "ping", "id": "\ud800"})
def test_parse_json_objects(obj: dict[str, Any]) -> None:
    data = json.dumps(obj)  # allow_nan=True: NaN/Infinity may appear in the text
    outcome = _check_parse_outcome(data)
    if _has_non_finite(obj):
        assert isinstance(outcome, FrameError)
        assert outcome.frame_id is None
        return
    raw_id = obj.get("id")
    id_ok = "id" not in obj or (
        not isinstance(raw_id, bool)
        and (isinstance(raw_id, int) or (isinstance(raw_id, str) and len(raw_id) <= 64
                                         and _utf8_encodable(raw_id)))
    )
    if isinstance(outcome, FrameError):
        # The error carries the frame's id when it could be read, else null.
        assert outcome.frame_id == (raw_id if id_ok else None)
        assert type(outcome.frame_id) is type(raw_id if id_ok else None)
        return
    assert id_ok
    assert outcome.type == obj["type"]
    assert outcome.id == raw_id
    for reply in (Pong(outcome.id), ErrorFrame(outcome.id, BAD_REQUEST, "x"),
                  Unsubscribed(outcome.id, "s1"), Subscribed(outcome.id, "s1", URI),
                  Response(outcome.id, "2.05", None), Resources(outcome.id, ())):
        text = reply.serialize()
        decoded = json.loads(text.encode("utf-8"))
        assert decoded["id"] == raw_id
        assert type(decoded["id"]) is type(raw_id)


valid_ids = st.none() | st.integers() | st.text(max_size=64)


@given(valid_ids, st.sampled_from(["ping", "list", "subscribe", "unsubscribe", "request"]),
       st.sampled_from(CANONICAL_METHODS))
def test_accepted_frames_round_trip_ids(
    frame_id: str | int | None, frame_type: str, method: str
) -> None:
    obj: dict[str, Any] = {"type": frame_type, "uri": URI, "sub": "s1", "method": method}
    if frame_id is not None:
        obj["id"] = frame_id
    frame = parse(json.dumps(obj))
    assert frame.type == frame_type
    assert frame.id == frame_id
    if isinstance(frame, Request):
        assert frame.method == method
    assert json.loads(Pong(frame.id).serialize())["id"] == frame_id
    error = FrameError(frames.NOT_FOUND, "m", frame.id)
    assert json.loads(error.to_frame().serialize())["id"] == frame_id


@given(st.binary())
def test_binary_frames_are_always_bad_request(data: bytes) -> None:
    error = reject(data)
    assert (error.code, error.frame_id) == (BAD_REQUEST, None)


@given(st.binary())
def test_payload_b64_round_trips(raw: bytes) -> None:
    frame = parse(request(method="POST", payload_b64=base64.b64encode(raw).decode()))
    assert isinstance(frame, Request)
    assert frame.payload == raw


@given(st.text(min_size=1, alphabet=st.characters(codec="ascii")))
def test_non_base64_text_is_rejected_or_decodes_identically(text: str) -> None:
    try:
        expected = base64.b64decode(text, validate=True)
    except ValueError:
        expected = None
    obj = {"type": "request", "id": 1, "method": "POST", "uri": URI, "payload_b64": text}
    if expected is None:
        assert reject(j(obj)).code == BAD_REQUEST
    else:
        frame = parse(j(obj))
        assert isinstance(frame, Request) and frame.payload == expected
