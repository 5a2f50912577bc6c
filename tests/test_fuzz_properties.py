"""Property-based fuzzing of the pure layers, beyond the properties in the per-module tests.

Every property has the same shape: any input yields a value or the documented error, never
another exception. test_frames.py, test_codecs.py, test_uris.py and test_policy.py already
cover arbitrary text for frames.parse and parse_coap_uri, random bytes/CBOR/SenML for
decode_payload and the wildcard semantics of patterns. This file adds what they leave out:

* decode_payload with *any* content-format number, and the notify frame built from it;
* encode_value with hostile values (non-finite floats, huge integers, deep nesting, lone
  surrogates) for any content-format;
* compile_pattern/Policy on arbitrary text, and the soundness of the special-destination
  rule (a pattern said to name a literal host never matches a URI with another host);
* the gateway-level combination a client frame goes through: parse -> resolve (name or
  URI) -> policy -> token narrowing and scope -> value encoding.
"""

from __future__ import annotations

import base64
import importlib.util
import ipaddress
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from translator.auth import ANONYMOUS, Principal, scope_for_method
from translator.core import frames
from translator.core.codecs import MAX_DEPTH, UnsupportedValue, decode_payload, encode_value
from translator.core.frames import FrameError, Notify
from translator.core.policy import (
    PatternError,
    Policy,
    UriPattern,
    compile_pattern,
    pattern_literal_host,
    special_address_kind,
)
from translator.core.uris import CoapUri, UriError, parse_coap_uri

TS = 1_700_000_000.0


def sendable(text: str) -> Any:
    """The JSON text a gateway frame puts on the wire: UTF-8 encodable, strict JSON."""
    text.encode("utf-8")
    return json.loads(text, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))


# --- codecs ----------------------------------------------------------------------------------

content_formats = st.none() | st.integers(min_value=0, max_value=65535)
hostile_payloads = st.one_of(
    st.binary(max_size=200),
    # Deep nesting in CBOR (arrays, maps, tags) and JSON, with a random tail.
    st.builds(
        lambda opener, depth, tail: opener * depth + tail,
        st.sampled_from([b"\x81", b"\xa1\x00", b"\xc6", b"[", b'{"a":', b"\x9f"]),
        st.integers(min_value=0, max_value=3 * MAX_DEPTH),
        st.binary(max_size=8),
    ),
    # Headers declaring huge lengths.
    st.builds(
        lambda head, length, tail: head + length + tail,
        st.sampled_from([b"\x5b", b"\x7b", b"\x9b", b"\xbb", b"\x5a", b"\x9a"]),
        st.binary(min_size=8, max_size=8),
        st.binary(max_size=8),
    ),
    # Text-ish payloads: escapes, surrogates, invalid UTF-8.
    st.text(max_size=60).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b'"\\ud800"', b"\xed\xa0\x80", b"[1e400]", b"NaN", b"<\xff>", b"\xff\xfe"]),
)


@settings(deadline=None)
@given(content_formats, hostile_payloads, content_formats)
@example(60, b"\x81" * 100_000 + b"\x00", None)
@example(0, b"\xff\xfe bad", None)
@example(50, b'{"\\udc00": 1}', None)
def test_decode_any_content_format_gives_a_sendable_notify(
    cf: int | None, payload: bytes, advertised: int | None
) -> None:
    body = decode_payload(cf, payload, ts=TS, advertised_cf=advertised)
    assert set(body) <= {"value", "payload_b64", "decode_error"}
    assert ("value" in body) + ("payload_b64" in body) <= 1 or "decode_error" in body
    if "decode_error" in body:
        assert isinstance(body["decode_error"], str) and body["payload_b64"]
    notify = Notify(
        sub="s1", uri="coap://h:5683/x", seq=1, code="2.05", cf=cf, body=body, ts=TS, max_age=60
    )
    decoded = sendable(notify.serialize())
    assert decoded["cf"] == cf
    if "payload_b64" in body:
        assert base64.b64decode(decoded["payload_b64"]) == payload


