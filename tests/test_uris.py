"""Tests for translator.core.uris: CoAP URI parsing, normalization and error reporting."""

import dataclasses

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from translator.core.uris import (
    DEFAULT_PORTS,
    MAX_URI_LENGTH,
    CoapUri,
    UriError,
    normalize_escapes,
    parse_coap_uri,
)


def norm(text: str) -> str:
    return str(parse_coap_uri(text))


# --- normalization ---------------------------------------------------------------------------


def test_fields_of_a_full_uri() -> None:
    uri = parse_coap_uri("coap://example.com:1234/a/b?x=1&y=2")
    expected = CoapUri("coap", "example.com", 1234, "/a/b", "x=1&y=2")
    assert uri == expected


def test_default_ports() -> None:
    assert DEFAULT_PORTS == {"coap": 5683, "coaps": 5684}
    assert parse_coap_uri("coap://h/x").port == 5683
    assert parse_coap_uri("coaps://h/x").port == 5684
    assert norm("coaps://h/x") == "coaps://h:5684/x"


def test_default_port_spelled_or_omitted_is_equal() -> None:
    assert parse_coap_uri("coap://h/x") == parse_coap_uri("coap://h:5683/x")
    assert hash(parse_coap_uri("coap://h/x")) == hash(parse_coap_uri("coap://h:5683/x"))
    assert norm("coap://h/x") == "coap://h:5683/x"


def test_empty_port_means_default() -> None:
    # RFC 3986 §3.2.3: "coap://h:/x" is a legal spelling of the default port.
    assert norm("coap://h:/x") == "coap://h:5683/x"


def test_non_default_port_is_kept() -> None:
    assert norm("coaps://h:5683/x") == "coaps://h:5683/x"
    assert norm("coap://h:65535/") == "coap://h:65535/"
    assert norm("coap://h:1/") == "coap://h:1/"


def test_leading_zeros_in_port_are_dropped() -> None:
    assert norm("coap://h:00080/x") == "coap://h:80/x"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("COAP://h/x", "coap://h:5683/x"),
        ("CoAPs://h/x", "coaps://h:5684/x"),
        ("coap://LocalHost/x", "coap://localhost:5683/x"),
        ("coap://[FE80::AB]/x", "coap://[fe80::ab]:5683/x"),
    ],
)
def test_scheme_and_host_are_lower_cased(text: str, expected: str) -> None:
    assert norm(text) == expected


def test_path_and_query_case_is_kept() -> None:
    assert norm("coap://h/Temp/A?Unit=C") == "coap://h:5683/Temp/A?Unit=C"


@pytest.mark.parametrize("text", ["coap://h", "coap://h/", "coap://h:5683", "coap://h?"])
def test_empty_path_becomes_slash(text: str) -> None:
    uri = parse_coap_uri(text)
    assert uri.path == "/"
    assert str(uri) == "coap://h:5683/"


def test_empty_path_with_query() -> None:
    uri = parse_coap_uri("coap://h?a=1")
    assert (uri.path, uri.query) == ("/", "a=1")
    assert str(uri) == "coap://h:5683/?a=1"


def test_empty_query_is_dropped() -> None:
    assert parse_coap_uri("coap://h/x?").query == ""
    assert norm("coap://h/x?") == "coap://h:5683/x"


def test_trailing_slash_and_empty_segments_are_significant() -> None:
    # Each segment is a Uri-Path option, so "/a/" (options "a", "") is not "/a".
    assert norm("coap://h/a/") == "coap://h:5683/a/"
    assert norm("coap://h/a//b") == "coap://h:5683/a//b"
    assert parse_coap_uri("coap://h/a/") != parse_coap_uri("coap://h/a")


@pytest.mark.parametrize(
    ("text", "expected_path"),
    [
        ("coap://h/%7Euser", "/~user"),
        ("coap://h/%7euser", "/~user"),
        ("coap://h/%41%62%30%2D%2E%5F", "/Ab0-._"),
        ("coap://h/a%2fb", "/a%2Fb"),
        ("coap://h/a%2Fb", "/a%2Fb"),
        ("coap://h/%c3%a9", "/%C3%A9"),
        ("coap://h/100%25", "/100%25"),
        ("coap://h/%252e", "/%252e"),
        ("coap://h/a%20b", "/a%20b"),
    ],
)
def test_percent_escapes_in_path(text: str, expected_path: str) -> None:
    assert parse_coap_uri(text).path == expected_path


def test_escaped_slash_is_not_a_segment_separator() -> None:
    assert parse_coap_uri("coap://h/a%2Fb") != parse_coap_uri("coap://h/a/b")


