"""Tests for translator.core.policy: allow patterns and the destination allow decision."""

import dataclasses
import ipaddress

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from translator.core.policy import (
    PatternError,
    Policy,
    compile_pattern,
    globs_intersect,
    pattern_literal_host,
    special_address_kind,
)
from translator.core.uris import UriError, parse_coap_uri


def matches(pattern: str, uri: str) -> bool:
    return compile_pattern(pattern).matches(parse_coap_uri(uri))


# --- compile_pattern: wildcards, component by component --------------------------------------


@pytest.mark.parametrize(
    ("pattern", "uri", "expected"),
    [
        ("coap://127.0.0.1:5683/*", "coap://127.0.0.1:5683/temperature", True),
        ("coap://127.0.0.1:5683/*", "coap://127.0.0.1/a/b/c?x=1", True),
        ("coap://127.0.0.1:5683/*", "coap://127.0.0.1:5683/", True),
        ("coap://127.0.0.1:5683/*", "coap://127.0.0.1:5684/x", False),
        ("coap://127.0.0.1:5683/*", "coaps://127.0.0.1:5683/x", False),
        ("coap://127.0.0.1:5683/*", "coap://127.0.0.10:5683/x", False),
        # A "*" that ends the path matches the rest: segments and query.
        ("coap://h:5683/a*", "coap://h/a/b/c", True),
        ("coap://h:5683/a*", "coap://h/a?q=1", True),
        ("coap://h:5683/a*", "coap://h/b", False),
        # Anywhere else, "*" matches within one segment.
        ("coap://h:5683/*/temp", "coap://h/x/temp", True),
        ("coap://h:5683/*/temp", "coap://h/x/y/temp", False),
        ("coap://h:5683/*/temp", "coap://h/x/temp/", False),
        ("coap://h:5683/*/temp", "coap://h/x/temp?q", False),
        ("coap://h:5683/a*b/c", "coap://h/a/b/c", False),
        # Full match: no implicit prefix or suffix.
        ("coap://h:5683/a", "coap://h/a", True),
        ("coap://h:5683/a", "coap://h/ab", False),
        ("coap://h:5683/a", "coap://h/a?x", False),
        ("coap://h:5683/a", "coap://h/a/", False),
    ],
)
def test_star_in_the_path(pattern: str, uri: str, expected: bool) -> None:
    assert matches(pattern, uri) is expected


@pytest.mark.parametrize(
    ("pattern", "uri", "expected"),
    [
        ("coap://h/x?a=1", "coap://h/x?a=1", True),
        ("coap://h/x?a=1", "coap://h/x", False),
        ("coap://h/x?a=1", "coap://h/x?a=2", False),
        ("coap://h/x?a=*", "coap://h/x?a=2&b=/c", True),
        ("coap://h/x?a=*", "coap://h/y?a=2", False),
        ("coap://h/x?*", "coap://h/x", True),
        ("coap://h/*?rt=*", "coap://h/a/b?rt=temp", True),
        ("coap://h/*?rt=*", "coap://h/a/b?if=x", False),
        # In the path and query "?" is no wildcard: it starts the query, as in a URI.
        ("coap://h/s?", "coap://h/s", True),
        ("coap://h/s?", "coap://h/s1", False),
        ("coap://h/x?a?b", "coap://h/x?a?b", True),
        ("coap://h/x?a?b", "coap://h/x?aXb", False),
    ],
)
def test_query(pattern: str, uri: str, expected: bool) -> None:
    assert matches(pattern, uri) is expected


