"""The encodings a connection may speak, and every form a gateway frame takes on the wire.

A client picks its encoding at the handshake with a WebSocket subprotocol
(`Sec-WebSocket-Protocol`): `coap-ws-gateway.v1.json` (also when it names none) or
`coap-ws-gateway.v1.cbor`, where the same frame objects, with the same keys, travel as CBOR
maps in binary messages, both ways. This module owns that choice (`choose_subprotocol`),
reading a client's message in its connection's encoding (`parse_client_frame`), and writing
gateway frames in it: `to_cbor` for a single frame, `Outgoing` for a notify going to many
connections, which makes each form (JSON or CBOR, complete or compact) at most once per
update, framed once, whatever the number of connections that take it.

A value that came from the sensor as one CBOR data item (cf 60, SenML-CBOR) goes to a CBOR
client as those very bytes (`NotifyMeta.cbor_value`, embedded in the frame's map): tags,
byte strings and integers beyond 64 bits arrive intact, with no detour through the JSON
mapping. The hub has already checked them (one well-formed item, bounded depth).

A compact notify (`"compact": true` on subscribe) leaves out those of `uri`, `code`, `cf`
and `max_age` (`HEADER_FIELDS`) that did not change since the resource's previous update;
every other field stays (`type`, `sub`, `seq`, the payload fields, `ts`, and `replay`,
`repeat`, `cond_error` when set). Which
connections may take it is decided per subscription by `CompactState`.

Pure: no I/O, no asyncio. The server module does the writing.
"""

from __future__ import annotations

import io
import json
import struct
from collections.abc import Sequence
from typing import Any, Final

import cbor2

from translator.core import frames
from translator.core.frames import BAD_REQUEST, ClientFrame, FrameError, JSONValue
from translator.core.hub import HEADER_FIELDS, NotifyMeta

JSON_SUBPROTOCOL: Final = "coap-ws-gateway.v1.json"
CBOR_SUBPROTOCOL: Final = "coap-ws-gateway.v1.cbor"
SUBPROTOCOLS: Final = (JSON_SUBPROTOCOL, CBOR_SUBPROTOCOL)
"""The subprotocols the gateway speaks; a client that names none gets JSON."""

MAX_CBOR_DEPTH: Final = 64
"""Nesting a client's CBOR message may have: frames are flat, a request `value` is what a
sensor accepts; the bound keeps a hostile message from costing the decoder's stack."""

_REFERENCE_TAGS: Final = (
    0, 1, 4, 5, 25, 28, 29, 30, 35, 36, 37, 52, 54, 100, 256, 258, 260, 261, 1004, 55799,
)
"""The tags cbor2 would interpret (found by trying each), but bignums (2/3, which become
integers): a client's CBOR keeps them as `CBORTag`s instead, so a request `value` reaches
the sensor as the client wrote it, and the reference tags (25/256 string references, 28/29
shared values) are never resolved into a large or cyclic structure."""


def _keep(tag: int) -> Any:
    return lambda content, immutable: cbor2.CBORTag(tag, content)


_KEEP_TAGS: Final = {tag: _keep(tag) for tag in _REFERENCE_TAGS}


class UnsupportedSubprotocol(ValueError):
    """A client offered subprotocols, none of them the gateway's (HTTP 400)."""


def choose_subprotocol(offered: Sequence[str]) -> str | None:
    """The subprotocol for a client that offers `offered`, in its order of preference;
    None (JSON) when it offers none. Raises `UnsupportedSubprotocol` naming the supported
    ones when it offers only others."""
    if not offered:
        return None
    for name in offered:
        if name in SUBPROTOCOLS:
            return name
    raise UnsupportedSubprotocol(
        f"none of the offered subprotocols is supported; use {' or '.join(SUBPROTOCOLS)}"
    )


def is_cbor(subprotocol: str | None) -> bool:
    return subprotocol == CBOR_SUBPROTOCOL


# ---------------------------------------------------------------------------------------------
# Client -> gateway
# ---------------------------------------------------------------------------------------------


def parse_client_frame(message: str | bytes, cbor: bool) -> ClientFrame:
    """A client's message in its connection's encoding, as a frame; or `FrameError`. A text
    frame on a CBOR connection and a binary frame on a JSON one are `bad_request`."""
    if not cbor:
        if isinstance(message, bytes):
            raise FrameError(
                BAD_REQUEST,
                "binary frames are not supported on a JSON connection; send JSON text frames "
                f"(or open the connection with the {CBOR_SUBPROTOCOL} subprotocol)",
            )
        return frames.parse(message)
    if isinstance(message, str):
        raise FrameError(
            BAD_REQUEST,
            f"text frames are not supported on a {CBOR_SUBPROTOCOL} connection; "
            "send each frame as a CBOR map in a binary frame",
        )
    return frames.parse_object(decode_cbor_frame(message))


def decode_cbor_frame(message: bytes) -> dict[Any, Any]:
    """One CBOR map from a client's binary message, or `FrameError` (bad_request)."""
    stream = io.BytesIO(message)
    try:
        obj = cbor2.CBORDecoder(
            stream, semantic_decoders=_KEEP_TAGS, max_depth=MAX_CBOR_DEPTH
        ).decode()
    # cbor2 raises CBORDecodeError and, from its tag decoders, ValueError and the like.
    except Exception as exc:
        raise FrameError(BAD_REQUEST, f"not valid CBOR: {exc}") from None
    trailing = len(message) - stream.tell()
    if trailing:
        raise FrameError(BAD_REQUEST, f"not valid CBOR: {trailing} bytes after the data item")
    if not isinstance(obj, dict):
        raise FrameError(BAD_REQUEST, "a frame must be a CBOR map")
    return obj


