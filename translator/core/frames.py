"""The WebSocket protocol v1 wire messages: every JSON frame as a small frozen dataclass.

Client frames (`Subscribe`, `Unsubscribe`, `Request`, `ListResources`, `Ping`) come out of
`parse()`, which either returns one of them or raises a single `FrameError` carrying the
protocol error code, so a malformed frame is rejected here with a precise message and never
reaches the hub. Gateway frames serialize themselves with `serialize()`; the text of a
`Notify` is built once per update and shared by every subscriber.

This module does no I/O and imports only the standard library. docs/protocol.md is the
reference for everything here and changes together with it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from translator.core import strictjson
from translator.core.conditions import Condition, ConditionError, parse_condition

JSONValue = Any
FrameId = str | int | None

# Protocol error codes (the `error` field of an error frame).
BAD_REQUEST: Final = "bad_request"
NOT_FOUND: Final = "not_found"
FORBIDDEN: Final = "forbidden"
TIMEOUT: Final = "timeout"
UPSTREAM_ERROR: Final = "upstream_error"
UNSUPPORTED: Final = "unsupported"
LIMIT: Final = "limit"
RATE_LIMITED: Final = "rate_limited"

MAX_ID_LENGTH: Final = 64
MAX_REQUEST_TIMEOUT: Final = 60.0
DEFAULT_REQUEST_TIMEOUT: Final = 10.0
DEFAULT_VALUE_CF: Final = 60

# CoAP method names exactly as the protocol spells them (RFC 7252, RFC 8132).
METHODS: Final = ("GET", "POST", "PUT", "DELETE", "FETCH", "PATCH", "iPATCH")


class _Missing:
    """The type of `MISSING`: a request carried no `value` field (distinct from null)."""

    _instance: _Missing | None = None

    def __new__(cls) -> _Missing:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Final = _Missing()


class FrameError(Exception):
    """A client frame that cannot be accepted; becomes an `error` frame with the same code."""

    def __init__(self, code: str, message: str, frame_id: FrameId = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.frame_id = frame_id

    def to_frame(self) -> ErrorFrame:
        return ErrorFrame(id=self.frame_id, error=self.code, message=self.message)


def dumps(obj: dict[str, JSONValue]) -> str:
    """Serialize a frame object; compact, and never NaN/Infinity (they are not JSON)."""
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# ---------------------------------------------------------------------------------------------
# Client -> gateway frames
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Subscribe:
    id: FrameId
    uri: str | None = None
    name: str | None = None
    since: Since | None = None
    """Where the client's copy of the resource's stream ends, to resume from there."""
    cond: Condition | None = None
    """Conditional notification parameters (`translator.core.conditions`)."""
    compact: bool = False
    """Later notifies of this subscription leave out the fields that did not change."""
    type: Literal["subscribe"] = "subscribe"


MAX_EPOCH_LENGTH: Final = 64
MAX_SEQ: Final = 2**53 - 1
"""The largest `seq` a client may name: JSON numbers are exact up to here."""


@dataclass(frozen=True, slots=True)
class Since:
    """A point in a resource's stream: its `epoch` and the last `seq` seen."""

    epoch: str
    seq: int


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    id: FrameId
    sub: str
    type: Literal["unsubscribe"] = "unsubscribe"


@dataclass(frozen=True, slots=True)
class Request:
    id: FrameId
    method: str
    uri: str | None = None
    name: str | None = None
    value: JSONValue = MISSING
    payload: bytes | None = None
    """The bytes of `payload_b64`, already decoded; None when the frame had none."""
    cf: int | None = None
    """Content-format of the payload; defaults to 60 when a `value` is given."""
    accept: int | None = None
    confirmable: bool = True
    timeout: float = DEFAULT_REQUEST_TIMEOUT
    type: Literal["request"] = "request"

    @property
    def has_value(self) -> bool:
        return self.value is not MISSING