@pytest.mark.parametrize(
    ("pattern", "uri", "expected"),
    [
        # The reported escapes: text in the path or query never satisfies the host or port.
        ("coap://*:5683/*", "coap://127.0.0.2:47102/:5683/", False),
        ("coap://*:5683/*", "coap://host:47103/x?:5683/", False),
        ("coap://*.example.com:5683/*", "coap://vm:47104/.example.com:5683/", False),
        ("coap://*.example.com:5683/*", "coap://a.example.com/x", True),
        ("coap://*:5683/*", "coap://127.0.0.2/x", True),
        ("coap://h:56?3/*", "coap://h:5683/x", True),
        ("coap://h:56?3/*", "coap://h:56/3/x", False),
        ("coap://h:*/*", "coap://h:1/x", True),
        ("coap://10.0.0.?:5683/*", "coap://10.0.0.7/x", True),
        ("coap://10.0.0.?:5683/*", "coap://10.0.0.70/x", False),
        # Without a port a pattern means the scheme's default port, wildcard host or not.
        ("coap://10.0.0.*/*", "coap://10.0.0.7/x", True),
        ("coap://10.0.0.*/*", "coap://10.0.0.7:5684/x", False),
        ("coap*://h/*", "coaps://h:5684/x", True),
        ("coap*://h/*", "coaps://h:5683/x", False),
    ],
)
def test_a_wildcard_stays_in_its_component(pattern: str, uri: str, expected: bool) -> None:
    assert matches(pattern, uri) is expected


@pytest.mark.parametrize(
    ("pattern", "uri", "expected"),
    [
        # An address pattern matches IP literals of its family only.
        ("coap://10.0.0.*/*", "coap://10.0.0.7.attacker.example/x", False),
        ("coap://10.0.0.7/*", "coap://10.0.0.7/x", True),
        ("coap://10.*/*", "coap://10.example/x", False),
        ("coap://[2001:db8::*]/*", "coap://[2001:db8::7]/x", True),
        ("coap://[*]/*", "coap://[::ffff:127.0.0.3]/x", False),  # that is 127.0.0.3
        ("coap://[*]/*", "coap://127.0.0.3/x", False),
        ("coap://[*]/*", "coap://h/x", False),
        ("coap://127.0.0.3/*", "coap://[::ffff:127.0.0.3]/x", True),
        ("coap://[::ffff:127.0.0.3]/*", "coap://127.0.0.3/x", True),
        # A name pattern matches names only.
        ("coap://*.lan/*", "coap://a.lan/x", True),
        ("coap://s*/*", "coap://sensor/x", True),
        ("coap://s*/*", "coap://[::1]/x", False),
        # Wildcards alone match any host.
        ("coap://*/*", "coap://10.0.0.7/x", True),
        ("coap://*/*", "coap://[::1]/x", True),
        ("coap://*/*", "coap://a.lan/x", True),
    ],
)
def test_the_host_pattern_says_which_hosts_it_can_match(
    pattern: str, uri: str, expected: bool
) -> None:
    assert matches(pattern, uri) is expected


@pytest.mark.parametrize(
    ("pattern", "uri"),
    [
        ("coap://h:5683/a.b", "coap://h/aXb"),
        ("coap://h:5683/a+", "coap://h/aa"),
        ("coap://h:5683/(a|b)", "coap://h/a"),
        ("coap://h:5683/a$", "coap://h/a"),
        ("coap://h:5683/^a", "coap://h/a"),
    ],
)
def test_regex_metacharacters_are_literal(pattern: str, uri: str) -> None:
    assert not matches(pattern, uri)


def test_regex_metacharacters_match_themselves() -> None:
    assert matches("coap://h:5683/a.b+(c)$", "coap://h/a.b+(c)$")


def test_ipv6_hosts_in_brackets() -> None:
    assert matches("coap://[::1]:5683/*", "coap://[::1]/x")
    assert matches("coap://[::1]/*", "coap://[::1]:5683/x")
    assert not matches("coap://[::1]/*", "coap://[::2]/x")
    assert matches("coap://[fe80::*]:5683/*", "coap://[fe80::1]/x")
    with pytest.raises(PatternError):
        compile_pattern("coap://[ab]*")


def test_star_alone_matches_everything() -> None:
    for uri in ["coap://h/", "coaps://[::1]:1/a?b", "coap://x.y/z/../w"]:
        assert matches("*", uri)


def test_runs_of_stars_are_one_star() -> None:
    assert matches("coap://h:5683/a**", "coap://h/a/b")
    assert matches("coap://h:5683/**a**", "coap://h/a")
    assert matches("coap://h:5683/x/a***b", "coap://h/x/ab")


