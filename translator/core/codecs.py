"""Content-format codec registry: CoAP payload bytes <-> JSON values.

This module owns every decision about what a CoAP payload *means* as JSON and how a JSON
value becomes a request payload. It is pure (no I/O, no asyncio) so the protocol and
transport layers can call it from anywhere and it can be tested exhaustively.

The registry is a table keyed by CoAP content-format number (``_CODECS``); each entry names
the media type and holds the decode/encode callables for it. ``MEDIA_TYPES`` is derived from
that table.

Decoding (``decode_payload``) never raises: a payload that cannot be decoded is reported as
``{"payload_b64": ..., "decode_error": ...}`` so the gateway can still forward the bytes.
Its result always survives ``json.dumps(..., allow_nan=False)``.

Choices worth knowing about (they are visible to WebSocket clients):

* CBOR -> JSON follows RFC 8949 section 6.1. Integers (plain or bignum, tags 2/3) within
  +/-(2**53 - 1) stay JSON numbers; larger magnitudes become strings of their decimal
  value, because JSON consumers (JavaScript) silently lose precision beyond 2**53.
  Integers wider than ``_MAX_INT_BITS`` bits (~4200 decimal digits, Python's own int->str
  limit) make the payload undecodable.
* Encoding hints (tags 21/22/23) change how the byte strings *inside* them are rendered:
  21 base64url without padding (the default anyway), 22 standard base64 with padding,
  23 lowercase hex. A nested hint overrides an outer one.
* Tag 0 becomes its date/time string, tag 1 its epoch number, tags 4/5 (decimal fraction,
  bigfloat) the nearest float. Every other tag becomes its content, except tags cbor2
  decodes to Python objects (UUID, IP addresses, Fraction, dates, ...) which become
  strings (dates in ISO 8601); when cbor2 rejects such a tag's content (a UUID tag around
  an integer) the whole payload is a decode error.
  Value-sharing (28/29) and string-reference (25/256) tags are *not* resolved: resolving
  them lets a few bytes expand into a huge (or cyclic) structure, so their content is
  emitted as-is per section 6.1.
* NaN, +/-Infinity, ``undefined`` and simple values become null. Non-string map keys
  become strings: scalars by their JSON text (``1`` -> ``"1"``, ``true`` -> ``"true"``),
  byte strings base64url, arrays/maps their compact sort_keys JSON text.
* Nesting deeper than ``MAX_DEPTH`` levels (CBOR, JSON) is a decode error.
* JSON numbers that overflow a double (``1e400``) and the NaN/Infinity constants are decode
  errors: the gateway never emits NaN or Infinity.
* Link-format (RFC 6690): attribute names are lower-cased (RFC 8288: case-insensitive);
  an attribute without a value is ``true``; quoted values are unquoted; values stay
  strings (``"ct": "60"``, ``"rt": "a b"`` for several space-separated types). When an
  attribute repeats in one link, the *first* occurrence wins: RFC 6690 attributes carry
  several values space-separated in one attribute rather than by repetition, and keeping
  one string per name keeps the output a flat map. A ``href`` attribute never overrides
  the link target.
* SenML (RFC 8428) is returned as resolved records (section 4.6), in input order (not
  re-sorted by time). Name: bn + n, which must be non-empty (its characters are not
  policed). Unit: u, else bu. Time: bt + t (a missing one counts as 0); a result below
  2**28 is relative to "now", and "now" is the ``ts`` argument, so ``t = ts + bt + t`` and
  a record without any time gets ``t = ts``. bv is added to v; a record with no value
  field at all gets v = bv (a missing Value counts as zero); vs/vb/vd are never touched.
  bs is added to s, and every record gets s once s or bs is present (a missing Sum counts
  as zero). bver is checked (> 10 is refused) and dropped. At most one of v/vs/vb/vd per
  record; a record with none (and no base value) is kept without one. Unknown labels are
  dropped; unknown labels ending in "_" (must-understand) make the pack invalid. At most
  ``MAX_SENML_RECORDS`` records are accepted.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, time
from decimal import Decimal
from typing import Any, Final

import cbor2

from translator.core import strictjson

JSONValue = Any
"""A value as produced by ``json.loads`` (dict/list/str/int/float/bool/None)."""

MAX_DEPTH: Final = 256
"""Deepest container nesting accepted in a decoded (or encoded) value."""

MAX_SENML_RECORDS: Final = 100_000
"""A hostile sensor could send a million tiny records; beyond this the pack is refused."""

# 2**53 - 1: the largest integer a JSON consumer using IEEE doubles represents exactly.
_MAX_SAFE_INT: Final = 2**53 - 1
# Python refuses int->str beyond 4300 digits; 14_000 bits is about 4214 digits.
_MAX_INT_BITS: Final = 14_000
# SenML: resolved times below 2**28 are relative to "now" (RFC 8428).
_SENML_RELATIVE_TIME_LIMIT: Final = 2**28
_SENML_MAX_VERSION: Final = 10
_ERROR_DETAIL_CHARS: Final = 160
# Longest JSON text accepted for a non-string CBOR map key (see _cbor_key).
_MAX_KEY_CHARS: Final = 8192


class UnsupportedValue(ValueError):
    """The value cannot be encoded in that content-format (protocol error code `unsupported`)."""


class _DecodeError(ValueError):
    """A payload does not decode; the message is the frame's short ``decode_error``."""


