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
"""

import re
from dataclasses import dataclass, field
from typing import Final

from translator.uris import CoapUri, UriError, normalize_escapes, parse_coap_uri

__all__ = ["PatternError", "Policy", "compile_pattern"]

_WILDCARDS: Final = "*?"
_SCHEMES: Final = ("coap://", "coaps://")
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


@dataclass(frozen=True)
class Policy:
    """Which CoAP destinations the gateway may contact on a client's behalf."""

    allow: tuple[str, ...] = ()
    """Allow patterns (see the module docstring). Empty means only the sensors."""
    sensor_uris: frozenset[str] = frozenset()
    """URIs of configured sensors: always allowed. Normalized on construction."""
    _patterns: tuple[re.Pattern[str], ...] = field(init=False, repr=False, compare=False)

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
        """Whether the gateway may send requests to ``uri``.

        A string is parsed first; a :class:`~translator.uris.UriError` propagates, since an
        unparsable destination is a bad request rather than a denied one.
        """
        target = parse_coap_uri(uri) if isinstance(uri, str) else uri
        # Destination-class refusals (multicast, broadcast) are to be added here: before the
        # sensor and pattern checks, so that no allow rule -- not even "*" -- can override them.
        normalized = str(target)
        if normalized in self.sensor_uris:
            return True
        return any(pattern.fullmatch(normalized) for pattern in self._patterns)

    @property
    def allows_everything(self) -> bool:
        """True if a pattern is exactly ``*`` (development mode: the gateway is an open relay)."""
        return "*" in self.allow