def test_many_stars_on_a_long_segment_do_not_backtrack_catastrophically() -> None:
    # A naive ".*a.*a...b" translation takes effectively forever on this (ReDoS: this test
    # would not finish): the URI is client-controlled, so matching must stay polynomial of
    # low degree.
    pattern = compile_pattern("coap://h:5683/" + "*a" * 20 + "*b/x")
    assert not pattern.matches(parse_coap_uri("coap://h/" + "a" * 2000 + "/x"))
    assert pattern.matches(parse_coap_uri("coap://h/" + "a" * 2000 + "b/x"))
    host = compile_pattern("coap://" + "*a" * 20 + "*b.lan/*")
    assert not host.matches(parse_coap_uri("coap://" + "a" * 60 + ".lan/x"))


def _reference_match(pattern: str, text: str) -> bool:
    """Textbook dynamic-programming wildcard match, to check the regex translation against."""
    # reachable[j]: the pattern prefix consumed so far can match text[:j].
    reachable = [True] + [False] * len(text)
    for char in pattern:
        if char == "*":
            for j in range(1, len(text) + 1):
                reachable[j] = reachable[j] or reachable[j - 1]
        else:
            reachable = [False] + [
                reachable[j] and (char == "?" or char == text[j]) for j in range(len(text))
            ]
    return reachable[-1]


@given(
    st.text(alphabet="ab*?", max_size=12),
    st.text(alphabet="ab", max_size=12),
)
@example("*a*b", "aab")
@example("*a?*", "ab")
@example("a*?*b", "ab")
def test_host_wildcards_match_like_a_reference_matcher(glob: str, host: str) -> None:
    if not host:
        return
    pattern = compile_pattern(f"coap://{glob or 'x'}.lan/*")
    expected = _reference_match(glob or "x", host)
    assert pattern.matches(parse_coap_uri(f"coap://{host}.lan/x")) is expected


@given(
    st.text(alphabet="ab*", max_size=12).filter(lambda g: not g.endswith("*")),
    st.text(alphabet="ab", max_size=12),
)
@example("*a*b", "aab")
@example("a*a", "a")
def test_segment_wildcards_match_like_a_reference_matcher(glob: str, segment: str) -> None:
    pattern = compile_pattern(f"coap://h/x/{glob}/y")
    expected = _reference_match(glob, segment)
    assert pattern.matches(parse_coap_uri(f"coap://h/x/{segment}/y")) is expected


@given(st.text(alphabet="ab*?", max_size=8), st.text(alphabet="ab*?", max_size=8),
       st.text(alphabet="ab", max_size=8))
def test_globs_intersect_is_sound(first: str, second: str, text: str) -> None:
    # Any text both match is a witness: the two must then intersect.
    if _reference_match(first, text) and _reference_match(second, text):
        assert globs_intersect(first, second)


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("*", "", True),
        ("a*", "*b", True),
        ("a*", "b*", False),
        ("*.lan", "x.*", True),
        ("10.0.0.?", "10.0.0.12", False),
        ("10.0.0.*", "10.0.1.*", False),
        ("?", "", False),
        ("a?c", "*b*", True),
    ],
)
def test_globs_intersect(first: str, second: str, expected: bool) -> None:
    assert globs_intersect(first, second) is expected
    assert globs_intersect(second, first) is expected


# --- compile_pattern: normalization of literal components -------------------------------------


@pytest.mark.parametrize(
    ("pattern", "uri"),
    [
        ("coap://LOCALHOST/x*", "coap://localhost:5683/x1"),
        ("COAP://localhost/x*", "coap://localhost:5683/x1"),
        ("coap://localhost:5683/x*", "coap://LOCALHOST/x1"),
        ("coaps://h/*", "coaps://h:5684/x"),
        ("coap://[0:0::1]/*", "coap://[::1]:5683/x"),
        ("coap://[::1]:/*", "coap://[::1]:5683/x"),
        ("coap://h:05683/*", "coap://h/x"),
        ("coap://H*/*", "coap://h/x"),
        ("COAP://*/*", "coap://h/x"),
        ("coap://*.LAN/*", "coap://a.lan/x"),
    ],
)
def test_patterns_are_normalized_like_uris(pattern: str, uri: str) -> None:
    assert matches(pattern, uri)