def test_percent_escapes_in_query() -> None:
    uri = parse_coap_uri("coap://h/x?n=%7e%61&s=%2f&t=%3d")
    assert uri.query == "n=~a&s=%2F&t=%3D"


def test_query_is_otherwise_kept_as_is() -> None:
    assert parse_coap_uri("coap://h/x?a=1&a=2&b/c?d").query == "a=1&a=2&b/c?d"
    assert parse_coap_uri("coap://h/x?a=/../b").query == "a=/../b"


def test_normalize_escapes_helper() -> None:
    assert normalize_escapes("%7e%2f%41*") == "~%2FA*"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/a/./b", "/a/b"),
        ("/a/../b", "/b"),
        ("/a/b/..", "/a/"),
        ("/a/b/.", "/a/b/"),
        ("/..", "/"),
        ("/../../a", "/a"),
        ("/.", "/"),
        ("/a/b/c/./../../g", "/a/g"),
        ("/mid/content=5/../6", "/mid/6"),
        ("/a/.b/..c/...", "/a/.b/..c/..."),
        ("/%2E%2E/a/%2e/b", "/a/b"),
        ("/a/.%2E/b", "/b"),
    ],
)
def test_dot_segments_are_removed(path: str, expected: str) -> None:
    assert parse_coap_uri(f"coap://h{path}").path == expected


# --- hosts -----------------------------------------------------------------------------------


def test_ipv6_host_is_stored_without_brackets_and_printed_with_them() -> None:
    uri = parse_coap_uri("coap://[::1]/a/b?x=1")
    assert uri.host == "::1"
    assert str(uri) == "coap://[::1]:5683/a/b?x=1"
    assert uri.origin == "coap://[::1]:5683"


def test_ipv6_with_port() -> None:
    uri = parse_coap_uri("coaps://[2001:db8::1]:9999/")
    assert (uri.host, uri.port) == ("2001:db8::1", 9999)


def test_ipv6_is_canonicalized() -> None:
    assert parse_coap_uri("coap://[0:0:0:0:0:0:0:1]/") == parse_coap_uri("coap://[::1]/")
    assert parse_coap_uri("coap://[2001:DB8:0::0:1]/").host == "2001:db8::1"


def test_ipv4_host() -> None:
    uri = parse_coap_uri("coap://192.168.1.20/x")
    assert uri.host == "192.168.1.20"
    assert uri.is_ip_literal


def test_is_ip_literal() -> None:
    assert parse_coap_uri("coap://[::1]/").is_ip_literal
    assert parse_coap_uri("coap://127.0.0.1/").is_ip_literal
    assert not parse_coap_uri("coap://localhost/").is_ip_literal
    assert not parse_coap_uri("coap://sensor-1.example/").is_ip_literal


def test_origin() -> None:
    assert parse_coap_uri("COAPS://Example.COM/x?y").origin == "coaps://example.com:5684"


def test_host_names_with_digits_and_hyphens() -> None:
    assert parse_coap_uri("coap://node-7.lan/x").host == "node-7.lan"
    assert parse_coap_uri("coap://1node/x").host == "1node"


def test_coap_uri_is_a_frozen_value() -> None:
    uri = parse_coap_uri("coap://h/x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        uri.host = "other"  # type: ignore[misc]
    assert {uri, parse_coap_uri("coap://H:5683/x")} == {uri}


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, 42, b"coap://h/x", ["coap://h/x"]])
def test_not_a_string(value: object) -> None:
    with pytest.raises(UriError, match="must be a string"):
        parse_coap_uri(value)  # type: ignore[arg-type]


def test_uri_error_is_a_value_error() -> None:
    assert issubclass(UriError, ValueError)


@pytest.mark.parametrize("scheme", ["http", "https", "ws", "coap+tcp", "coap+ws", "mailto"])
def test_unsupported_scheme(scheme: str) -> None:
    with pytest.raises(UriError) as info:
        parse_coap_uri(f"{scheme}://h/x")
    assert str(info.value) == f"unsupported scheme '{scheme}'; use coap:// or coaps://"


def test_unsupported_scheme_is_reported_lower_case() -> None:
    with pytest.raises(UriError, match="unsupported scheme 'http'"):
        parse_coap_uri("HTTP://h/x")


@pytest.mark.parametrize("text", ["", "h/x", "/x", "//h/x", "127.0.0.1:5683/x", "1coap://h/"])
def test_no_scheme(text: str) -> None:
    with pytest.raises(UriError, match=r"no scheme|empty"):
        parse_coap_uri(text)