json_ish = st.recursive(
    st.none()
    | st.booleans()
    # Up to the decoder's 14 000-bit limit: encode_value accepts wider integers (JSON from
    # a client can carry 4300 digits) that decode_payload then refuses.
    | st.integers(min_value=-(2**13_999), max_value=2**13_999)
    | st.floats()  # NaN and infinities included
    | st.text(max_size=8)  # lone surrogates included
    | st.sampled_from([2**64, -(2**200), 2**13_000, "\ud800"]),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=4), children, max_size=4),
    max_leaves=20,
)


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


@settings(deadline=None)
@given(st.integers(min_value=-1, max_value=65536) | st.sampled_from([0, 40, 42, 50, 60, 110, 112]),
       json_ish | st.integers(min_value=0, max_value=2 * MAX_DEPTH).map(nested))
@example(110, [{"n": "x", "v": math.nan}])
@example(112, [{"n": "x", "vd": "***"}])
def test_encode_value_gives_bytes_or_unsupported(cf: int, value: Any) -> None:
    try:
        payload = encode_value(cf, value)
    except UnsupportedValue as error:
        assert str(error)
        return
    assert isinstance(payload, bytes)
    if cf in (0, 50, 60):
        # What the gateway encodes in these, it decodes again (a sensor may echo it back).
        # Not for SenML: the encoder passes records through unresolved ([{}] is sent as
        # is), while the decoder insists on resolvable records with a name.
        body = decode_payload(cf, payload, ts=TS)
        assert "decode_error" not in body, body


def test_encode_value_refuses_values_nested_far_too_deep() -> None:
    # Not through hypothesis: it would try to pretty-print the value and recurse.
    for cf in (0, 50, 60, 110, 112):
        try:
            encode_value(cf, nested(100_000))
        except UnsupportedValue:
            continue
        raise AssertionError(f"cf {cf} encoded a value nested 100 000 levels deep")


# --- patterns and the policy ------------------------------------------------------------------


@given(st.text(max_size=80))
@example("coap://[")
@example("coap://[*")
@example("coap://%")
@example("coap://h/%*")
@example("*://*")
def test_compile_pattern_gives_a_pattern_or_pattern_error(text: str) -> None:
    try:
        compiled = compile_pattern(text)
    except PatternError:
        return
    assert isinstance(compiled, UriPattern)
    host = pattern_literal_host(text)
    assert host is None or isinstance(host, str)
    Policy(allow=(text,))


uri_texts = st.one_of(
    st.text(max_size=80),
    st.builds(
        "{}://{}{}/{}".format,
        st.sampled_from(["coap", "coaps", "http"]),
        st.sampled_from(["h", "224.0.1.187", "[ff02::fd]", "0.0.0.0", "[::]", "255.255.255.255",
                         "[::ffff:224.0.0.1]", "a.lan", "10.0.0.1", "[", "h@x"]),
        st.sampled_from(["", ":5683", ":0", ":x"]),
        st.text(alphabet="ab/?*%.:", max_size=12),
    ),
)


@given(st.sampled_from(["*", "coap://*", "coap://*:5683/*", "coap://[ff02::fd]:5683/*",
                        "coap://224.0.1.187/*", "coap://*.lan:5683/*"]), uri_texts)
def test_policy_gives_a_decision_or_uri_error(pattern: str, text: str) -> None:
    policy = Policy(allow=(pattern,))
    try:
        decision = policy.decide(text)
    except UriError:
        return
    assert decision.allowed is policy.allows(text) is policy.allows(decision.uri)
    assert decision == policy.decide(str(decision.uri))
    assert decision.allowed == (decision.reason == "")
    assert decision.needs_resolution == (decision.allowed and not decision.uri.is_ip_literal)
    if decision.allowed and special_address_kind(decision.uri.host) is not None:
        assert pattern_literal_host(pattern) == decision.uri.host