def test_origin_only_pattern_means_the_root() -> None:
    assert matches("coap://h", "coap://h/")
    assert not matches("coap://h", "coap://h/x")


def test_escapes_in_the_path_are_normalized() -> None:
    assert matches("coap://h/%7euser/*", "coap://h/~user/x")
    assert matches("coap://h/a%2fb", "coap://h/a%2Fb")
    assert not matches("coap://h/a/b", "coap://h/a%2Fb")


def test_wildcard_in_scheme() -> None:
    assert matches("coap*://h:*/*", "coaps://h/x")
    assert matches("coap*://h:*/*", "coap://h/x")
    assert matches("coa?://h:*/*", "coap://h/x")
    assert not matches("coa?://h:*/*", "coaps://h/x")


# --- compile_pattern: errors -----------------------------------------------------------------


def test_pattern_error_is_a_value_error() -> None:
    assert issubclass(PatternError, ValueError)


def test_empty_pattern() -> None:
    with pytest.raises(PatternError, match="empty pattern"):
        compile_pattern("")


def test_non_string_pattern() -> None:
    with pytest.raises(PatternError, match="must be a string"):
        compile_pattern(None)  # type: ignore[arg-type]


@pytest.mark.parametrize("pattern", ["coap://h/a b", " *", "coap://h/\t", "coap://h/caf\u00e9"])
def test_whitespace_control_and_non_ascii(pattern: str) -> None:
    with pytest.raises(PatternError, match="whitespace"):
        compile_pattern(pattern)


def test_fragment() -> None:
    with pytest.raises(PatternError, match="fragment"):
        compile_pattern("coap://h/x#y")


@pytest.mark.parametrize("pattern", ["localhost/*", "127.0.0.1:5683/*", "/x", "coap:/h/*"])
def test_pattern_that_can_never_match(pattern: str) -> None:
    with pytest.raises(PatternError, match="can never match"):
        compile_pattern(pattern)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("http://h/*", "unsupported scheme 'http'"),
        ("coap://h:0/*", "bad port"),
        ("coap://h:99999/*", "bad port"),
        ("coap://:5683/*", "no host"),
        ("coap://[::g]/*", "invalid IPv6"),
        ("coap://[fe80::1%25eth0]/*", "zone identifiers"),
        ("coap://u@h/*", "userinfo"),
    ],
)
def test_bad_literal_origin(pattern: str, message: str) -> None:
    with pytest.raises(PatternError, match=message) as info:
        compile_pattern(pattern)
    assert repr(pattern) in str(info.value)


@pytest.mark.parametrize("pattern", ["coap://h/100%", "coap://h/%zz", "coap://h/%4"])
def test_bad_percent_escape(pattern: str) -> None:
    with pytest.raises(PatternError, match="bad percent-escape"):
        compile_pattern(pattern)


# --- Policy ----------------------------------------------------------------------------------


def test_deny_by_default() -> None:
    policy = Policy()
    assert not policy.allows("coap://127.0.0.1/x")
    assert not policy.allows("coap://[::1]/")
    assert not policy.allows_everything


def test_allow_patterns() -> None:
    policy = Policy(allow=("coap://127.0.0.1:5683/*", "coaps://[::1]/secure/*"))
    assert policy.allows("coap://127.0.0.1/temperature")
    assert policy.allows("coaps://[::1]:5684/secure/door")
    assert not policy.allows("coap://127.0.0.2/temperature")
    assert not policy.allows("coaps://[::1]/other")


def test_allows_accepts_parsed_and_unparsed_uris() -> None:
    policy = Policy(allow=("coap://h/x",))
    assert policy.allows("coap://H:5683/x")
    assert policy.allows(parse_coap_uri("coap://h/x"))


def test_spelling_tricks_do_not_evade_or_defeat_rules() -> None:
    policy = Policy(allow=("coap://h/public/*",))
    assert policy.allows("coap://H:5683/public/%7Ex")
    assert policy.allows("coap://h/%70ublic/x")  # %70 is "p"
    assert not policy.allows("coap://h/public/../private/x")
    assert not policy.allows("coap://h/public/%2E%2E/private/x")