@pytest.mark.parametrize("text", ["coap:h/x", "coap:/h/x", "coap:"])
def test_missing_authority(text: str) -> None:
    with pytest.raises(UriError, match="missing '//'"):
        parse_coap_uri(text)


@pytest.mark.parametrize("text", ["coap://", "coap:///x", "coap://:5683/x", "coap://?q"])
def test_no_host(text: str) -> None:
    with pytest.raises(UriError, match="no host"):
        parse_coap_uri(text)


@pytest.mark.parametrize(
    ("text", "port_text"),
    [
        ("coap://h:abc/x", "abc"),
        ("coap://h:-1/x", "-1"),
        ("coap://h:+80/x", "+80"),
        ("coap://h:0/x", "0"),
        ("coap://h:65536/x", "65536"),
        ("coap://h:99999999999999999999/x", "99999999999999999999"),
        ("coap://[::1]:x/", "x"),
        ("coap://[::1]:0/", "0"),
    ],
)
def test_bad_port(text: str, port_text: str) -> None:
    with pytest.raises(UriError) as info:
        parse_coap_uri(text)
    assert str(info.value) == f"bad port {port_text!r}: must be a number in 1..65535"


def test_two_ports_look_like_unbracketed_ipv6() -> None:
    with pytest.raises(UriError, match="must be in brackets"):
        parse_coap_uri("coap://h:80:81/x")


def test_port_range_message() -> None:
    with pytest.raises(UriError, match=r"must be a number in 1\.\.65535"):
        parse_coap_uri("coap://h:70000/")


@pytest.mark.parametrize("text", ["coap://h/x#frag", "coap://h/#", "coap://h#x", "coap://h/x?a#b"])
def test_fragment_is_rejected(text: str) -> None:
    with pytest.raises(UriError, match="no fragment"):
        parse_coap_uri(text)


@pytest.mark.parametrize(
    "text",
    [
        " coap://h/x",
        "coap://h/x ",
        "coap://h/a b",
        "coap://h/a\tb",
        "coap://h/a\nb",
        "coap://h/a\x00b",
        "coap://h/a\x7fb",
        "coap://h/a\u00a0b",
        "coap://h/a\u2003b",
        "coap://h /x",
    ],
)
def test_whitespace_and_control_characters(text: str) -> None:
    with pytest.raises(UriError, match="whitespace or a control character"):
        parse_coap_uri(text)


def test_non_ascii_is_rejected() -> None:
    with pytest.raises(UriError, match=r"non-ASCII.*percent-encode"):
        parse_coap_uri("coap://h/caf\u00e9")


def test_too_long() -> None:
    prefix = "coap://h/"
    ok = prefix + "a" * (MAX_URI_LENGTH - len(prefix))
    assert len(str(parse_coap_uri(ok))) > MAX_URI_LENGTH - 10
    with pytest.raises(UriError, match="too long"):
        parse_coap_uri(ok + "a")
    assert MAX_URI_LENGTH == 2048


def test_userinfo_is_rejected() -> None:
    with pytest.raises(UriError, match="userinfo"):
        parse_coap_uri("coap://user@h/x")
    with pytest.raises(UriError, match="userinfo"):
        parse_coap_uri("coap://allowed.example@evil.example/x")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("coap://[::1/x", "unterminated IPv6"),
        ("coap://[]/x", "empty IPv6"),
        ("coap://[::g]/x", "invalid IPv6"),
        ("coap://[1.2.3.4]/x", "invalid IPv6"),
        ("coap://[::1]x/", "after IPv6 literal"),
        ("coap://[fe80::1%25eth0]/x", "zone identifiers"),
        ("coap://[fe80::1%eth0]/x", "zone identifiers"),
        ("coap://[v1.fe]/x", "IPvFuture"),
        ("coap://::1/x", "must be in brackets"),
        ("coap://fe80::1:5683/x", "must be in brackets"),
    ],
)
def test_bad_ipv6(text: str, message: str) -> None:
    with pytest.raises(UriError, match=message):
        parse_coap_uri(text)


@pytest.mark.parametrize(
    "text", ["coap://999.1.1.1/", "coap://127.1/", "coap://010.0.0.1/", "coap://1.2.3.4.5/"]
)
def test_bad_ipv4(text: str) -> None:
    with pytest.raises(UriError, match="invalid IPv4"):
        parse_coap_uri(text)


