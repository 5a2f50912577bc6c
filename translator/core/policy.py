"""The destination allow decision: may a client make the gateway talk to this CoAP URI?

This module owns the answer to that one question, and the allow patterns it is written in
(also used by tokens' ``allow`` lists and, for the origin part, by ``[[credentials]]``).
The gateway is an open relay unless told otherwise, so the default is deny: a destination is
allowed only if it is one of the configured sensors or matches an allow pattern. URIs are
compared in the normalized form of :mod:`translator.core.uris`, so a different spelling of a URI
(upper case host, omitted default port, escaped unreserved characters, an IPv4-mapped IPv6
literal) neither evades nor defeats a rule.

Patterns. ``*`` alone allows everything (development only). Any other pattern is
``scheme://host[:port][/path][?query]``, and each component is matched on its own: a
wildcard never crosses from one component into the next, so text that a client puts in the
path or query can never satisfy the host or port part of a pattern.

- **scheme**: ``coap``, ``coaps``, or a wildcard over them (``coap*`` is both).
- **host**: ``*`` and ``?`` match within the host only. What the host is written as decides
  what it can match:

  - a name (``sensor.lan``, ``*.example.com``): host names only, never an IP literal;
  - an IPv4 address, literal or with wildcards (``10.0.0.7``, ``10.0.0.*``): IPv4
    literals only, never a name (``coap://10.0.0.*/*`` does not match
    ``coap://10.0.0.7.attacker.example/``, which resolves anywhere);
  - an IPv6 address in brackets (``[2001:db8::1]``, ``[2001:db8::*]``): IPv6 literals
    only, matched in their compressed form. An IPv4-mapped literal (``[::ffff:10.0.0.7]``)
    is the IPv4 host it stands for, so ``[*]`` never reaches an IPv4 host;
  - wildcards alone (``*``): any host, names and literals.

- **port**: a number, or ``*`` / ``?`` wildcards over its digits (``:*`` is any port).
  Without a port the pattern means the scheme's default port (5683, 5684), as a URI does.
- **path**: segments separated by ``/``; ``*`` matches within one segment
  (``/*/temp`` matches ``/a/temp``, not ``/a/b/temp``), except a ``*`` that ends the path,
  which matches the rest of the URI: any further segments and any query
  (``/sensors/*`` covers everything below ``/sensors/``). Without a path the pattern means
  the root, ``/``. In the path ``?`` starts the query, as in a URI; it is no wildcard.
- **query**: optional. Without one, the URI must have no query (unless the path ends with
  ``*``). With one (``/.well-known/core?rt=*``), it is matched against the URI's query on
  its own, ``*`` matching any run of characters in it.

Examples: ``coap://*:5683/*`` is port 5683 on any host, and does not match
``coap://10.0.0.9:47102/:5683/``; ``coap://*.example.com:5683/*`` does not match
``coap://vm:47104/.example.com:5683/``; ``coap://10.0.0.*/*`` (port 5683) does not match
``coap://10.0.0.7:5684/x`` nor a host name; ``coap://[*]:5683/*`` does not match
``coap://[::ffff:127.0.0.3]:5683/x``.

Special destinations. Multicast (``224.0.0.0/4``, ``ff00::/8``), the limited broadcast
address ``255.255.255.255`` and the unspecified addresses (``0.0.0.0``, ``::``) turn one
client request into traffic to many devices (an amplifier, RFC 7252 §11.3) or to this host.
They are refused unless a rule that allows the URI *names that literal host*: a configured
sensor URI, or a pattern whose host has no wildcard (``coap://[ff02::fd]:5683/*`` allows
exactly that group; ``coap://*`` and ``*`` never allow a special destination). NAT64
(``64:ff9b::e000:1``) IPv6 addresses count as the IPv4 address they embed.
Subnet-directed broadcast (``192.168.1.255`` on a /24) is out of scope: telling it apart
from a unicast address needs the netmasks of the gateway's interfaces, which a pure policy
does not know; don't write patterns that cover such addresses.

The decision has two steps, and this module stays pure (it never resolves names):

1. :meth:`Policy.decide` checks the URI itself. Its :class:`Decision` says whether the URI
   is allowed and whether its host is a *name* that the caller must resolve.
2. The caller resolves the name (``getaddrinfo``) and passes the addresses to
   :meth:`Policy.allows_addresses`, which applies the special-destination rule to each of
   them, and the *address patterns* that apply to the URI: when the policy has patterns
   whose host is an IP address (literal or with wildcards) and whose other components match
   the URI, every resolved address must match the host of one of them. A name never names a
   special address literally, so a name that resolves to a multicast, broadcast or
   unspecified address is always refused: to reach a multicast group, write its address in
   the pattern.

:meth:`Policy.allows` is step 1 alone, for callers that do not resolve.
"""

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from translator.core.uris import (
    DEFAULT_PORTS,
    CoapUri,
    UriError,
    host_name_problem,
    normalize_escapes,
    parse_coap_uri,
)