def test_unparsable_uri_propagates_uri_error() -> None:
    policy = Policy(allow=("*",))
    with pytest.raises(UriError):
        policy.allows("http://h/x")
    with pytest.raises(UriError):
        policy.allows("coap://h/x#frag")


def test_sensor_uris_are_always_allowed() -> None:
    policy = Policy(sensor_uris=frozenset({"coap://127.0.0.1:5683/temperature"}))
    assert policy.allows("coap://127.0.0.1/temperature")
    assert not policy.allows("coap://127.0.0.1/temperature/")
    assert not policy.allows("coap://127.0.0.1/temperature?x")
    assert not policy.allows("coap://127.0.0.1/humidity")


def test_sensor_uris_are_normalized_on_construction() -> None:
    policy = Policy(sensor_uris=frozenset({"COAP://Sensor.LAN/t"}))
    assert policy.sensor_uris == frozenset({"coap://sensor.lan:5683/t"})
    assert policy.allows("coap://sensor.lan:5683/t")


def test_bad_sensor_uri_raises_uri_error() -> None:
    with pytest.raises(UriError):
        Policy(sensor_uris=frozenset({"http://h/x"}))


def test_sensor_uris_and_patterns_combine() -> None:
    policy = Policy(allow=("coap://a/*",), sensor_uris=frozenset({"coap://b/t"}))
    assert policy.allows("coap://a/anything")
    assert policy.allows("coap://b/t")
    assert not policy.allows("coap://b/other")


def test_allows_everything() -> None:
    assert Policy(allow=("*",)).allows_everything
    assert Policy(allow=("coap://a/*", "*")).allows_everything
    assert not Policy(allow=("coap://*",)).allows_everything
    with pytest.raises(PatternError, match="can never match"):
        Policy(allow=("**",))
    everything = Policy(allow=("*",))
    assert everything.allows("coaps://anything.example:1/x?y")


def test_bad_pattern_raises_at_construction() -> None:
    with pytest.raises(PatternError, match="empty pattern"):
        Policy(allow=("coap://a/*", ""))
    with pytest.raises(PatternError, match="unsupported scheme"):
        Policy(allow=("http://a/*",))


def test_bare_string_allow_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="not a string"):
        Policy(allow="coap://a/*")  # type: ignore[arg-type]


def test_list_allow_is_stored_as_a_tuple() -> None:
    policy = Policy(allow=["coap://a/*"])  # type: ignore[arg-type]
    assert policy.allow == ("coap://a/*",)
    assert policy.allows("coap://a/x")


def test_policy_is_a_frozen_hashable_value() -> None:
    one = Policy(allow=("coap://a/*",), sensor_uris=frozenset({"coap://b/t"}))
    two = Policy(allow=("coap://a/*",), sensor_uris=frozenset({"coap://B:5683/t"}))
    assert one == two
    assert hash(one) == hash(two)
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.allow = ()  # type: ignore[misc]
    assert "_patterns" not in repr(one)


# --- special destinations: multicast, broadcast, unspecified (issue 4 §3) ---------------------

SPECIAL_URIS = [
    ("coap://224.0.1.187/x", "multicast"),
    ("coap://239.255.255.250:5683/x", "multicast"),
    ("coap://[ff02::fd]/x", "multicast"),
    ("coap://[ff05::fd]:5683/x", "multicast"),
    ("coap://255.255.255.255/x", "broadcast"),
    ("coap://0.0.0.0/x", "unspecified"),
    ("coap://[::]/x", "unspecified"),
    ("coap://[::ffff:224.0.1.187]/x", "multicast"),
    ("coap://[::ffff:255.255.255.255]/x", "broadcast"),
    ("coap://[::ffff:0.0.0.0]/x", "unspecified"),
    ("coap://[64:ff9b::e000:1bb]/x", "multicast"),
]