# Patterns built around the URI structure, with wildcards in every position.
pattern_schemes = st.sampled_from(["coap", "coaps", "coap*", "co?p", "*", "c*s"])
pattern_hosts = st.sampled_from(
    ["h", "224.0.1.187", "[ff02::fd]", "0.0.0.0", "[::]", "255.255.255.255", "*", "10.0.0.*",
     "[ff02::*]", "224.0.1.18?", "*.lan", "h?", "[*]", "2*"]
)
pattern_ports = st.sampled_from(["", ":5683", ":*", ":56?3", "*", "?"])
pattern_rests = st.text(alphabet="ab/*?:.%2F", max_size=8)
fill_chars = st.text(alphabet="ab0129.:/[]?fdh-", max_size=12)


@settings(deadline=None)
@given(pattern_schemes, pattern_hosts, pattern_ports, pattern_rests, st.data())
def test_a_literal_host_is_the_only_host_a_pattern_matches(
    scheme: str, host: str, port: str, rest: str, data: st.DataObject
) -> None:
    pattern = f"{scheme}://{host}{port}/{rest}"
    try:
        compiled = compile_pattern(pattern)
    except PatternError:
        assume(False)
        return
    # A URI made from the pattern by filling in its wildcards.
    text = re.sub(
        r"[*?]",
        lambda m: data.draw(fill_chars if m.group() == "*" else st.sampled_from("ab0.:/")),
        pattern,
    )
    try:
        uri = parse_coap_uri(text)
    except UriError:
        return
    if not compiled.matches(uri):
        return
    literal = pattern_literal_host(pattern)
    assert literal is None or literal == uri.host, (pattern, str(uri))
    allowed = Policy(allow=(pattern,)).allows(uri)
    if special_address_kind(uri.host) is None:
        assert allowed
    else:
        assert allowed is (literal == uri.host)


@given(st.sampled_from(["coap", "coaps"]),
       st.sampled_from(["h", "224.0.1.187", "[ff02::fd]", "0.0.0.0", "[::]", "x.lan",
                        "255.255.255.255", "[::ffff:0.0.0.0]", "[2001:db8::1]"]),
       st.text(alphabet="ab/?*=&%2F.", max_size=20))
def test_a_normalized_uri_used_as_a_pattern_allows_itself(
    scheme: str, host: str, rest: str
) -> None:
    try:
        uri = parse_coap_uri(f"{scheme}://{host}/{rest}")
    except UriError:
        return
    # "*" and "?" in the URI are wildcards in the pattern, which match themselves too.
    assert Policy(allow=(str(uri),)).allows(uri)
    assert Policy(sensor_uris=frozenset({str(uri)})).allows(uri)


addresses = st.one_of(
    st.ip_addresses(),
    st.sampled_from(["224.0.0.1", "ff02::1", "255.255.255.255", "0.0.0.0", "::", "::ffff:0.0.0.0",
                     "64:ff9b::e000:1", "fe80::1%eth0", "10.0.0.1", "not-an-ip", ""]),
)


@given(st.lists(addresses, max_size=4))
def test_a_name_is_allowed_only_with_unicast_addresses(resolved: list[Any]) -> None:
    policy = Policy(allow=("coap://*.lan:5683/*", "coap://group.lan/*"))
    for uri in ("coap://s.lan/x", "coap://group.lan/x"):
        expected = bool(resolved) and all(
            _parses(address) and special_address_kind(address) is None for address in resolved
        )
        assert policy.allows_addresses(uri, resolved) is expected


def _parses(address: Any) -> bool:
    if not isinstance(address, str):
        return True
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return False
    return True


# --- the gateway-level combination -----------------------------------------------------------

SENSORS = {
    "temperature": "coap://127.0.0.1:5683/temperature",
    "led": "coap://127.0.0.1:5683/led",
    "group": "coap://[ff02::fd]:5683/all",
    "named": "coap://sensor.lan:5683/x",
}
POLICY = Policy(
    allow=("coap://127.0.0.1:5683/public/*", "coap://*.lan:5683/*", "coap://*:5699/*"),
    sensor_uris=frozenset(SENSORS.values()),
)
PRINCIPALS = [
    ANONYMOUS,
    Principal("reader", frozenset({"read"})),
    Principal("writer", frozenset({"write"})),
    Principal(
        "narrow",
        frozenset({"read", "write"}),
        allow=Policy(allow=("coap://127.0.0.1:5683/public/a*",),
                     sensor_uris=frozenset({SENSORS["led"]})),
        allow_names=frozenset({"led"}),
    ),
]