@dataclass(frozen=True, slots=True)
class ListResources:
    id: FrameId
    type: Literal["list"] = "list"


@dataclass(frozen=True, slots=True)
class Ping:
    id: FrameId
    type: Literal["ping"] = "ping"


@dataclass(frozen=True, slots=True)
class Watch:
    """Ask for the catalogue now and for each change of it (`catalog` frames)."""

    id: FrameId
    type: Literal["watch"] = "watch"


ClientFrame = Subscribe | Unsubscribe | Request | ListResources | Ping | Watch


def _read_id(obj: dict[str, JSONValue]) -> FrameId:
    if "id" not in obj:
        return None
    frame_id = obj["id"]
    if (
        isinstance(frame_id, bool)
        or not isinstance(frame_id, str | int)
        or (isinstance(frame_id, str) and len(frame_id) > MAX_ID_LENGTH)
    ):
        raise FrameError(
            BAD_REQUEST, "'id' must be a string of at most 64 characters or an integer"
        )
    # An escaped lone surrogate ("\ud800") cannot be echoed back in a UTF-8 text frame.
    if isinstance(frame_id, str) and not frame_id.isascii() and not _is_utf8_text(frame_id):
        raise FrameError(BAD_REQUEST, "'id' contains a lone surrogate")
    return frame_id


