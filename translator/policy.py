"""The destination allow decision: may a client make the gateway talk to this CoAP URI?

This module owns the answer to that one question. The gateway is an open relay unless told
otherwise, so the default is deny: a destination is allowed only if it is one of the
configured sensors or fully matches an allow pattern. Both sides are compared in the
normalized form of :mod:`translator.uris`, so a different spelling of a URI (upper case host,
omitted default port, escaped unreserved characters) neither evades nor defeats a rule.

Pattern syntax: ``*`` matches any run of characters (including ``/`` and nothing), ``?``
matches exactly one character, everything else is literal -- including ``[`` and ``]``, so
IPv6 hosts are written naturally (``coap://[::1]/*``). Note that ``?`` is a wildcard, which
also matches a literal ``?`` before a query. A pattern whose ``scheme://host:port`` part has
no wildcard is normalized like a URI (``coap://LOCALHOST/x*`` means
``coap://localhost:5683/x*``). A wildcard in that part turns normalization off for it, so
write it the way normalized URIs look: lower case and with the port (``coap://*:5683/*``), or
let the wildcard cover the port (``coap://10.0.0.*/*`` matches any port on those hosts).

Special destinations. Multicast (``224.0.0.0/4``, ``ff00::/8``), the limited broadcast
address ``255.255.255.255`` and the unspecified addresses (``0.0.0.0``, ``::``) turn one
client request into traffic to many devices (an amplifier, RFC 7252 §11.3) or to this host.
They are refused unless a rule that allows the URI *names that literal host*: a configured
sensor URI, or a pattern with no wildcard in its ``scheme://host`` part
(``coap://[ff02::fd]:5683/*`` allows exactly that group; ``coap://*`` and ``*`` never allow
a special destination). IPv4 addresses written as IPv4-mapped (``::ffff:224.0.0.1``) or
NAT64 (``64:ff9b::e000:1``) IPv6 addresses count as the IPv4 address they embed.
Subnet-directed broadcast (``192.168.1.255`` on a /24) is out of scope: telling it apart
from a unicast address needs the netmasks of the gateway's interfaces, which a pure policy
does not know; don't write patterns that cover such addresses.

The decision has two steps, and this module stays pure (it never resolves names):

1. :meth:`Policy.decide` checks the URI itself. Its :class:`Decision` says whether the URI
   is allowed and whether its host is a *name* that the caller must resolve.
2. The caller resolves the name (``getaddrinfo``) and passes the addresses to
   :meth:`Policy.allows_addresses`, which applies the special-destination rule to each of
   them. A name never names a special address literally, so a name that resolves to a
   multicast, broadcast or unspecified address is always refused: to reach a multicast
   group, write its address in the pattern. To be safe against a name that resolves
   differently a moment later (DNS rebinding), the caller should then send to the address
   it checked rather than to the name.

:meth:`Policy.allows` is step 1 alone, for callers that do not resolve.
"""

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from translator.uris import CoapUri, UriError, normalize_escapes, parse_coap_uri

__all__ = [
    "Decision",
    "IPAddress",
    "PatternError",
    "Policy",
    "SpecialKind",
    "compile_pattern",
    "pattern_literal_host",
    "special_address_kind",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
SpecialKind = Literal["multicast", "broadcast", "unspecified"]

_WILDCARDS: Final = "*?"
_SCHEMES: Final = ("coap://", "coaps://")
_LIMITED_BROADCAST: Final = ipaddress.IPv4Address("255.255.255.255")
# RFC 6052 well-known NAT64 prefix: 64:ff9b::a.b.c.d reaches the IPv4 address a.b.c.d.
_NAT64_PREFIX: Final = ipaddress.IPv6Network("64:ff9b::/96")
_KIND_PHRASES: Final[dict[str, str]] = {
    "multicast": "a multicast destination",
    "broadcast": "the broadcast address",
    "unspecified": "an unspecified address",
}
# A "%" that starts no escape, unless a wildcard stands in for (part of) the two hex digits.
_BAD_ESCAPE_RE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})(?![*?]|[0-9A-Fa-f][*?])")