@pytest.mark.parametrize(
    ("text", "char"),
    [
        ("coap://h!/x", "!"),
        ("coap://a,b/x", ","),
        ("coap://h*/x", "*"),
        ("coap://a[b]/x", "["),
    ],
)
def test_bad_host_character(text: str, char: str) -> None:
    with pytest.raises(UriError, match=f"invalid character '\\{char}' in host"):
        parse_coap_uri(text)


def test_escape_in_host_is_rejected() -> None:
    with pytest.raises(UriError, match="percent-escapes are not allowed in the host"):
        parse_coap_uri("coap://%68/x")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("coap://h/%", "path"),
        ("coap://h/%4", "path"),
        ("coap://h/%zz", "path"),
        ("coap://h/x?%g1", "query"),
    ],
)
def test_bad_percent_escape(text: str, where: str) -> None:
    with pytest.raises(UriError, match=f"bad percent-escape .* in {where}"):
        parse_coap_uri(text)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("coap://h/a<b", "path"),
        ("coap://h/a[0]", "path"),
        ("coap://h/a\\b", "path"),
        ("coap://h/x?a{b}", "query"),
        ("coap://h/x?a|b", "query"),
    ],
)
def test_characters_that_must_be_escaped(text: str, where: str) -> None:
    with pytest.raises(UriError, match=f"in {where}; percent-encode it"):
        parse_coap_uri(text)


def test_allowed_special_characters_in_path_and_query() -> None:
    text = "coap://h/a:b@c!$&'()*+,;=/d?e:f@g/?h!$&'()*+,;="
    assert norm(text) == "coap://h:5683/a:b@c!$&'()*+,;=/d?e:f@g/?h!$&'()*+,;="


# --- property: normalization is idempotent, and only UriError escapes --------------------------

# Path and query pieces that are valid but exercise every normalization rule.
_valid_pieces = st.sampled_from(
    [
        *"aZ0-._~!$&'()*+,;=:@/",
        *("%2E", "%2e", "%7E", "%7e", "%2F", "%2f", "%25", "%c3"),
        *("..", ".", "/../", "/./", "/..", "/.", "//"),
    ]
)
# Pieces that are mostly invalid somewhere, to reach every error path.
_messy_pieces = st.sampled_from([*"/?#%[] \t\x00\u00e9<", "%", "%4", "%zz", "::1", "]:", "@"])
_hosts = st.sampled_from(
    ["h", "Example.COM", "[::1]", "[FE80::0:1]", "127.0.0.1", "", "[", "a:b:c", "10.0.0"]
)
_valid_uris = st.builds(
    lambda scheme, host, port, path, query: f"{scheme}://{host}{port}/{path}{query}",
    st.sampled_from(["coap", "COAPS", "coaps", "CoAP"]),
    st.sampled_from(["h", "Example.COM", "[::1]", "[FE80::0:1]", "127.0.0.1", "n-1.lan"]),
    st.sampled_from(["", ":", ":5683", ":5684", ":00099", ":65535"]),
    st.lists(_valid_pieces, max_size=30).map("".join),
    st.one_of(
        st.just(""),
        st.lists(_valid_pieces | st.just("?"), max_size=10).map(lambda q: "?" + "".join(q)),
    ),
)
_messy_uris = st.builds(
    lambda scheme, host, port, rest: f"{scheme}://{host}{port}{rest}",
    st.sampled_from(["coap", "COAPS", "http", "coap:", ""]),
    _hosts,
    st.sampled_from(["", ":", ":5683", ":0", ":65536", ":x"]),
    st.lists(_valid_pieces | _messy_pieces, max_size=30).map("".join),
)


def _check_idempotent(text: str) -> None:
    try:
        uri = parse_coap_uri(text)
    except UriError:
        return
    again = parse_coap_uri(str(uri))
    assert again == uri
    assert str(again) == str(uri)
    assert uri.path.startswith("/")
    assert uri.scheme in DEFAULT_PORTS


@given(st.text(max_size=200))
@example("coap://h/a/..//../b")
@example("coap://h/%2E%2E%2F")
@example("coap://h/.%2e//.")
def test_arbitrary_text_normalizes_idempotently_or_raises_uri_error(text: str) -> None:
    _check_idempotent(text)


@given(_valid_uris)
def test_valid_uris_parse_and_normalize_idempotently(text: str) -> None:
    parse_coap_uri(text)  # the strategy only builds valid URIs: this must not raise
    _check_idempotent(text)


@given(_messy_uris)
def test_uri_like_text_normalizes_idempotently_or_raises_uri_error(text: str) -> None:
    _check_idempotent(text)