@dataclass(frozen=True, slots=True)
class Codec:
    """One content-format: its media type and how to decode/encode it.

    ``decode`` is None for opaque formats (the bytes travel as ``payload_b64``); ``encode``
    is None when the gateway cannot build such a payload from a JSON value.
    """

    media_type: str
    decode: Callable[[bytes, float], JSONValue] | None
    encode: Callable[[JSONValue], bytes] | None


# --------------------------------------------------------------------------- helpers


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _short(exc: BaseException) -> str:
    """An exception as a short single-line message for a ``decode_error`` field."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > _ERROR_DETAIL_CHARS:
        text = text[: _ERROR_DETAIL_CHARS - 3] + "..."
    return text


def _is_int(value: object) -> bool:
    # bool is an int subclass, but true/false are never numbers in JSON, CBOR or SenML.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return _is_int(value)


def _utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _DecodeError(
            f"invalid {what}: not UTF-8 ({exc.reason} at byte {exc.start})"
        ) from None


def _tree_problem(value: JSONValue) -> str | None:
    """Why a JSON-like value is unfit to travel (too deep, lone surrogate), or None.

    Iterative, so an arbitrarily deep value cannot exhaust the Python stack here; the
    check protects later recursive consumers (json.dumps, cbor2.dumps -- which crashes
    the process on very deep input -- and the WebSocket's UTF-8 encoder).
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii():
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError:
                    return "string contains a lone surrogate"
        elif isinstance(item, list | tuple | dict):
            if depth >= MAX_DEPTH:
                return f"nesting deeper than {MAX_DEPTH} levels"
            if isinstance(item, dict):
                stack.extend((key, depth + 1) for key in item)
                stack.extend((val, depth + 1) for val in item.values())
            else:
                stack.extend((element, depth + 1) for element in item)
    return None


# --------------------------------------------------------------------------- text


def _decode_text(data: bytes, ts: float) -> JSONValue:
    return _utf8(data, "text")


def _encode_text(value: JSONValue) -> bytes:
    if not isinstance(value, str):
        raise UnsupportedValue("content-format 0 (text/plain) needs a string")
    try:
        return value.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsupportedValue(
            "content-format 0 (text/plain): the string contains a lone surrogate"
        ) from None


# Control characters that make a payload of unknown format "binary" rather than text.
_BINARY_CONTROL_CHARS: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def _sniff(data: bytes) -> dict[str, JSONValue]:
    """No content-format at all: show text as text, anything else as base64."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return {"payload_b64": _b64(data)}
    if _BINARY_CONTROL_CHARS.search(text):
        return {"payload_b64": _b64(data)}
    return {"value": text}


# --------------------------------------------------------------------------- JSON


def _load_json(data: bytes, what: str) -> JSONValue:
    text = _utf8(data, what)
    try:
        value = strictjson.loads(text)
    except strictjson.NotJSON as exc:
        raise _DecodeError(f"invalid {what}: {exc}") from None
    except (ValueError, RecursionError) as exc:
        raise _DecodeError(f"invalid {what}: {_short(exc)}") from None
    problem = _tree_problem(value)
    if problem is not None:
        raise _DecodeError(f"invalid {what}: {problem}")
    return value


def _decode_json(data: bytes, ts: float) -> JSONValue:
    return _load_json(data, "JSON")


def _dump_json(value: JSONValue, what: str) -> bytes:
    problem = _tree_problem(value)
    if problem is not None:
        raise UnsupportedValue(f"cannot encode the value as {what}: {problem}")
    try:
        text = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise UnsupportedValue(f"cannot encode the value as {what}: {_short(exc)}") from None
    return text.encode("utf-8")


def _encode_json(value: JSONValue) -> bytes:
    return _dump_json(value, "JSON")


# --------------------------------------------------------------------------- CBOR


class _Tagged:
    """A CBOR tag kept raw by the decoder so the JSON conversion can apply RFC 8949 6.1.

    Hashable by identity: cbor2 may need it as a map key.
    """

    __slots__ = ("content", "tag")

    def __init__(self, tag: int, content: Any) -> None:
        self.tag = tag
        self.content = content


def _keep_tag(tag: int) -> Callable[[Any, bool], _Tagged]:
    def decode(content: Any, immutable: bool) -> _Tagged:
        return _Tagged(tag, content)

    return decode


# Tags whose cbor2 built-in interpretation is replaced: 0/1 (datetime objects would lose the
# original string/number), 2/3/4/5 (size limits and float conversion done here), 21-23
# (hints need the raw bytes), 25/256/28/29 (reference tags: amplification/cycles), 258
# (a Python set would lose order and cannot hold unhashable items).
_RAW_TAGS: Final = (0, 1, 2, 3, 4, 5, 21, 22, 23, 25, 28, 29, 256, 258)
_SEMANTIC_OVERRIDES: Final[dict[int, Callable[[Any, bool], _Tagged]]] = {
    tag: _keep_tag(tag) for tag in _RAW_TAGS
}


def _load_cbor(data: bytes, what: str) -> Any:
    """Exactly one CBOR data item, with the tags in ``_RAW_TAGS`` left as ``_Tagged``."""
    stream = io.BytesIO(data)
    try:
        decoder = cbor2.CBORDecoder(
            stream, semantic_decoders=_SEMANTIC_OVERRIDES, max_depth=MAX_DEPTH
        )
        item = decoder.decode()
    # cbor2 raises CBORDecodeError, but its built-in tag decoders can raise ValueError,
    # TypeError, OverflowError, ...; any failure here only means "not decodable".
    except Exception as exc:
        raise _DecodeError(f"invalid {what}: {_short(exc)}") from None
    trailing = len(data) - stream.tell()
    if trailing:
        raise _DecodeError(f"invalid {what}: {trailing} trailing bytes after the data item")
    return item


def _json_int(number: int) -> JSONValue:
    if -_MAX_SAFE_INT <= number <= _MAX_SAFE_INT:
        return number
    if number.bit_length() > _MAX_INT_BITS:
        raise _DecodeError(f"invalid CBOR: integer wider than {_MAX_INT_BITS} bits")
    return str(number)


def _bignum(tag: int, content: bytes) -> int:
    if len(content) * 8 > _MAX_INT_BITS + 8:
        raise _DecodeError(f"invalid CBOR: bignum wider than {_MAX_INT_BITS} bits")
    magnitude = int.from_bytes(content, "big")
    return magnitude if tag == 2 else -1 - magnitude


# Exponent bounds outside which mantissa * base**exponent (|mantissa| < 2**_MAX_INT_BITS) is
# certainly 0.0 or beyond the double range, so the exact integer arithmetic stays small.
_SCALE_BOUNDS: Final[dict[int, tuple[int, int]]] = {10: (-5_000, 400), 2: (-16_000, 1_100)}


def _scaled_float(mantissa: int, base: int, exponent: int) -> float | None:
    """mantissa * base**exponent as the nearest double; None when it overflows."""
    low, high = _SCALE_BOUNDS[base]
    if mantissa == 0 or exponent < low:
        return 0.0 if mantissa >= 0 else -0.0  # not copysign: a huge int overflows float()
    if exponent > high:
        return None
    try:
        if exponent >= 0:
            return float(mantissa * base**exponent)
        divisor: int = base**-exponent
        # int / int is correctly rounded in Python, unlike going through an inexact float.
        return mantissa / divisor
    except OverflowError:
        return None


def _fraction_tag(tag: int, content: Any, depth: int, hint: int | None) -> JSONValue:
    """Tags 4 (decimal fraction) and 5 (bigfloat): [exponent, mantissa] -> float."""
    if isinstance(content, list | tuple) and len(content) == 2:
        exponent, mantissa = content
        if (
            isinstance(mantissa, _Tagged)
            and mantissa.tag in (2, 3)
            and isinstance(mantissa.content, bytes)
        ):
            mantissa = _bignum(mantissa.tag, mantissa.content)
        if _is_int(exponent) and _is_int(mantissa):
            if mantissa.bit_length() > _MAX_INT_BITS:
                raise _DecodeError(f"invalid CBOR: mantissa wider than {_MAX_INT_BITS} bits")
            return _scaled_float(mantissa, 10 if tag == 4 else 2, exponent)
    return _cbor_to_json(content, depth + 1, hint)


def _bignum_tag(tag: int, content: Any, depth: int, hint: int | None) -> JSONValue:
    if isinstance(content, bytes):
        return _json_int(_bignum(tag, content))
    return _cbor_to_json(content, depth + 1, hint)


def _date_tag(tag: int, content: Any, depth: int, hint: int | None) -> JSONValue:
    # Tag 0 is its string and tag 1 its number: both already JSON, converted generically.
    return _cbor_to_json(content, depth + 1, hint)


def _hint_tag(tag: int, content: Any, depth: int, hint: int | None) -> JSONValue:
    return _cbor_to_json(content, depth + 1, tag)


_TagHandler = Callable[[int, Any, int, int | None], JSONValue]
_TAG_HANDLERS: Final[dict[int, _TagHandler]] = {
    0: _date_tag,
    1: _date_tag,
    2: _bignum_tag,
    3: _bignum_tag,
    4: _fraction_tag,
    5: _fraction_tag,
    21: _hint_tag,
    22: _hint_tag,
    23: _hint_tag,
}

# How byte strings are shown, by the encoding hint in force (None: no hint).
_BYTES_RENDERERS: Final[dict[int | None, Callable[[bytes], str]]] = {
    None: _b64url,
    21: _b64url,
    22: _b64,
    23: bytes.hex,
}


def _python_object_to_json(item: object) -> JSONValue:
    """Objects cbor2 builds from tags it interprets itself (UUID, Fraction, IP, ...)."""
    if isinstance(item, datetime | date | time):
        return item.isoformat()
    if isinstance(item, Decimal):
        number = float(item)
        return number if math.isfinite(number) else None
    if isinstance(item, re.Pattern):
        # Tag 35 around a byte string compiles to a bytes pattern, which JSON cannot hold.
        pattern = item.pattern
        return pattern if isinstance(pattern, str) else _b64url(pattern)
    return str(item)


def _cbor_key(key: Any, depth: int, hint: int | None) -> str:
    converted = _cbor_to_json(key, depth, hint)
    if isinstance(converted, str):
        return converted
    text = json.dumps(converted, separators=(",", ":"), sort_keys=True, allow_nan=False)
    # Maps used as keys of maps used as keys ... re-escape their quotes at every level, so the
    # key text doubles per level: 30 bytes of CBOR would otherwise exhaust memory.
    if len(text) > _MAX_KEY_CHARS:
        raise _DecodeError(f"invalid CBOR: a map key converts to more than {_MAX_KEY_CHARS} chars")
    return text


def _cbor_to_json(item: Any, depth: int = 0, hint: int | None = None) -> JSONValue:
    """RFC 8949 section 6.1 conversion of a decoded CBOR item (see module docstring).

    Recursive but bounded by ``MAX_DEPTH`` (cbor2 enforces the same bound while decoding),
    so it needs at most a few hundred stack frames.
    """
    if depth > MAX_DEPTH:
        raise _DecodeError(f"invalid CBOR: nesting deeper than {MAX_DEPTH} levels")
    if item is None or isinstance(item, bool | str):
        return item
    if isinstance(item, int):
        return _json_int(item)
    if isinstance(item, float):
        return item if math.isfinite(item) else None
    if isinstance(item, bytes):
        return _BYTES_RENDERERS[hint](item)
    if isinstance(item, list | tuple):
        array: list[JSONValue] = []
        for element in item:
            array.append(_cbor_to_json(element, depth + 1, hint))
        return array
    if isinstance(item, Mapping):
        obj: dict[str, JSONValue] = {}
        for key, val in item.items():
            obj[_cbor_key(key, depth + 1, hint)] = _cbor_to_json(val, depth + 1, hint)
        return obj
    if isinstance(item, _Tagged):
        handler = _TAG_HANDLERS.get(item.tag)
        if handler is None:
            return _cbor_to_json(item.content, depth + 1, hint)
        return handler(item.tag, item.content, depth, hint)
    if isinstance(item, cbor2.CBORTag):
        return _cbor_to_json(item.value, depth + 1, hint)
    if item is cbor2.undefined or isinstance(item, cbor2.CBORSimpleValue):
        return None
    return _python_object_to_json(item)


def _decode_cbor(data: bytes, ts: float) -> JSONValue:
    return _cbor_to_json(_load_cbor(data, "CBOR"))


def _encode_cbor(value: JSONValue) -> bytes:
    problem = _tree_problem(value)
    if problem is not None:
        # Checked first: cbor2.dumps crashes the interpreter on very deep values.
        raise UnsupportedValue(f"cannot encode the value as CBOR: {problem}")
    try:
        encoded: bytes = cbor2.dumps(value)
    except Exception as exc:  # cbor2 raises CBOREncodeError, TypeError, ValueError, ...
        raise UnsupportedValue(f"cannot encode the value as CBOR: {_short(exc)}") from None
    return encoded


# --------------------------------------------------------------------------- link-format

_LINK_TARGET: Final = re.compile(r"\s*<([^>]*)>")
_LINK_PARAM_NAME: Final = re.compile(r'\s*;\s*([^\s;,=<>"]+)')
_LINK_PARAM_EQUALS: Final = re.compile(r"\s*=\s*")
_LINK_QUOTED: Final = re.compile(r'"((?:[^"\\]|\\.)*)"', re.DOTALL)
_LINK_PTOKEN: Final = re.compile(r'[^\s;,"]*')
_LINK_QUOTED_PAIR: Final = re.compile(r"\\(.)", re.DOTALL)
_LINK_SEPARATOR: Final = re.compile(r"\s*(,|\Z)")


def parse_link_format(text: str) -> list[dict[str, JSONValue]]:
    """RFC 6690 link-format -> ``[{"href": "/temperature", "rt": "...", "obs": True, ...}]``.

    Attribute names are lower-cased; a value-less attribute is ``True``; quoted values are
    unquoted (backslash escapes removed); values stay strings; a repeated attribute keeps
    its first value. Whitespace around separators is tolerated (servers wrap long lists).
    Raises ValueError on malformed input.
    """
    links: list[dict[str, JSONValue]] = []
    if not text.strip():
        return links
    pos = 0
    while True:
        target = _LINK_TARGET.match(text, pos)
        if target is None:
            raise ValueError(f"expected '<' starting a link at offset {pos}")
        link: dict[str, JSONValue] = {"href": target.group(1)}
        pos = target.end()
        while (param := _LINK_PARAM_NAME.match(text, pos)) is not None:
            name = param.group(1).lower()
            pos = param.end()
            value: str | bool = True
            equals = _LINK_PARAM_EQUALS.match(text, pos)
            if equals is not None:
                pos = equals.end()
                quoted = _LINK_QUOTED.match(text, pos)
                if quoted is not None:
                    value = _LINK_QUOTED_PAIR.sub(lambda m: m.group(1), quoted.group(1))
                    pos = quoted.end()
                else:
                    token = _LINK_PTOKEN.match(text, pos)
                    assert token is not None  # the pattern also matches the empty string
                    value = token.group(0)
                    pos = token.end()
            link.setdefault(name, value)
        links.append(link)
        separator = _LINK_SEPARATOR.match(text, pos)
        if separator is None:
            raise ValueError(f"unexpected {text[pos]!r} at offset {pos}")
        if not separator.group(1):
            return links
        pos = separator.end()


def _decode_link_format(data: bytes, ts: float) -> JSONValue:
    text = _utf8(data, "link-format")
    try:
        return parse_link_format(text)
    except ValueError as exc:
        raise _DecodeError(f"invalid link-format: {_short(exc)}") from None


# --------------------------------------------------------------------------- SenML

_SENML_CBOR_LABELS: Final[dict[int, str]] = {
    -1: "bver",
    -2: "bn",
    -3: "bt",
    -4: "bu",
    -5: "bv",
    -6: "bs",
    0: "n",
    1: "u",
    2: "v",
    3: "vs",
    4: "vb",
    5: "s",
    6: "t",
    7: "ut",
    8: "vd",
}
_SENML_CBOR_KEYS: Final[dict[str, int]] = {label: key for key, label in _SENML_CBOR_LABELS.items()}
_SENML_BASE_FIELDS: Final = ("bn", "bt", "bu", "bv", "bs", "bver")
_SENML_VALUE_FIELDS: Final = ("v", "vs", "vb", "vd")


def _is_version(value: object) -> bool:
    return _is_int(value) and isinstance(value, int) and value > 0


_SENML_FIELD_TYPES: Final[dict[str, Callable[[object], bool]]] = {
    "bn": lambda value: isinstance(value, str),
    "bt": _is_number,
    "bu": lambda value: isinstance(value, str),
    "bv": _is_number,
    "bs": _is_number,
    "bver": _is_version,
    "n": lambda value: isinstance(value, str),
    "u": lambda value: isinstance(value, str),
    "v": _is_number,
    "vs": lambda value: isinstance(value, str),
    "vb": lambda value: isinstance(value, bool),
    "vd": lambda value: isinstance(value, str),
    "s": _is_number,
    "t": _is_number,
    "ut": _is_number,
}


def _senml_add(left: float, right: float) -> float:
    try:
        total = left + right
    except OverflowError:  # a huge int added to a float
        raise _DecodeError("invalid SenML: number out of range") from None
    if isinstance(total, float) and not math.isfinite(total):
        raise _DecodeError("invalid SenML: number out of range")
    return total


def _resolve_record(
    index: int, record: dict[str, Any], base: dict[str, Any], ts: float
) -> dict[str, JSONValue]:
    name = base.get("bn", "") + record.get("n", "")
    if not name:
        raise _DecodeError(f"invalid SenML: record {index} has no name")
    values = [field for field in _SENML_VALUE_FIELDS if field in record]
    if len(values) > 1:
        raise _DecodeError(f"invalid SenML: record {index} has more than one value field")
    resolved: dict[str, JSONValue] = {"n": name}
    unit = record.get("u", base.get("bu"))
    if unit is not None:
        resolved["u"] = unit
    when = _senml_add(base.get("bt", 0), record.get("t", 0))
    if when < _SENML_RELATIVE_TIME_LIMIT:
        when = _senml_add(ts, when)
    resolved["t"] = when
    if values:
        field = values[0]
        value = record[field]
        if field == "v" and "bv" in base:
            value = _senml_add(base["bv"], value)
        resolved[field] = value
    elif "bv" in base:
        resolved["v"] = base["bv"]  # RFC 8428: a missing Value counts as zero
    if "s" in record or "bs" in base:
        resolved["s"] = _senml_add(base.get("bs", 0), record.get("s", 0))
    if "ut" in record:
        resolved["ut"] = record["ut"]
    return resolved


def _resolve_senml(records: Any, ts: float) -> list[dict[str, JSONValue]]:
    """RFC 8428 section 4.6 resolution of a SenML pack whose labels are strings."""
    if not isinstance(records, list):
        raise _DecodeError("invalid SenML: not an array of records")
    if len(records) > MAX_SENML_RECORDS:
        raise _DecodeError(f"invalid SenML: more than {MAX_SENML_RECORDS} records")
    base: dict[str, Any] = {}
    resolved: list[dict[str, JSONValue]] = []
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise _DecodeError(f"invalid SenML: record {index} is not an object")
        for label, value in record.items():
            check = _SENML_FIELD_TYPES.get(label)
            if check is None:
                if label.endswith("_"):
                    raise _DecodeError(
                        f"invalid SenML: record {index} has must-understand label {label!r}"
                    )
                continue
            if not check(value):
                raise _DecodeError(f"invalid SenML: record {index} has a bad {label!r}")
        if record.get("bver", 0) > _SENML_MAX_VERSION:
            raise _DecodeError(f"invalid SenML: unsupported version {record['bver']}")
        # A base field applies to its own record and all later ones until it reappears.
        base.update((label, record[label]) for label in _SENML_BASE_FIELDS if label in record)
        resolved.append(_resolve_record(index, record, base, ts))
    return resolved


def _decode_senml_json(data: bytes, ts: float) -> JSONValue:
    return _resolve_senml(_load_json(data, "SenML JSON"), ts)


def _senml_cbor_record(index: int, raw: Any) -> dict[str, JSONValue]:
    """One CBOR record -> the JSON-label form ``_resolve_senml`` checks and resolves."""
    if not isinstance(raw, Mapping):
        raise _DecodeError(f"invalid SenML: record {index} is not a map")
    record: dict[str, JSONValue] = {}
    for key, value in raw.items():
        if _is_int(key):
            label = _SENML_CBOR_LABELS.get(key)
            if label is None:
                continue  # RFC 8428 section 6: no integer labels beyond the table
        elif isinstance(key, str):
            label = key
        else:
            raise _DecodeError(f"invalid SenML: record {index} has a non-label key")
        if label == "vd":
            if not isinstance(value, bytes):
                raise _DecodeError(f"invalid SenML: record {index} has a bad 'vd'")
            record[label] = _b64url(value)
        else:
            record[label] = _cbor_to_json(value, depth=2)
    return record


def _decode_senml_cbor(data: bytes, ts: float) -> JSONValue:
    raw = _load_cbor(data, "SenML CBOR")
    if not isinstance(raw, list):
        raise _DecodeError("invalid SenML: not an array of records")
    if len(raw) > MAX_SENML_RECORDS:
        raise _DecodeError(f"invalid SenML: more than {MAX_SENML_RECORDS} records")
    return _resolve_senml([_senml_cbor_record(i, record) for i, record in enumerate(raw)], ts)


def _senml_records(value: JSONValue, cf: int) -> list[dict[str, JSONValue]]:
    if not isinstance(value, list) or not all(
        isinstance(record, dict) and all(isinstance(key, str) for key in record) for record in value
    ):
        raise UnsupportedValue(
            f"content-format {cf} (SenML) needs an array of record objects with string keys"
        )
    return value


def _encode_senml_json(value: JSONValue) -> bytes:
    return _dump_json(_senml_records(value, 110), "SenML JSON")


def _b64url_decode(text: str) -> bytes:
    padded = text + "=" * (-len(text) % 4)
    return base64.b64decode(padded, altchars=b"-_", validate=True)


def _encode_senml_cbor(value: JSONValue) -> bytes:
    records: list[dict[Any, JSONValue]] = []
    for record in _senml_records(value, 112):
        converted: dict[Any, JSONValue] = {}
        for label, field in record.items():
            if label == "vd":
                # JSON SenML carries data values as base64url text, CBOR SenML as bytes.
                try:
                    converted[_SENML_CBOR_KEYS[label]] = _b64url_decode(field)
                except (TypeError, ValueError):  # binascii.Error is a ValueError
                    raise UnsupportedValue("SenML 'vd' must be a base64url string") from None
            else:
                converted[_SENML_CBOR_KEYS.get(label, label)] = field
        records.append(converted)
    return _encode_cbor(records)


# --------------------------------------------------------------------------- registry

_CODECS: Final[dict[int, Codec]] = {
    0: Codec("text/plain;charset=utf-8", _decode_text, _encode_text),
    40: Codec("application/link-format", _decode_link_format, None),
    42: Codec("application/octet-stream", None, None),
    50: Codec("application/json", _decode_json, _encode_json),
    60: Codec("application/cbor", _decode_cbor, _encode_cbor),
    110: Codec("application/senml+json", _decode_senml_json, _encode_senml_json),
    112: Codec("application/senml+cbor", _decode_senml_cbor, _encode_senml_cbor),
}

MEDIA_TYPES: Final[dict[int, str]] = {cf: codec.media_type for cf, codec in _CODECS.items()}
"""Media type of every content-format the gateway knows, by CoAP content-format number."""


def decode_payload(
    cf: int | None, payload: bytes, *, ts: float, advertised_cf: int | None = None
) -> dict[str, JSONValue]:
    """Return the frame fields describing a payload.

    The result is a dict with some of the keys "value", "payload_b64", "decode_error":
    ``{}`` for an empty payload, ``{"value": ...}`` when the content-format decodes,
    ``{"payload_b64": ...}`` for opaque or unknown formats, and ``{"payload_b64": ...,
    "decode_error": ...}`` when the payload does not match its content-format. ``ts`` is
    the receive time (Unix seconds), used to resolve SenML relative times. When ``cf`` is
    None, ``advertised_cf`` (e.g. the resource's ``ct`` link attribute) is used if known;
    otherwise valid UTF-8 without control characters is shown as text. Never raises for
    any input.
    """
    data = bytes(payload)
    if not data:
        return {}
    if cf is None:
        if advertised_cf is None or advertised_cf not in _CODECS:
            return _sniff(data)
        cf = advertised_cf
    codec = _CODECS.get(cf)
    if codec is None or codec.decode is None:
        return {"payload_b64": _b64(data)}
    try:
        value = codec.decode(data, ts)
    except _DecodeError as exc:
        return {"payload_b64": _b64(data), "decode_error": str(exc)}
    # Safety net: a decoder bug must cost one frame's value, not the gateway's observe loop.
    except Exception as exc:
        return {
            "payload_b64": _b64(data),
            "decode_error": f"cannot decode {codec.media_type}: {_short(exc)}",
        }
    return {"value": value}


CBOR_FORMATS: Final = frozenset({60, 112})
"""Content-formats whose representation is one CBOR data item (CBOR, SenML-CBOR)."""


def cbor_data_item(
    cf: int | None, payload: bytes, body: Mapping[str, JSONValue],
    advertised_cf: int | None = None,
) -> bytes | None:
    """The payload itself when it is the CBOR data item that `body` (from `decode_payload`)
    decoded as its `value`; None otherwise. Clients that speak CBOR get these bytes as they
    came, so tags, byte strings and wide integers need no JSON mapping. `decode_payload`
    already checked them: exactly one well-formed item, nested at most `MAX_DEPTH` deep."""
    if "value" not in body:
        return None
    effective = cf if cf is not None else advertised_cf
    return bytes(payload) if effective in CBOR_FORMATS else None


def encode_value(cf: int, value: JSONValue) -> bytes:
    """Encode a JSON value (as produced by json.loads) for a request payload.

    Raises UnsupportedValue when ``cf`` has no encoder or the value does not fit it.
    """
    codec = _CODECS.get(cf)
    if codec is None or codec.encode is None:
        raise UnsupportedValue(
            f"cannot encode a value as content-format {cf}; send payload_b64 instead"
        )
    return codec.encode(value)