__all__ = [
    "Decision",
    "IPAddress",
    "PatternError",
    "Policy",
    "SpecialKind",
    "UriPattern",
    "compile_pattern",
    "globs_intersect",
    "pattern_literal_host",
    "special_address_kind",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SpecialKind = Literal["multicast", "broadcast", "unspecified"]
HostKind = Literal["name", "ipv4", "ipv6"]

_WILDCARDS: Final = "*?"
_LIMITED_BROADCAST: Final = ipaddress.IPv4Address("255.255.255.255")
# RFC 6052 well-known NAT64 prefix: 64:ff9b::a.b.c.d reaches the IPv4 address a.b.c.d.
_NAT64_PREFIX: Final = ipaddress.IPv6Network("64:ff9b::/96")
_KIND_PHRASES: Final[dict[str, str]] = {
    "multicast": "a multicast destination",
    "broadcast": "the broadcast address",
    "unspecified": "an unspecified address",
}
_SCHEME_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz*?")
_PORT_CHARS: Final = frozenset("0123456789*?")
_IPV4_GLOB_CHARS: Final = frozenset("0123456789.*?")
_IPV6_GLOB_CHARS: Final = frozenset("0123456789abcdef:.*?")
_NAME_GLOB_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.*?")
# A "%" that starts no escape is an error in the path and query, as it is in a URI.
_BAD_ESCAPE_RE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")


class PatternError(ValueError):
    """An allow pattern that is empty, malformed, or could never match a CoAP URI."""


def _glob_regex(glob: str, *, question_mark: bool = True) -> re.Pattern[str]:
    """A wildcard pattern over one component as a regex for ``fullmatch``.

    ``*`` is any run of characters of that component and ``?`` (when `question_mark`) any
    one; everything else is literal. The component comes from a client, so the translation
    must not backtrack catastrophically (a naive ``.*a.*a.*b`` lets one request pin a CPU:
    ReDoS). As CPython's ``fnmatch`` does, the literal chunk after each interior ``*`` is
    matched at its leftmost occurrence inside an atomic group (leftmost is always a safe
    choice when ``*`` matches any string, and atomicity forbids retrying others), and only
    the last ``*`` may backtrack, over a single run.
    """
    def chunk(text: str) -> str:
        return "".join(
            "." if char == "?" and question_mark else re.escape(char) for char in text
        )

    chunks = [chunk(part) for part in glob.split("*")]
    if len(chunks) == 1:
        return re.compile(chunks[0], re.DOTALL)
    first, *middle, last = chunks
    # Runs of "*" leave empty middle chunks: they add nothing, so they are skipped.
    interior = "".join(f"(?>.*?{part})" for part in middle if part)
    return re.compile(f"{first}{interior}.*{last}", re.DOTALL)


def globs_intersect(first: str, second: str) -> bool:
    """Whether some text matches both wildcard patterns (``*`` any run, ``?`` any one
    character, everything else literal): a walk over pairs of positions, at most
    ``len(first) * len(second)`` of them."""
    seen: set[tuple[int, int]] = set()
    todo = [(0, 0)]
    while todo:
        i, j = todo.pop()
        if (i, j) in seen:
            continue
        seen.add((i, j))
        a = first[i] if i < len(first) else None
        b = second[j] if j < len(second) else None
        if a is None and b is None:
            return True
        if a == "*":
            todo.append((i + 1, j))  # the star matches nothing more
        if b == "*":
            todo.append((i, j + 1))
        if a is None or b is None:
            continue
        # Both take one character: a star stays where it is, anything else moves on.
        if a in _WILDCARDS or b in _WILDCARDS or a == b:
            step = (i if a == "*" else i + 1, j if b == "*" else j + 1)
            if step != (i, j):
                todo.append(step)
    return False


def host_kind(host: str) -> HostKind:
    """What a normalized URI host is: an IPv6 literal, an IPv4 literal or a name."""
    if ":" in host:
        return "ipv6"
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return "name"
    return "ipv4"


@dataclass(frozen=True, slots=True)
class _Host:
    """The host part of a pattern: which kind of host it matches, and how."""

    kind: HostKind | None
    """The kind of URI host it can match; None for a host of wildcards alone (any kind)."""
    glob: str
    """The host as a wildcard pattern, normalized (a literal is spelled like URI hosts)."""
    regex: re.Pattern[str]

    @property
    def literal(self) -> str | None:
        return None if any(c in _WILDCARDS for c in self.glob) else self.glob

    def matches(self, host: str, kind: HostKind) -> bool:
        if self.kind is not None and kind != self.kind:
            return False
        return self.regex.fullmatch(host) is not None

    def overlaps(self, other: "_Host") -> bool:
        if self.kind is not None and other.kind is not None and self.kind != other.kind:
            return False
        return globs_intersect(self.glob, other.glob)


@dataclass(frozen=True, slots=True)
class UriPattern:
    """One compiled allow pattern (see the module docstring for the syntax)."""

    text: str
    """The pattern as written."""
    everything: bool
    """The pattern ``*``: every URI."""
    schemes: frozenset[str]
    """The URI schemes it matches (``coap``, ``coaps``)."""
    host: _Host | None
    port: str | None
    """The port as a wildcard pattern; None for the scheme's default port."""
    segments: tuple[re.Pattern[str], ...]
    """One regex per path segment."""
    rest: bool
    """The path ends with ``*``: its last segment may be followed by anything."""
    query: re.Pattern[str] | None
    """The query's regex; None when the pattern has no query part."""

    @property
    def literal_host(self) -> str | None:
        """The host it names without wildcards (as URIs spell it), or None."""
        return None if self.host is None else self.host.literal

    @property
    def is_address_pattern(self) -> bool:
        """Its host is an IP address, literal or with wildcards."""
        return self.host is not None and self.host.kind in ("ipv4", "ipv6")

    def matches(self, uri: CoapUri) -> bool:
        """Whether the normalized `uri` matches, component by component."""
        if self.everything:
            return True
        return (
            self.matches_origin(uri.scheme, uri.host, uri.port)
            and self._matches_target(uri.path, uri.query)
        )

    def matches_origin(self, scheme: str, host: str, port: int) -> bool:
        """Whether scheme, host and port match (path and query are not looked at)."""
        if self.everything:
            return True
        assert self.host is not None
        return (
            scheme in self.schemes
            and self.host.matches(host, host_kind(host))
            and self._port_regex(scheme).fullmatch(str(port)) is not None
        )

    def matches_all_but_host(self, uri: CoapUri) -> bool:
        """Whether every component but the host matches `uri`."""
        return (
            uri.scheme in self.schemes
            and self._port_regex(uri.scheme).fullmatch(str(uri.port)) is not None
            and self._matches_target(uri.path, uri.query)
        )

    def overlaps_origin(self, other: "UriPattern") -> bool:
        """Whether some origin (scheme, host, port) matches both patterns."""
        if self.everything or other.everything:
            return True
        assert self.host is not None and other.host is not None
        for scheme in self.schemes & other.schemes:
            default = str(DEFAULT_PORTS[scheme])
            if self.host.overlaps(other.host) and globs_intersect(
                self.port or default, other.port or default
            ):
                return True
        return False

    def _port_regex(self, scheme: str) -> re.Pattern[str]:
        return _glob_regex(self.port or str(DEFAULT_PORTS[scheme]))

    def _matches_target(self, path: str, query: str) -> bool:
        segments = path[1:].split("/")  # a normalized path starts with "/"
        count = len(self.segments)
        if len(segments) < count or (not self.rest and len(segments) != count):
            return False
        for regex, segment in zip(self.segments, segments, strict=False):
            if regex.fullmatch(segment) is None:
                return False
        if self.query is None:
            return self.rest or not query
        return self.query.fullmatch(query) is not None


def compile_pattern(pattern: str) -> UriPattern:
    """Parse and compile an allow pattern; :class:`PatternError` says what is wrong."""
    if not isinstance(pattern, str):
        raise PatternError(f"pattern must be a string, not {type(pattern).__name__}")
    if not pattern:
        raise PatternError("empty pattern (use '*' to allow everything)")
    for char in pattern:
        # Normalized URIs never contain these, so a pattern with them is a typo that would
        # silently deny; better to say so at startup.
        if ord(char) < 0x21 or char == "\x7f" or char.isspace() or not char.isascii():
            raise PatternError(
                f"pattern {pattern!r} contains whitespace, a control or a non-ASCII character"
            )
    if "#" in pattern:
        raise PatternError(f"pattern {pattern!r} has a fragment; CoAP URIs have none")
    if pattern == "*":
        return UriPattern(pattern, True, frozenset(DEFAULT_PORTS), None, None, (), True, None)
    try:
        return _compile(pattern)
    except (PatternError, UriError) as error:
        raise PatternError(f"pattern {pattern!r}: {error}") from None


def _compile(pattern: str) -> UriPattern:
    scheme_text, separator, rest = pattern.partition("://")
    if not separator:
        raise PatternError("can never match: it must start with coap:// or coaps:// (or be *)")
    scheme_glob = scheme_text.lower()
    if not scheme_glob or any(c not in _SCHEME_CHARS for c in scheme_glob):
        raise PatternError(f"bad scheme {scheme_text!r}")
    schemes = frozenset(s for s in DEFAULT_PORTS if _glob_regex(scheme_glob).fullmatch(s))
    if not schemes:
        raise PatternError(f"unsupported scheme {scheme_text!r}; use coap or coaps")
    # The authority ends at the first "/": "?" there is a wildcard, not a query.
    slash = rest.find("/")
    authority, target = (rest, "") if slash == -1 else (rest[:slash], rest[slash:])
    host, port = _compile_authority(authority, schemes)
    path, question, query = target.partition("?")
    segments, rest_wild = _compile_path(path or "/")
    query_regex = None
    if question:
        _check_escapes(query, "query")
        query_regex = _glob_regex(normalize_escapes(query), question_mark=False)
    return UriPattern(pattern, False, schemes, host, port, segments, rest_wild, query_regex)


def _compile_authority(authority: str, schemes: frozenset[str]) -> tuple[_Host, str | None]:
    if "@" in authority:
        raise PatternError("userinfo ('user@') is not allowed in CoAP URIs")
    if authority.startswith("["):
        close = authority.find("]")
        if close == -1:
            raise PatternError("unterminated IPv6 literal: missing ']'")
        host_text, after = authority[1:close], authority[close + 1 :]
        if after and not after.startswith(":"):
            raise PatternError(f"unexpected {after!r} after IPv6 literal; expected ':port'")
        host = _compile_ipv6_host(host_text)
    else:
        if authority.count(":") > 1:
            raise PatternError("an IPv6 address must be in brackets, e.g. coap://[::1]/")
        host_text, colon, port_text = authority.partition(":")
        after = colon + port_text
        host = _compile_host(host_text.lower())
    port_text = after[1:] if after else ""
    if not port_text:
        return host, None  # the default port, as in a URI ("coap://h:/x" included)
    if any(c not in _PORT_CHARS for c in port_text):
        raise PatternError(f"bad port {port_text!r}: a number in 1..65535, or wildcards")
    if not any(c in _WILDCARDS for c in port_text):
        if not 1 <= int(port_text) <= 65535:
            raise PatternError(f"bad port {port_text!r}: must be a number in 1..65535")
        port_text = str(int(port_text))
    return host, port_text


def _compile_ipv6_host(text: str) -> _Host:
    text = text.lower()
    if not text:
        raise PatternError("no host: empty IPv6 literal '[]'")
    if not any(c in _WILDCARDS for c in text):
        # Parsed as a URI would be: zone ids refused, the compressed form, and an
        # IPv4-mapped address as the IPv4 host it is.
        literal = parse_coap_uri(f"coap://[{text}]/").host
        return _host(host_kind(literal), literal)
    if any(c not in _IPV6_GLOB_CHARS for c in text):
        raise PatternError(f"invalid character in the IPv6 host pattern [{text}]")
    return _host("ipv6", text)


def _compile_host(text: str) -> _Host:
    if not text:
        raise PatternError("no host; expected coap://host/path")
    if all(c in _WILDCARDS for c in text):
        return _host(None, text)
    wild = any(c in _WILDCARDS for c in text)
    if all(c in _IPV4_GLOB_CHARS for c in text):
        if not wild:
            literal = parse_coap_uri(f"coap://{text}/").host  # strict dotted quad
            return _host("ipv4", literal)
        return _host("ipv4", text)
    if any(c not in _NAME_GLOB_CHARS for c in text):
        bad = next(c for c in text if c not in _NAME_GLOB_CHARS)
        raise PatternError(f"invalid character {bad!r} in the host {text!r}")
    if not wild:
        literal = parse_coap_uri(f"coap://{text}/").host  # refuses "0x7f000001" and the like
        return _host(host_kind(literal), literal)
    # Check the name's shape with each wildcard standing for one letter.
    problem = host_name_problem(re.sub(r"[*?]+", "x", text))
    if problem is not None:
        raise PatternError(problem)
    return _host("name", text)


def _host(kind: HostKind | None, glob: str) -> _Host:
    return _Host(kind, glob, _glob_regex(glob))


def _compile_path(path: str) -> tuple[tuple[re.Pattern[str], ...], bool]:
    _check_escapes(path, "path")
    path = normalize_escapes(path)
    segments = path[1:].split("/")
    if any(segment in (".", "..") for segment in segments):
        raise PatternError("can never match: normalized URIs have no '.' or '..' segments")
    rest = path.endswith("*")
    return tuple(_glob_regex(segment, question_mark=False) for segment in segments), rest


def _check_escapes(text: str, what: str) -> None:
    if _BAD_ESCAPE_RE.search(text) is not None:
        raise PatternError(f"bad percent-escape in the {what}; write %25 for a literal '%'")


def pattern_literal_host(pattern: str) -> str | None:
    """The host a pattern names literally, or None when a wildcard may stand for the host.

    The host is returned as :class:`~translator.core.uris.CoapUri` stores it (lower case, an
    IPv6 literal compressed and without brackets). A wildcard in the port does not matter
    (``coap://[ff02::fd]:*/*`` names the host ``ff02::fd``). Raises :class:`PatternError`
    for an invalid pattern.
    """
    return compile_pattern(pattern).literal_host


def special_address_kind(address: "IPAddress | str") -> SpecialKind | None:
    """``"multicast"``, ``"broadcast"`` or ``"unspecified"`` for a special destination.

    None for any other address, and for a string that is not an IP address (a host name).
    IPv4-mapped (``::ffff:a.b.c.d``) and NAT64 (``64:ff9b::a.b.c.d``) IPv6 addresses are
    judged by the IPv4 address they carry. An IPv6 scope id (``ff02::1%eth0``) is ignored.
    """
    if isinstance(address, str):
        try:
            address = ipaddress.ip_address(address)
        except ValueError:
            return None
    address = _embedded_ipv4(address)
    if address.is_multicast:
        return "multicast"
    if address == _LIMITED_BROADCAST:
        return "broadcast"
    if address.is_unspecified:
        return "unspecified"
    return None


def _embedded_ipv4(address: IPAddress) -> IPAddress:
    """The IPv4 address an IPv4-mapped or NAT64 IPv6 address stands for, else itself.

    An IPv6 scope id is dropped, so the result compares equal to the same address written
    without one (as it is in a URI, where zone ids are refused).
    """
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            address = ipaddress.IPv6Address(int(address))
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64_PREFIX:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return address


def _as_uri_host(address: IPAddress) -> str:
    """An address spelled as :func:`~translator.core.uris.parse_coap_uri` spells a literal host:
    no scope id, an IPv4-mapped address as IPv4, IPv6 compressed."""
    if isinstance(address, ipaddress.IPv6Address):
        address = ipaddress.IPv6Address(int(address))
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return address.compressed
    return str(address)


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer of :meth:`Policy.decide` for one URI (step 1 of the decision)."""

    uri: CoapUri
    """The normalized URI the decision is about."""
    allowed: bool
    """Whether the URI itself may be contacted. When ``needs_resolution`` is also true, the
    answer is provisional: the resolved addresses must pass :meth:`Policy.allows_addresses`."""
    needs_resolution: bool
    """True when the URI is allowed and its host is a name rather than an IP literal: the
    caller must resolve it and check the addresses before sending anything."""
    reason: str
    """Why the URI is refused, ready for a ``forbidden`` error message; ``""`` if allowed."""


@dataclass(frozen=True)
class Policy:
    """Which CoAP destinations the gateway may contact on a client's behalf."""

    allow: tuple[str, ...] = ()
    """Allow patterns (see the module docstring). Empty means only the sensors."""
    sensor_uris: frozenset[str] = frozenset()
    """URIs of configured sensors: always allowed. Normalized on construction."""
    _patterns: tuple[UriPattern, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.allow, str):
            # A bare string would otherwise be iterated into one-character patterns.
            raise TypeError("Policy.allow must be a sequence of patterns, not a string")
        # object.__setattr__ because the dataclass is frozen; these are normalizations of
        # the caller's own values, done once so that allows() does no parsing of its own.
        object.__setattr__(self, "allow", tuple(self.allow))
        object.__setattr__(
            self,
            "sensor_uris",
            frozenset(str(parse_coap_uri(uri)) for uri in self.sensor_uris),
        )
        object.__setattr__(self, "_patterns", tuple(compile_pattern(p) for p in self.allow))

    def allows(self, uri: CoapUri | str) -> bool:
        """Whether the gateway may send requests to ``uri``, judged on the URI alone.

        This is ``decide(uri).allowed``: a host name is not resolved here, so a caller that
        contacts names must also check the resolved addresses with :meth:`allows_addresses`.
        A string is parsed first; a :class:`~translator.core.uris.UriError` propagates, since an
        unparsable destination is a bad request rather than a denied one.
        """
        return self.decide(uri).allowed

    def decide(self, uri: CoapUri | str) -> Decision:
        """Step 1: may the gateway contact ``uri``, and must its host be resolved first?

        Allowed when the normalized URI is a configured sensor URI or fully matches an allow
        pattern; a multicast, broadcast or unspecified IP literal additionally needs a rule
        that names that host literally (the module docstring has the details). A string is
        parsed first; a :class:`~translator.core.uris.UriError` propagates.
        """
        target = parse_coap_uri(uri) if isinstance(uri, str) else uri
        normalized = str(target)
        kind = special_address_kind(target.host)
        matched = names_host = normalized in self.sensor_uris
        if not names_host:
            for pattern in self._patterns:
                if not pattern.matches(target):
                    continue
                matched = True
                names_host = pattern.literal_host == target.host
                if names_host or kind is None:
                    break
        if not matched:
            return Decision(
                target,
                False,
                False,
                f"{normalized} is not allowed by the gateway's policy; to allow it, add a "
                f"pattern such as '{target.origin}/*' to [policy] allow (or --allow)",
            )
        if kind is not None and not names_host:
            return Decision(
                target,
                False,
                False,
                f"{normalized} is {_KIND_PHRASES[kind]}; only a configured sensor or an allow "
                "pattern that names this host without wildcards allows it",
            )
        return Decision(target, True, not target.is_ip_literal, "")

    def allows_addresses(
        self, uri: CoapUri | str, addresses: Iterable[IPAddress | str]
    ) -> bool:
        """Step 2: may the gateway send to ``uri`` at these resolved addresses?

        True when :meth:`decide` allows the URI, ``addresses`` is not empty, and no address
        is multicast, broadcast or unspecified -- unless it is the URI's own host, an IP
        literal that :meth:`decide` already let through because a rule names it. A host
        name never names an address, so a name that resolves to a special address is
        refused. For a host name, when address patterns apply to the URI (patterns whose
        host is an IP address, literal or with wildcards, and whose scheme, port, path and
        query match), each address must also match the host of one of them. Addresses may
        be ``ipaddress`` objects or strings such as getaddrinfo returns (an IPv6 scope id is
        allowed); a string that is not an IP address is refused, as is an empty list (fail
        closed: the caller reports a resolution failure on its own). Refuse the request when
        this is False; the caller should also send to one of the checked addresses rather
        than resolve the name again.
        """
        decision = self.decide(uri)
        if not decision.allowed:
            return False
        own: IPAddress | None = None
        ranges: list[UriPattern] = []
        if decision.uri.is_ip_literal:
            own = _embedded_ipv4(ipaddress.ip_address(decision.uri.host))
        else:
            ranges = [
                p for p in self._patterns
                if p.is_address_pattern and p.matches_all_but_host(decision.uri)
            ]
        checked = 0
        for address in addresses:
            try:
                parsed = ipaddress.ip_address(address) if isinstance(address, str) else address
            except ValueError:
                return False
            if not isinstance(parsed, ipaddress.IPv4Address | ipaddress.IPv6Address):
                return False
            if special_address_kind(parsed) is not None and _embedded_ipv4(parsed) != own:
                return False
            if ranges:
                host = _as_uri_host(parsed)
                kind = host_kind(host)
                if not any(p.host is not None and p.host.matches(host, kind) for p in ranges):
                    return False
            checked += 1
        return checked > 0

    @property
    def allows_everything(self) -> bool:
        """True if a pattern is exactly ``*`` (development mode: the gateway is an open relay)."""
        return "*" in self.allow