class PatternError(ValueError):
    """An allow pattern that is empty, malformed, or could never match a CoAP URI."""


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile an allow pattern into a regex to be used with ``fullmatch``."""
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

    text = _normalize_pattern(pattern)

    literal_prefix = re.split(r"[*?]", text, maxsplit=1)[0]
    if not any(literal_prefix.startswith(s) or s.startswith(literal_prefix) for s in _SCHEMES):
        raise PatternError(
            f"pattern {pattern!r} can never match: it must start with coap:// or coaps:// "
            "(or a wildcard)"
        )
    bad = _BAD_ESCAPE_RE.search(text)
    if bad is not None:
        raise PatternError(
            f"pattern {pattern!r} has a bad percent-escape; write %25 for a literal '%'"
        )

    return re.compile(_translate(text), re.DOTALL)


def _translate(text: str) -> str:
    """Translate a wildcard pattern into a regex that cannot backtrack catastrophically.

    The URI being matched comes from a client, so a naive ``.*a.*a.*b`` would let one request
    pin a CPU for minutes (ReDoS). Instead, as CPython's ``fnmatch`` does: the literal chunk
    after each interior ``*`` is matched at its leftmost occurrence inside an atomic group
    (leftmost is always a safe choice for wildcard matching, and atomicity forbids retrying
    others), and only the last ``*`` may backtrack, over a single run.
    """
    chunks = [_translate_chunk(chunk) for chunk in text.split("*")]
    if len(chunks) == 1:
        return chunks[0]
    first, *middle, last = chunks
    # Runs of "*" leave empty middle chunks: they add nothing, so they are skipped.
    interior = "".join(f"(?>.*?{chunk})" for chunk in middle if chunk)
    return f"{first}{interior}.*{last}"


def _translate_chunk(chunk: str) -> str:
    return "".join("." if char == "?" else re.escape(char) for char in chunk)


def _normalize_pattern(pattern: str) -> str:
    """Spell the literal parts of a pattern the way :func:`parse_coap_uri` spells URIs."""
    scheme_end = pattern.find("://")
    if scheme_end == -1 or any(c in _WILDCARDS for c in pattern[:scheme_end]):
        return normalize_escapes(pattern)
    authority_end = pattern.find("/", scheme_end + 3)
    if authority_end == -1:
        authority_end = len(pattern)
    origin, rest = pattern[:authority_end], pattern[authority_end:]
    if any(c in _WILDCARDS for c in origin):
        # Only the scheme is safe to fold: a wildcard in the authority may stand for the
        # port or even run on into the path, so nothing after "://" can be rewritten.
        return pattern[:scheme_end].lower() + normalize_escapes(pattern[scheme_end:])
    try:
        normalized_origin = parse_coap_uri(origin).origin
    except UriError as error:
        raise PatternError(f"pattern {pattern!r}: {error}") from None
    # "coap://h" names the same resource as the URI "coap://h", whose path is "/".
    return normalized_origin + (normalize_escapes(rest) or "/")


def pattern_literal_host(pattern: str) -> str | None:
    """The host a pattern names literally, or None when a wildcard may stand for the host.

    The host is returned as :class:`~translator.uris.CoapUri` stores it (lower case, an
    IPv6 literal compressed and without brackets). It is None when the scheme or the host
    contains ``*`` or ``?``: a wildcard in the scheme can run on past ``://`` and stand for
    any host, too. A wildcard in the port does not matter (``coap://[ff02::fd]:*/*`` names
    the host ``ff02::fd``). Raises :class:`PatternError` for an invalid pattern.
    """
    compile_pattern(pattern)
    return _literal_host(_normalize_pattern(pattern))


def _literal_host(text: str) -> str | None:
    """:func:`pattern_literal_host` of an already normalized, valid pattern."""
    scheme_end = text.find("://")
    if scheme_end == -1 or any(c in _WILDCARDS for c in text[:scheme_end]):
        return None
    rest = text[scheme_end + 3 :]
    if rest.startswith("["):
        close = rest.find("]")
        if close == -1:
            return None
        host = rest[1:close]
    else:
        # A literal origin was normalized, so its host ends at ":port"; a wildcard origin
        # is taken as written and may end at "/" instead.
        host = re.split(r"[:/]", rest, maxsplit=1)[0]
    if not host or any(c in _WILDCARDS for c in host):
        return None
    try:
        # An IPv6 host in a wildcard origin was not normalized; compress it here so that
        # it compares equal to CoapUri.host (the pattern itself will not match unless it
        # is written in normalized form, but the comparison must not be the weak point).
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host.lower()


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
    _patterns: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)
    _literal_hosts: tuple[str | None, ...] = field(init=False, repr=False, compare=False)
    """For each pattern, the host it names literally (see :func:`pattern_literal_host`)."""

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
        object.__setattr__(
            self, "_literal_hosts", tuple(_literal_host(_normalize_pattern(p)) for p in self.allow)
        )

    def allows(self, uri: CoapUri | str) -> bool:
        """Whether the gateway may send requests to ``uri``, judged on the URI alone.

        This is ``decide(uri).allowed``: a host name is not resolved here, so a caller that
        contacts names must also check the resolved addresses with :meth:`allows_addresses`.
        A string is parsed first; a :class:`~translator.uris.UriError` propagates, since an
        unparsable destination is a bad request rather than a denied one.
        """
        return self.decide(uri).allowed

    def decide(self, uri: CoapUri | str) -> Decision:
        """Step 1: may the gateway contact ``uri``, and must its host be resolved first?

        Allowed when the normalized URI is a configured sensor URI or fully matches an allow
        pattern; a multicast, broadcast or unspecified IP literal additionally needs a rule
        that names that host literally (the module docstring has the details). A string is
        parsed first; a :class:`~translator.uris.UriError` propagates.
        """
        target = parse_coap_uri(uri) if isinstance(uri, str) else uri
        normalized = str(target)
        kind = special_address_kind(target.host)
        matched = names_host = normalized in self.sensor_uris
        if not names_host:
            for pattern, literal_host in zip(self._patterns, self._literal_hosts, strict=True):
                if pattern.fullmatch(normalized) is None:
                    continue
                matched = True
                names_host = literal_host == target.host
                if names_host or kind is None:
                    break
        if not matched:
            return Decision(
                target, False, False, f"{normalized} is not allowed by the gateway's policy"
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
        refused. Addresses may be ``ipaddress`` objects or strings such as getaddrinfo
        returns (an IPv6 scope id is allowed); a string that is not an IP address is
        refused, as is an empty list (fail closed: the caller reports a resolution failure
        on its own). Refuse the request when this is False; the caller should also send to
        one of the checked addresses rather than resolve the name again.
        """
        decision = self.decide(uri)
        if not decision.allowed:
            return False
        own: IPAddress | None = None
        if decision.uri.is_ip_literal:
            own = _embedded_ipv4(ipaddress.ip_address(decision.uri.host))
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
            checked += 1
        return checked > 0

    @property
    def allows_everything(self) -> bool:
        """True if a pattern is exactly ``*`` (development mode: the gateway is an open relay)."""
        return "*" in self.allow
