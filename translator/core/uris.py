"""CoAP URI parsing and normalization.

This module owns the one canonical spelling of a ``coap://`` / ``coaps://`` URI. Everything
that compares, matches or keys on a destination (the allow policy, the observation registry,
the sensor table) goes through :func:`parse_coap_uri` and compares ``str(CoapUri)``, so two
spellings of the same resource (``coap://H/x`` and ``coap://h:5683/x``) can never be treated
as two resources, and a spelling trick can never slip past the policy.

Normalization (RFC 3986 §6.2.2 syntax-based, plus the scheme-based port rule of §6.2.3):

* scheme and host are lower-cased; IPv6 literals are validated and written in their
  compressed form, in brackets in the string form only;
* the port is always explicit (5683 for ``coap``, 5684 for ``coaps``);
* an empty path becomes ``/``;
* percent-escapes of unreserved characters are decoded, all other escapes get upper-case hex;
* ``.`` and ``..`` path segments are removed (RFC 3986 §5.2.4), as aiocoap would do anyway
  when it turns the path into Uri-Path options;
* the query is kept as written apart from the percent-escape rule.

Anything that is not a usable CoAP URI raises :class:`UriError`, which the protocol layer
reports as ``bad_request``.
"""

import ipaddress
import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_PORTS",
    "MAX_URI_LENGTH",
    "CoapUri",
    "UriError",
    "normalize_escapes",
    "parse_coap_uri",
]


class UriError(ValueError):
    """Not a usable coap/coaps URI (protocol error ``bad_request``)."""


DEFAULT_PORTS: Final[dict[str, int]] = {"coap": 5683, "coaps": 5684}

MAX_URI_LENGTH: Final = 2048
"""Longest accepted URI text. Far beyond any sane sensor URI; it bounds the work a single
client request can cause in parsing and policy matching."""

_UNRESERVED: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_SUB_DELIMS: Final = "!$&'()*+,;="
# RFC 3986 pchar plus "/" (path) and pchar plus "/" and "?" (query); "%" is checked separately
# because it is only valid as the start of an escape.
_PATH_CHARS: Final = frozenset(_UNRESERVED | set(_SUB_DELIMS) | set(":@/%"))
_QUERY_CHARS: Final = frozenset(_PATH_CHARS | {"?"})
# Host names: RFC 1123 names (letters, digits, hyphens; labels of 1 to 63 characters, not
# starting or ending with a hyphen; 253 characters in all). RFC 3986 reg-name would also
# admit sub-delims and percent-escapes, but no resolver accepts those, so they can only be
# typos or tricks, and a name outside these rules fails later, in the resolver's IDNA codec.
_HOST_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-.")
_LABEL_RE: Final = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
MAX_HOST_NAME_LENGTH: Final = 253

_SCHEME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*(?=:)")
_ESCAPE_RE: Final = re.compile(r"%([0-9A-Fa-f]{2})")
_BAD_ESCAPE_RE: Final = re.compile(r"%(?![0-9A-Fa-f]{2})")
_PORT_RE: Final = re.compile(r"[0-9]+")
# A host whose last label is a number (decimal, or hex with "0x") can only be meant as an
# IPv4 address (no TLD is numeric), so it must parse as a dotted quad. This refuses what the
# C library's inet_aton would also take for an address: "999.1.1.1", shorthand like
# "127.1", and hex or octal spellings ("0x7f000001", "0x7f.0.0x1", "0177.0.0.1"), which a
# policy written in dotted quads would not recognize.
_NUMERIC_LABEL_RE: Final = re.compile(r"(?:^|\.)(?:[0-9]+|0x[0-9a-f]*)\.?$")