@dataclass(frozen=True)
class Accepted:
    uri: CoapUri
    scope: str
    needs_resolution: bool


def gateway_pipeline(text: str, principal: Principal) -> Accepted | FrameError | str:
    """What the gateway does with a client frame up to the CoAP side, as pure calls.

    Returns the accepted target, the FrameError the client gets, or the frame type of a
    frame that has no target. Any other exception is a bug.
    """
    try:
        frame = frames.parse(text)
    except FrameError as error:
        return error
    if not isinstance(frame, frames.Subscribe | frames.Request):
        return frame.type
    scope = scope_for_method("subscribe" if isinstance(frame, frames.Subscribe) else frame.method)
    if not principal.can(scope):
        return FrameError(frames.FORBIDDEN, f"token lacks scope {scope}", frame.id)
    if frame.name is not None:
        uri_text = SENSORS.get(frame.name)
        if uri_text is None or not principal.allows(uri_text, SENSORS):
            return FrameError(frames.NOT_FOUND, f"no sensor named {frame.name!r}", frame.id)
    else:
        assert frame.uri is not None
        uri_text = frame.uri
    try:
        uri = parse_coap_uri(uri_text)
    except UriError as error:
        return FrameError(frames.BAD_REQUEST, str(error), frame.id)
    decision = POLICY.decide(uri)
    if not decision.allowed:
        return FrameError(frames.FORBIDDEN, decision.reason, frame.id)
    if not principal.allows(uri, SENSORS):
        return FrameError(frames.FORBIDDEN, f"{uri} is not allowed for this token", frame.id)
    if isinstance(frame, frames.Request) and frame.has_value:
        assert frame.cf is not None
        try:
            encode_value(frame.cf, frame.value)
        except UnsupportedValue as error:
            return FrameError(frames.UNSUPPORTED, str(error), frame.id)
    return Accepted(uri, scope, decision.needs_resolution)


targets = st.one_of(
    st.fixed_dictionaries({"name": st.sampled_from([*SENSORS, "nope", "", "coap://x/y"])}),
    st.fixed_dictionaries({"uri": uri_texts | st.sampled_from([
        "coap://127.0.0.1/temperature", "coap://127.0.0.1/public/a1", "coap://127.0.0.1/public/b",
        "coap://x.lan/y", "coap://224.0.1.187:5699/x", "coap://[ff02::fd]/all",
        "coap://[ff02::fd]:5699/all", "coap://10.0.0.1:5699/z", "coap://0.0.0.0:5699/",
    ])}),
    st.fixed_dictionaries({"uri": st.text(max_size=10), "name": st.text(max_size=10)}),
    st.just({}),
)
frame_fields = st.fixed_dictionaries(
    {"type": st.sampled_from(["subscribe", "request", "ping", "list", "unsubscribe", "x", 1])},
    optional={
        "id": st.none() | st.integers() | st.text(max_size=70) | st.floats(),
        "method": st.sampled_from([*frames.METHODS, "get", "BREW", None]),
        "value": json_ish,
        "cf": st.integers(min_value=-1, max_value=70000) | st.sampled_from([0, 50, 60, 110]),
        "payload_b64": st.sampled_from(["", "AAEC", "***", 5]),
        "timeout": st.floats() | st.integers(),
        "sub": st.text(max_size=5),
    },
)