@pytest.mark.parametrize(("uri", "kind"), SPECIAL_URIS)
@pytest.mark.parametrize("pattern", ["*", "coap://*/*", "coap://*:*/*", "coap*://*/*"])
def test_wildcard_host_patterns_never_allow_special_destinations(
    pattern: str, uri: str, kind: str
) -> None:
    policy = Policy(allow=(pattern,))
    assert matches(pattern, uri)
    assert not policy.allows(uri)
    decision = policy.decide(uri)
    assert not decision.allowed
    assert not decision.needs_resolution
    assert kind.split()[0] in decision.reason


@pytest.mark.parametrize(("uri", "kind"), SPECIAL_URIS)
def test_a_pattern_naming_the_literal_host_allows_a_special_destination(
    uri: str, kind: str
) -> None:
    target = parse_coap_uri(uri)
    pattern = f"{target.origin}/*"
    policy = Policy(allow=(pattern,))
    assert policy.allows(uri), pattern
    assert policy.decide(uri) == policy.decide(target)
    assert policy.decide(uri).reason == ""


@pytest.mark.parametrize("uri", ["coap://[ff02::fd]/x", "coap://[::]/x", "coap://[64:ff9b::e000:1]/"])
def test_a_wildcard_inside_brackets_is_a_wildcard_host(uri: str) -> None:
    assert matches("coap://[*]:5683/*", uri)
    assert not Policy(allow=("coap://[*]:5683/*",)).allows(uri)
    assert Policy(allow=("coap://[*]:5683/*",)).allows("coap://[2001:db8::1]/x")


def test_ipv6_multicast_group_pattern_allows_exactly_that_group() -> None:
    policy = Policy(allow=("coap://[ff02::fd]:5683/*",))
    assert policy.allows("coap://[ff02::fd]/.well-known/core")
    assert policy.allows("coap://[FF02:0:0::FD]:5683/x")  # another spelling, same group
    assert not policy.allows("coap://[ff02::fe]:5683/x")  # another group
    assert not policy.allows("coap://[ff02::fd]:5684/x")  # another port
    # The brackets are literal, not a character class.
    assert not policy.allows("coap://f/x")
    assert not policy.allows("coap://[::f]/x")


def test_wildcard_in_the_port_keeps_the_host_literal() -> None:
    policy = Policy(allow=("coap://[ff02::fd]:*/*",))
    assert policy.allows("coap://[ff02::fd]:5683/x")
    assert policy.allows("coap://[ff02::fd]:61616/x")
    assert not policy.allows("coap://[ff02::fe]:5683/x")


def test_wildcard_in_the_ipv4_host_refuses_the_multicast_it_matches() -> None:
    policy = Policy(allow=("coap://224.0.1.*/*", "coap://10.0.0.*/*"))
    assert not policy.allows("coap://224.0.1.187/x")
    assert policy.allows("coap://10.0.0.7/x")


def test_a_wildcard_in_the_scheme_stays_in_the_scheme() -> None:
    # When patterns were matched against the whole URI, the "*" of the scheme ran on past
    # "://224.0.0.2:5683/?coaps" and this pattern matched a URI for the group 224.0.0.2.
    pattern = "coap*://224.0.0.1:5683/*"
    assert not matches(pattern, "coap://224.0.0.2:5683/?coaps://224.0.0.1:5683/")
    assert not Policy(allow=(pattern,)).allows("coap://224.0.0.2:5683/x")
    assert Policy(allow=(pattern,)).allows("coap://224.0.0.1:5683/x")


def test_one_literal_pattern_among_wildcard_ones_is_enough() -> None:
    policy = Policy(allow=("*", "coap://224.0.1.187:5683/*", "coap://*/*"))
    assert policy.allows("coap://224.0.1.187/x")
    assert not policy.allows("coap://224.0.1.188/x")
    assert policy.allows("coap://unicast.example/x")


def test_a_configured_sensor_names_its_host_literally() -> None:
    policy = Policy(sensor_uris=frozenset({"coap://[ff02::fd]/all", "coap://255.255.255.255/b"}))
    assert policy.allows("coap://[ff02::fd]:5683/all")
    assert policy.allows("coap://255.255.255.255/b")
    assert not policy.allows("coap://[ff02::fd]/other")