def _is_utf8_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class _Fields:
    """Typed access to a frame's fields; every failure is a `bad_request` naming the field."""

    def __init__(self, obj: dict[str, JSONValue], frame_id: FrameId) -> None:
        self.obj = obj
        self.frame_id = frame_id

    def fail(self, message: str) -> FrameError:
        return FrameError(BAD_REQUEST, message, self.frame_id)

    def optional_str(self, key: str) -> str | None:
        value = self.obj.get(key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise self.fail(f"'{key}' must be a non-empty string")
        return value

    def required_str(self, key: str) -> str:
        value = self.optional_str(key)
        if value is None:
            raise self.fail(f"'{key}' is required")
        return value

    def optional_uint16(self, key: str) -> int | None:
        if key not in self.obj:
            return None
        value = self.obj[key]
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 0xFFFF:
            raise self.fail(f"'{key}' must be an integer in 0-65535")
        return value

    def target(self) -> tuple[str | None, str | None]:
        uri, name = self.optional_str("uri"), self.optional_str("name")
        if (uri is None) == (name is None):
            raise self.fail("give exactly one of 'uri' and 'name'")
        return uri, name


def _parse_subscribe(f: _Fields) -> Subscribe:
    uri, name = f.target()
    compact = f.obj.get("compact", False)
    if not isinstance(compact, bool):
        raise f.fail("'compact' must be a boolean")
    return Subscribe(
        id=f.frame_id, uri=uri, name=name, since=_parse_since(f), cond=_parse_cond(f),
        compact=compact,
    )


def _parse_cond(f: _Fields) -> Condition | None:
    if "cond" not in f.obj:
        return None
    try:
        return parse_condition(f.obj["cond"])
    except ConditionError as exc:
        raise f.fail(str(exc)) from None


def _parse_since(f: _Fields) -> Since | None:
    if "since" not in f.obj:
        return None
    since = f.obj["since"]
    if not isinstance(since, dict) or set(since) != {"epoch", "seq"}:
        raise f.fail("'since' must be an object with exactly 'epoch' and 'seq'")
    epoch, seq = since["epoch"], since["seq"]
    if not isinstance(epoch, str) or not 0 < len(epoch) <= MAX_EPOCH_LENGTH:
        raise f.fail(f"'since.epoch' must be a string of 1 to {MAX_EPOCH_LENGTH} characters")
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= MAX_SEQ:
        raise f.fail(f"'since.seq' must be an integer in 0..{MAX_SEQ}")
    return Since(epoch, seq)


def _parse_unsubscribe(f: _Fields) -> Unsubscribe:
    return Unsubscribe(id=f.frame_id, sub=f.required_str("sub"))


def _parse_request(f: _Fields) -> Request:
    method_text = f.required_str("method")
    if method_text not in METHODS:
        raise f.fail(f"unknown method {method_text!r}; use one of {', '.join(METHODS)}")
    method = method_text
    uri, name = f.target()

    value: JSONValue = f.obj.get("value", MISSING)
    payload: bytes | None = None
    if "payload_b64" in f.obj:
        if value is not MISSING:
            raise f.fail("give at most one of 'value' and 'payload_b64'")
        encoded = f.obj["payload_b64"]
        if not isinstance(encoded, str):
            raise f.fail("'payload_b64' must be a base64 string")
        try:
            payload = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise f.fail("'payload_b64' is not valid standard base64") from None

    cf = f.optional_uint16("cf")
    if cf is None and value is not MISSING:
        cf = DEFAULT_VALUE_CF
    accept = f.optional_uint16("accept")

    confirmable = f.obj.get("confirmable", True)
    if not isinstance(confirmable, bool):
        raise f.fail("'confirmable' must be a boolean")

    timeout = f.obj.get("timeout", DEFAULT_REQUEST_TIMEOUT)
    if (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 < timeout <= MAX_REQUEST_TIMEOUT
    ):
        raise f.fail("'timeout' must be a number of seconds greater than 0 and at most 60")

    return Request(
        id=f.frame_id,
        method=method,
        uri=uri,
        name=name,
        value=value,
        payload=payload,
        cf=cf,
        accept=accept,
        confirmable=confirmable,
        timeout=float(timeout),
    )


def _parse_list(f: _Fields) -> ListResources:
    return ListResources(id=f.frame_id)


def _parse_ping(f: _Fields) -> Ping:
    return Ping(id=f.frame_id)


def _parse_watch(f: _Fields) -> Watch:
    return Watch(id=f.frame_id)


_PARSERS: Final[dict[str, Callable[[_Fields], ClientFrame]]] = {
    "subscribe": _parse_subscribe,
    "unsubscribe": _parse_unsubscribe,
    "request": _parse_request,
    "list": _parse_list,
    "ping": _parse_ping,
    "watch": _parse_watch,
}


def parse(data: str | bytes) -> ClientFrame:
    """Parse one WebSocket message into a client frame, or raise `FrameError`.

    `bytes` stands for a binary WebSocket frame, which the protocol does not use.
    """
    if not isinstance(data, str):
        raise FrameError(BAD_REQUEST, "binary frames are not supported; send JSON text frames")
    try:
        obj = strictjson.loads(data)
    except RecursionError:
        raise FrameError(BAD_REQUEST, "JSON nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, over-long integers
        raise FrameError(BAD_REQUEST, f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise FrameError(BAD_REQUEST, "a frame must be a JSON object")
    return parse_object(obj)


def parse_object(obj: dict[Any, JSONValue]) -> ClientFrame:
    """Parse a decoded frame object (a JSON object, or a CBOR map) into a client frame."""
    frame_id = _read_id(obj)
    frame_type = obj.get("type")
    if not isinstance(frame_type, str):
        raise FrameError(BAD_REQUEST, "a frame needs a string field 'type'", frame_id)
    parser = _PARSERS.get(frame_type)
    if parser is None:
        raise FrameError(BAD_REQUEST, f"unknown frame type {frame_type!r}", frame_id)
    return parser(_Fields(obj, frame_id))


# ---------------------------------------------------------------------------------------------
# Gateway -> client frames
# ---------------------------------------------------------------------------------------------


def _with_id(frame_type: str, frame_id: FrameId) -> dict[str, JSONValue]:
    return {"type": frame_type, "id": frame_id}


@dataclass(frozen=True, slots=True)
class Subscribed:
    id: FrameId
    sub: str
    uri: str
    epoch: str | None = None
    """Names, with `seq`, a point in the resource's stream (see `Since`)."""
    recovered: bool | None = None
    """With `since`: whether every update after it follows (as `replay` notifies)."""

    def serialize(self) -> str:
        obj: dict[str, JSONValue] = {
            **_with_id("subscribed", self.id), "sub": self.sub, "uri": self.uri,
        }
        if self.epoch is not None:
            obj["epoch"] = self.epoch
        if self.recovered is not None:
            obj["recovered"] = self.recovered
        return dumps(obj)


@dataclass(frozen=True, slots=True)
class Unsubscribed:
    id: FrameId
    sub: str

    def serialize(self) -> str:
        return dumps({**_with_id("unsubscribed", self.id), "sub": self.sub})


@dataclass(frozen=True, slots=True)
class Response:
    id: FrameId
    code: str
    cf: int | None
    body: dict[str, JSONValue] = field(default_factory=dict)
    """Decoded payload fields: some of `value`, `payload_b64`, `decode_error`."""

    def serialize(self) -> str:
        return dumps({**_with_id("response", self.id), "code": self.code, "cf": self.cf,
                      **self.body})


@dataclass(frozen=True, slots=True)
class Resources:
    id: FrameId
    resources: tuple[dict[str, JSONValue], ...]

    def serialize(self) -> str:
        return dumps({**_with_id("resources", self.id), "resources": list(self.resources)})


@dataclass(frozen=True, slots=True)
class Catalog:
    """The catalogue (`snapshot`: everything this client may see, in `added`) or a change
    of it: entries added, removed (each with its `reason`) or changed (the new entry)."""

    id: FrameId
    snapshot: bool
    added: tuple[dict[str, JSONValue], ...] = ()
    removed: tuple[dict[str, JSONValue], ...] = ()
    changed: tuple[dict[str, JSONValue], ...] = ()

    def serialize(self) -> str:
        return dumps({
            **_with_id("catalog", self.id), "snapshot": self.snapshot,
            "added": list(self.added), "removed": list(self.removed),
            "changed": list(self.changed),
        })


@dataclass(frozen=True, slots=True)
class Pong:
    id: FrameId

    def serialize(self) -> str:
        return dumps(_with_id("pong", self.id))


@dataclass(frozen=True, slots=True)
class ErrorFrame:
    id: FrameId
    error: str
    message: str
    code: str | None = None
    """The CoAP response code involved, for `upstream_error`."""

    def serialize(self) -> str:
        obj = {**_with_id("error", self.id), "error": self.error, "message": self.message}
        if self.code is not None:
            obj["code"] = self.code
        return dumps(obj)


@dataclass(frozen=True, slots=True)
class Notify:
    sub: str
    uri: str
    seq: int
    code: str
    cf: int | None
    body: dict[str, JSONValue]
    """Decoded payload fields: some of `value`, `payload_b64`, `decode_error`."""
    ts: float
    max_age: int

    def serialize(self) -> str:
        return dumps({
            "type": "notify",
            "sub": self.sub,
            "uri": self.uri,
            "seq": self.seq,
            "code": self.code,
            "cf": self.cf,
            **self.body,
            "ts": round(self.ts, 6) if math.isfinite(self.ts) else None,
            "max_age": self.max_age,
        })


State = Literal["online", "stale", "offline"]


@dataclass(frozen=True, slots=True)
class Status:
    sub: str
    uri: str
    state: State
    reason: str | None = None
    code: str | None = None

    def serialize(self) -> str:
        obj: dict[str, JSONValue] = {
            "type": "status", "sub": self.sub, "uri": self.uri, "state": self.state,
        }
        if self.reason is not None:
            obj["reason"] = self.reason
        if self.code is not None:
            obj["code"] = self.code
        return dumps(obj)


GatewayFrame = (
    Subscribed | Unsubscribed | Response | Resources | Pong | ErrorFrame | Notify | Status
)