@dataclass(frozen=True, slots=True)
class CoapUri:
    """A normalized CoAP URI. Build it with :func:`parse_coap_uri`, not directly."""

    scheme: str
    """``"coap"`` or ``"coaps"``."""
    host: str
    """Lower case; an IPv6 literal is stored without brackets."""
    port: int
    """Always explicit: the scheme's default port is filled in."""
    path: str
    """Starts with ``/``; unreserved escapes decoded, other escapes with upper-case hex."""
    query: str
    """``""`` or the query without the leading ``?``."""

    def __str__(self) -> str:
        query = f"?{self.query}" if self.query else ""
        return f"{self.origin}{self.path}{query}"

    @property
    def origin(self) -> str:
        """``scheme://host:port``, with the host in brackets if it is an IPv6 literal."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def is_ip_literal(self) -> bool:
        """True if the host is an IPv4 or IPv6 address rather than a name to resolve."""
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return False
        return True


def parse_coap_uri(text: str) -> CoapUri:
    """Parse and normalize a ``coap://`` or ``coaps://`` URI.

    Raises :class:`UriError` with a message that says what is wrong and where.
    """
    if not isinstance(text, str):
        raise UriError(f"URI must be a string, not {type(text).__name__}")
    if len(text) > MAX_URI_LENGTH:
        raise UriError(f"URI is too long ({len(text)} characters; at most {MAX_URI_LENGTH})")
    if not text:
        raise UriError("URI is empty; expected coap://host/path")
    for index, char in enumerate(text):
        # Checked on the raw text, before any splitting, so no component parser ever has to
        # think about them; str.isspace also covers Unicode spaces that look like nothing.
        if ord(char) < 0x21 or char == "\x7f" or char.isspace():
            raise UriError(f"URI contains whitespace or a control character at position {index}")
        if not char.isascii():
            raise UriError(
                f"URI contains a non-ASCII character {char!r} at position {index}; "
                "percent-encode it"
            )

    scheme_match = _SCHEME_RE.match(text)
    if scheme_match is None:
        raise UriError(f"not a URI (no scheme) in {_show(text)}; use coap:// or coaps://")
    scheme = scheme_match.group().lower()
    if scheme not in DEFAULT_PORTS:
        raise UriError(f"unsupported scheme {scheme!r}; use coap:// or coaps://")
    rest = text[scheme_match.end() + 1 :]
    if not rest.startswith("//"):
        raise UriError(f"missing '//' after '{scheme}:'; expected {scheme}://host/path")
    rest = rest[2:]

    if "#" in text:
        raise UriError(f"CoAP URIs have no fragment ('#' at position {text.index('#')})")

    # The authority runs to the first "/" or "?" (there is no "#" left to consider).
    end = len(rest)
    for delimiter in "/?":
        found = rest.find(delimiter)
        if found != -1:
            end = min(end, found)
    authority, rest = rest[:end], rest[end:]
    host, port = _parse_authority(authority, scheme)

    path, _, query = rest.partition("?")
    path = _remove_dot_segments(_normalize_component(path, _PATH_CHARS, "path")) or "/"
    query = _normalize_component(query, _QUERY_CHARS, "query")
    return CoapUri(scheme=scheme, host=host, port=port, path=path, query=query)


def normalize_escapes(text: str) -> str:
    """Decode escapes of unreserved characters and upper-case the hex of all others.

    Shared with the policy module so that literal parts of patterns are spelled the way
    normalized URIs are.
    """
    return _ESCAPE_RE.sub(_normalize_escape, text)


def _normalize_escape(match: re.Match[str]) -> str:
    char = chr(int(match.group(1), 16))
    return char if char in _UNRESERVED else f"%{match.group(1).upper()}"


def _parse_authority(authority: str, scheme: str) -> tuple[str, int]:
    if "@" in authority:
        # RFC 7252 §6.1: coap-URI has no userinfo; accepting it would also let
        # "coap://allowed.example@evil.example/" confuse a human reading the policy log.
        raise UriError("userinfo ('user@') is not allowed in CoAP URIs")
    if not authority:
        raise UriError("no host; expected coap://host/path")

    if authority.startswith("["):
        close = authority.find("]")
        if close == -1:
            raise UriError("unterminated IPv6 literal: missing ']'")
        host = _parse_ipv6(authority[1:close])
        after = authority[close + 1 :]
        if after and not after.startswith(":"):
            raise UriError(f"unexpected {after!r} after IPv6 literal; expected ':port'")
        port_text = after[1:] if after else None
    else:
        if authority.count(":") > 1:
            raise UriError("an IPv6 address must be in brackets, e.g. coap://[::1]/")
        host, colon, port_text_or_empty = authority.partition(":")
        port_text = port_text_or_empty if colon else None
        host = _parse_host_name(host)

    # An empty port ("coap://h:/x") means the default port (RFC 3986 §3.2.3, §6.2.3).
    if not port_text:
        return host, DEFAULT_PORTS[scheme]
    if _PORT_RE.fullmatch(port_text) is None:
        raise UriError(f"bad port {port_text!r}: must be a number in 1..65535")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise UriError(f"bad port {port_text!r}: must be a number in 1..65535")
    return host, port


def _parse_ipv6(literal: str) -> str:
    if not literal:
        raise UriError("no host: empty IPv6 literal '[]'")
    if "%" in literal:
        # Zone ids name an interface of *this* machine; a gateway serving remote clients
        # should not let them pick the outgoing interface, and aiocoap's support is uneven.
        raise UriError("IPv6 zone identifiers (e.g. '%25eth0') are not supported")
    if literal[0] in "vV":
        raise UriError(f"IPvFuture literal [{literal}] is not supported")
    try:
        address = ipaddress.IPv6Address(literal)
    except ValueError:
        raise UriError(f"invalid IPv6 address [{literal}]") from None
    if address.ipv4_mapped is not None:
        # [::ffff:a.b.c.d] reaches the IPv4 host a.b.c.d (through a dual-stack socket), so it
        # is spelled as that host: one destination, one spelling, whatever the policy says
        # about IPv4 or IPv6 hosts.
        return str(address.ipv4_mapped)
    # The compressed form is canonical, so [0:0::1] and [::1] are one destination.
    return address.compressed


def _parse_host_name(host: str) -> str:
    if not host:
        raise UriError("no host; expected coap://host/path")
    if "%" in host:
        raise UriError(f"percent-escapes are not allowed in the host {host!r}")
    for char in host:
        if char.lower() not in _HOST_CHARS:
            raise UriError(f"invalid character {char!r} in host {_show(host)}")
    host = host.lower()
    if _NUMERIC_LABEL_RE.search(host):
        try:
            # compressed drops nothing here but rejects leading zeros ("010.0.0.1" is octal
            # to some resolvers and decimal to others: ambiguous, so refused).
            return ipaddress.IPv4Address(host).compressed
        except ValueError:
            raise UriError(
                f"invalid IPv4 address {host!r}: write it as four decimal numbers"
            ) from None
    problem = host_name_problem(host)
    if problem is not None:
        raise UriError(problem)
    return host


def host_name_problem(host: str) -> str | None:
    """Why `host` (lower case) is not an RFC 1123 host name, or None when it is one."""
    if len(host) > MAX_HOST_NAME_LENGTH:
        return f"host name is too long ({len(host)} characters; at most {MAX_HOST_NAME_LENGTH})"
    for label in host.split("."):
        if not label:
            return f"empty label in host {_show(host)}"
        if _LABEL_RE.fullmatch(label) is None:
            what = "longer than 63 characters" if len(label) > 63 else (
                "starts or ends with '-'" if label[0] == "-" or label[-1] == "-"
                else "has an invalid character")
            return f"label {_show(label)} of host {_show(host)} {what}"
    return None


def _normalize_component(text: str, allowed: frozenset[str], what: str) -> str:
    for char in text:
        if char not in allowed:
            raise UriError(f"invalid character {char!r} in {what}; percent-encode it")
    bad = _BAD_ESCAPE_RE.search(text)
    if bad is not None:
        raise UriError(
            f"bad percent-escape {text[bad.start() : bad.start() + 3]!r} in {what}; "
            "expected '%' and two hex digits"
        )
    return normalize_escapes(text)


def _remove_dot_segments(path: str) -> str:
    """RFC 3986 §5.2.4, for the absolute (or empty) paths that follow an authority."""
    output: list[str] = []
    source = path
    while source:
        # Rules A and D do not apply: a path after an authority is empty or starts with "/".
        if source.startswith("/./"):
            source = source[2:]
        elif source == "/.":
            source = "/"
        elif source.startswith("/../"):
            source = source[3:]
            if output:
                output.pop()
        elif source == "/..":
            source = "/"
            if output:
                output.pop()
        else:
            # Rule E: move the first segment, with its leading "/", to the output.
            next_slash = source.find("/", 1)
            if next_slash == -1:
                next_slash = len(source)
            output.append(source[:next_slash])
            source = source[next_slash:]
    return "".join(output)


def _show(text: str, limit: int = 60) -> str:
    """A repr short enough for an error message that may be echoed to a client."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + "..."