def test_a_literal_host_name_pattern_does_not_allow_a_special_ip_literal() -> None:
    # "coap://group.lan/*" names a host name, not 224.0.1.187.
    policy = Policy(allow=("coap://group.lan/*", "coap://*:5683/*"))
    assert not policy.allows("coap://224.0.1.187/x")


@pytest.mark.parametrize(
    "uri",
    [
        "coap://255.255.255.254/x",
        "coap://223.255.255.255/x",
        "coap://240.0.0.1/x",
        "coap://0.0.0.1/x",
        "coap://[::1]/x",
        "coap://[fe80::1]/x",
        "coap://[::ffff:10.0.0.1]/x",
        "coap://192.168.1.255/x",  # subnet-directed broadcast: out of scope (needs netmasks)
    ],
)
def test_ordinary_addresses_are_not_special(uri: str) -> None:
    assert Policy(allow=("*",)).allows(uri)


def test_decision_for_names_and_ip_literals() -> None:
    policy = Policy(allow=("coap://*:5683/*",))
    by_name = policy.decide("coap://Sensor.LAN/x")
    assert by_name.allowed and by_name.needs_resolution
    assert str(by_name.uri) == "coap://sensor.lan:5683/x"
    assert by_name.reason == ""
    by_ip = policy.decide("coap://10.0.0.1/x")
    assert by_ip.allowed and not by_ip.needs_resolution
    refused = policy.decide("coap://10.0.0.1:1/x")
    assert not refused.allowed and not refused.needs_resolution
    assert refused.reason.startswith("coap://10.0.0.1:1/x is not allowed by the gateway's policy")
    assert "'coap://10.0.0.1:1/*' to [policy] allow (or --allow)" in refused.reason
    multicast = policy.decide("coap://224.0.1.187/x")
    assert multicast.reason.startswith("coap://224.0.1.187:5683/x is a multicast destination")
    assert "broadcast address" in policy.decide("coap://255.255.255.255/x").reason
    assert "an unspecified address" in policy.decide("coap://[::]/x").reason


def test_decide_propagates_uri_errors() -> None:
    with pytest.raises(UriError):
        Policy(allow=("*",)).decide("http://h/x")


def test_allows_keeps_its_answer_for_ordinary_destinations() -> None:
    policy = Policy(allow=("coap://*:5683/*",), sensor_uris=frozenset({"coap://s/t"}))
    for uri in ["coap://h/x", "coap://10.0.0.1/x", "coap://[2001:db8::1]/x", "coap://s/t"]:
        assert policy.allows(uri) is policy.decide(uri).allowed is True
    assert not policy.allows("coap://h:1/x")


# --- resolved addresses ----------------------------------------------------------------------


def test_a_name_resolving_to_unicast_addresses_is_allowed() -> None:
    policy = Policy(allow=("coap://*.lan:5683/*",))
    assert policy.allows_addresses("coap://s.lan/x", ["10.0.0.7"])
    assert policy.allows_addresses("coap://s.lan/x", [ipaddress.ip_address("2001:db8::7")])
    assert policy.allows_addresses("coap://s.lan/x", ["fe80::7%lo", "10.0.0.7"])


@pytest.mark.parametrize(
    "address",
    [
        "224.0.0.1",
        "ff02::1",
        "ff02::1%lo",
        "255.255.255.255",
        "0.0.0.0",
        "::",
        "::ffff:224.0.0.1",
        "::ffff:255.255.255.255",
        "::ffff:0.0.0.0",
        "64:ff9b::ffff:ffff",
    ],
)
def test_a_name_resolving_to_a_special_address_is_refused(address: str) -> None:
    # Even a pattern naming the host exactly: it names the host name, not the address.
    policy = Policy(allow=("coap://group.lan:5683/*", "coap://*/*"))
    assert policy.decide("coap://group.lan/x").allowed
    assert not policy.allows_addresses("coap://group.lan/x", [address])
    assert not policy.allows_addresses("coap://group.lan/x", ["10.0.0.1", address])
    assert not policy.allows_addresses("coap://other.lan/x", [ipaddress.ip_address(
        address.partition("%")[0])])