@settings(deadline=None)
@given(frame_fields, targets, st.sampled_from(PRINCIPALS))
def test_frame_to_destination_yields_a_target_or_an_error_frame(
    fields: dict[str, Any], target: dict[str, Any], principal: Principal
) -> None:
    text = json.dumps({**fields, **target})  # allow_nan: NaN may reach the parser
    outcome = gateway_pipeline(text, principal)
    if isinstance(outcome, FrameError):
        assert outcome.code in {frames.BAD_REQUEST, frames.NOT_FOUND, frames.FORBIDDEN,
                                frames.UNSUPPORTED}
        sendable(outcome.to_frame().serialize())
        return
    if isinstance(outcome, str):
        assert outcome in {"ping", "list", "unsubscribe"}
        return
    normalized = str(outcome.uri)
    # Only configured sensors and pattern matches get through, each within the token's
    # scopes and narrowing, and a special destination only through a rule naming it.
    assert principal.can(outcome.scope)
    assert principal.allows(outcome.uri, SENSORS)
    assert normalized in POLICY.sensor_uris or any(
        compile_pattern(p).matches(outcome.uri) for p in POLICY.allow
    )
    if special_address_kind(outcome.uri.host) is not None:
        assert normalized in POLICY.sensor_uris or any(
            pattern_literal_host(p) == outcome.uri.host for p in POLICY.allow
        )
    if "name" in target and "uri" not in target:
        assert normalized == SENSORS[target["name"]]


def test_the_pipeline_refuses_what_it_should() -> None:
    def code(frame: dict[str, Any], principal: Principal = ANONYMOUS) -> str:
        outcome = gateway_pipeline(json.dumps(frame), principal)
        return outcome.code if isinstance(outcome, FrameError) else "ok"

    sub = {"type": "subscribe", "id": 1}
    assert code({**sub, "name": "temperature"}) == "ok"
    assert code({**sub, "name": "group"}) == "ok"  # a configured sensor names its group
    assert code({**sub, "uri": "coap://[ff02::fd]:5699/all"}) == "forbidden"
    assert code({**sub, "uri": "coap://224.0.1.187:5699/x"}) == "forbidden"
    assert code({**sub, "uri": "coap://10.0.0.1:5699/x"}) == "ok"
    assert code({**sub, "uri": "coap://10.0.0.1:5698/x"}) == "forbidden"
    assert code({**sub, "name": "nope"}) == "not_found"
    assert code({**sub, "uri": "http://h/"}) == "bad_request"
    put = {"type": "request", "id": 2, "method": "PUT", "name": "led", "value": {"on": True}}
    assert code(put) == "ok"
    assert code(put, PRINCIPALS[1]) == "forbidden"  # read-only token
    assert code({**put, "name": "temperature"}, PRINCIPALS[3]) == "not_found"  # narrowed
    assert code(put, PRINCIPALS[3]) == "ok"
    assert code({**put, "value": 5, "cf": 0}) == "unsupported"
    assert code({**sub, "name": "temperature"}, PRINCIPALS[2]) == "forbidden"  # write-only


# --- the atheris harness ---------------------------------------------------------------------

FUZZ_DIR = Path(__file__).resolve().parent.parent / "fuzz"


def test_the_atheris_harness_passes_its_seeds(monkeypatch: pytest.MonkeyPatch) -> None:
    # Loaded without atheris (as on a platform without its wheel), so no instrumentation
    # happens inside the test run; the target function is the same.
    monkeypatch.setitem(sys.modules, "atheris", None)
    spec = importlib.util.spec_from_file_location("fuzz_frames", FUZZ_DIR / "fuzz_frames.py")
    assert spec is not None and spec.loader is not None
    harness = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(harness)
    seeds = sorted((FUZZ_DIR / "seeds" / "frames").iterdir())
    assert len(seeds) >= 10
    for seed in seeds:
        harness.test_one_input(seed.read_bytes())
    for data in (b"", b"\x01", b"\x02", b"\x03", b"[" * 100_000, b"\x02\x00\x3c" + b"\x81" * 5000):
        harness.test_one_input(data)
    with pytest.raises(AssertionError, match="binary frame was accepted"):
        monkeypatch.setattr(harness.frames, "parse", lambda data: harness.frames.Ping(None))
        harness.test_one_input(b"\x01x")