# ---------------------------------------------------------------------------------------------
# Gateway -> client
# ---------------------------------------------------------------------------------------------


def _map_header(size: int) -> bytes:
    """The head of a CBOR map of `size` pairs (RFC 8949 §3.1, major type 5)."""
    if size < 24:
        return bytes((0xA0 | size,))
    if size < 256:
        return bytes((0xB8, size))
    return struct.pack("!BH", 0xB9, size)


def cbor_map(obj: dict[str, JSONValue], value_item: bytes | None = None) -> bytes:
    """`obj` as a CBOR map, its keys in order; with `value_item`, the encoded `value` is
    those bytes (a CBOR data item) instead of the encoding of `obj["value"]`."""
    if value_item is None:
        encoded: bytes = cbor2.dumps(obj)
        return encoded
    parts = [_map_header(len(obj))]
    for key, item in obj.items():
        parts.append(cbor2.dumps(key))
        parts.append(value_item if key == "value" else cbor2.dumps(item))
    return b"".join(parts)


def to_cbor(text: str, value_item: bytes | None = None) -> bytes:
    """A gateway frame's JSON text as the CBOR map a CBOR client gets: the same keys and
    values (the text is JSON this process wrote), the value as `value_item` when given."""
    obj: dict[str, JSONValue] = json.loads(text)
    if value_item is not None and "value" not in obj:
        value_item = None
    return cbor_map(obj, value_item)


def ws_frame(message: str | bytes) -> bytes:
    """A complete, unmasked, unfragmented WebSocket message (RFC 6455 §5.2): a text frame
    for `str`, a binary frame for `bytes`."""
    if isinstance(message, str):
        payload, opcode = message.encode(), 0x81
    else:
        payload, opcode = message, 0x82
    length = len(payload)
    if length < 126:
        header = bytes((opcode, length))
    elif length < 1 << 16:
        header = struct.pack("!BBH", opcode, 126, length)
    else:
        header = struct.pack("!BBQ", opcode, 127, length)
    return header + payload


def compact_object(
    obj: dict[str, JSONValue], changed: Sequence[str] | None
) -> dict[str, JSONValue]:
    """The compact form of a notify object: without the `HEADER_FIELDS` that `changed`
    does not name; everything else (`type`, `sub`, `seq`, the payload fields, `ts`, and
    `replay`, `repeat`, `cond_error` when set) stays, in order. `changed` None: complete."""
    if changed is None:
        return obj
    return {
        key: value for key, value in obj.items()
        if key not in HEADER_FIELDS or key in changed
    }


class Outgoing:
    """One notify (or any frame) on its way to many connections, in each form asked for.

    A form is made, and framed, the first time a connection asks for it, then shared by
    every other connection that takes the same form: per update, one encoding per form in
    use, never one per client. The JSON complete form is the hub's text itself.
    """

    __slots__ = ("_forms", "_obj", "meta", "text")

    def __init__(self, text: str, meta: NotifyMeta | None = None) -> None:
        self.text = text
        self.meta = meta
        self._obj: dict[str, JSONValue] | None = None
        self._forms: dict[tuple[bool, bool], tuple[str | bytes, bytes]] = {}

    def form(self, cbor: bool, compact: bool) -> tuple[str | bytes, bytes]:
        """(message, its WebSocket frame) in the encoding and form asked for."""
        meta = self.meta
        if meta is None or meta.changed is None:
            compact = False  # nothing to leave out: the first update of its stream
        key = (cbor, compact)
        found = self._forms.get(key)
        if found is not None:
            return found
        message: str | bytes
        if not cbor and not compact:
            message = self.text
        else:
            if self._obj is None:
                self._obj = json.loads(self.text)
            obj = compact_object(self._obj, meta.changed if compact and meta else None)
            if cbor:
                message = cbor_map(obj, meta.cbor_value if meta and "value" in obj else None)
            else:
                message = frames.dumps(obj)
        made = (message, ws_frame(message))
        self._forms[key] = made
        return made


class CompactState:
    """Which subscriptions of one connection want compact notifies, and the `seq` of the
    last notify each was handed.

    A compact frame says only what changed since the resource's previous update, so a
    subscription may take it only when the previous update is the last one it was handed,
    and when nothing waits in the connection's outbox: a queued frame may still be replaced
    by a newer one (the slow-consumer policy), and the client would then miss what that one
    said. In every other case (the first notify, a gap, a backlog) the frame is complete.
    """

    __slots__ = ("_last",)

    NOTHING_YET: Final = -1

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def __bool__(self) -> bool:
        return bool(self._last)

    def want(self, sub: str) -> None:
        """`sub` wants compact notifies from now on; the next one is complete."""
        self._last[sub] = self.NOTHING_YET

    def forget(self, sub: str) -> None:
        self._last.pop(sub, None)

    def take(self, sub: str | None, meta: NotifyMeta | None, backlog: bool) -> bool:
        """Whether this notify of `sub` may go compact; records it as handed either way."""
        if sub is None or meta is None:
            return False
        last = self._last.get(sub)
        if last is None:
            return False
        self._last[sub] = meta.seq
        return not backlog and last == meta.seq - 1