def test_allows_addresses_for_an_ip_literal() -> None:
    policy = Policy(allow=("coap://[ff02::fd]:5683/*", "coap://*:5683/*"))
    assert policy.allows_addresses("coap://[ff02::fd]/x", ["ff02::fd"])
    assert policy.allows_addresses("coap://[ff02::fd]/x", ["ff02::fd%eth0"])
    assert not policy.allows_addresses("coap://[ff02::fd]/x", ["ff02::fe"])
    assert policy.allows_addresses("coap://10.0.0.1/x", ["10.0.0.1", "::ffff:10.0.0.1"])
    literal_v4 = Policy(allow=("coap://224.0.1.187/*",))
    assert literal_v4.allows_addresses("coap://224.0.1.187/x", ["::ffff:224.0.1.187"])


def test_allows_addresses_fails_closed() -> None:
    policy = Policy(allow=("coap://*:5683/*",))
    assert not policy.allows_addresses("coap://h/x", [])
    assert not policy.allows_addresses("coap://h/x", iter([]))
    assert not policy.allows_addresses("coap://h/x", ["not an address"])
    assert not policy.allows_addresses("coap://h/x", ["10.0.0.1", "h"])
    # A URI the policy refuses stays refused whatever it resolves to.
    assert not policy.allows_addresses("coap://h:1/x", ["10.0.0.1"])
    with pytest.raises(UriError):
        policy.allows_addresses("coap://h/x#f", ["10.0.0.1"])


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("224.0.0.0", "multicast"),
        ("239.255.255.255", "multicast"),
        ("ff00::", "multicast"),
        ("ff0e::1%2", "multicast"),
        ("255.255.255.255", "broadcast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("::ffff:239.1.2.3", "multicast"),
        ("64:ff9b::e000:1", "multicast"),
        ("64:ff9b::ffff:ffff", "broadcast"),
        ("223.255.255.255", None),
        ("240.0.0.0", None),
        ("127.0.0.1", None),
        ("::1", None),
        ("fe80::1", None),
        ("64:ff9b::a00:1", None),
        ("localhost", None),
        ("", None),
    ],
)
def test_special_address_kind(address: str, kind: str | None) -> None:
    assert special_address_kind(address) == kind
    if address and kind is not None:
        assert special_address_kind(ipaddress.ip_address(address)) == kind


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_every_ipv4_literal_is_allowed_by_star_exactly_when_not_special(number: int) -> None:
    address = ipaddress.IPv4Address(number)
    uri = f"coap://{address}/x"
    assert Policy(allow=("*",)).allows(uri) is (special_address_kind(address) is None)
    assert Policy(allow=(f"coap://{address}/*",)).allows(uri)


@pytest.mark.parametrize(
    ("pattern", "host"),
    [
        ("coap://[ff02::fd]:5683/*", "ff02::fd"),
        ("coap://[FF02:0::FD]/*", "ff02::fd"),
        ("coap://[ff02::fd]:*/*", "ff02::fd"),
        ("coap://224.0.1.187/*", "224.0.1.187"),
        ("coap://224.0.1.187:*", "224.0.1.187"),
        ("coaps://Group.LAN/*", "group.lan"),
        ("COAP://h", "h"),
        ("coap://h/x*", "h"),
        ("*", None),
        ("coap://*", None),
        ("coap://*/*", None),
        ("coap://*:5683/*", None),
        ("coap://224.0.1.*/*", None),
        ("coap://224.0.1.18?/*", None),
        ("coap://224.0.1.187*", None),
        ("coap*://224.0.1.187/*", "224.0.1.187"),
        ("coa?://224.0.1.187/*", "224.0.1.187"),
        ("coap://[::ffff:224.0.1.187]/*", "224.0.1.187"),
        ("coap://[ff02::*]:5683/*", None),
    ],
)
def test_pattern_literal_host(pattern: str, host: str | None) -> None:
    assert pattern_literal_host(pattern) == host


def test_pattern_literal_host_rejects_bad_patterns() -> None:
    with pytest.raises(PatternError):
        pattern_literal_host("")
    with pytest.raises(PatternError):
        pattern_literal_host("http://h/*")
