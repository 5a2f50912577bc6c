"""Who a WebSocket client is and what it may do: bearer tokens, principals and scopes.

This module owns the authentication and authorization *decisions*; the WebSocket side asks
them at the handshake and the gateway per frame, and carries out the answers (HTTP 401,
``forbidden`` errors). It is pure apart from one thing: :meth:`TokenStore.from_config` reads
``[auth] token_file``, once, at startup.

* Tokens come from ``[[auth.tokens]]``, from ``[auth] token_file`` and from the environment
  variable ``COAP_WS_GATEWAY_TOKEN``. A token is printable ASCII without spaces (anything
  else could never arrive intact in an ``Authorization`` header); two sources configuring
  the same token is an error, since their scopes would be ambiguous.
* A client presents a token as ``Authorization: Bearer <token>`` (the scheme is
  case-insensitive) or, for browsers, which cannot set headers on a WebSocket, as the
  ``access_token`` query parameter of the URL (RFC 6750 §2.1 and §2.3). When the request
  has a Bearer header, the query is not looked at.
* The store keeps only SHA-256 digests of the tokens. A presented token is hashed and
  compared with *every* stored digest by :func:`hmac.compare_digest`, without stopping at a
  match, so neither the position of the matching token nor the length of any token shows
  in the time an answer takes.
* Scopes: ``read`` (subscribe, list, GET) and ``write`` (POST, PUT, DELETE, FETCH, PATCH,
  iPATCH); see :func:`scope_for_method`.
* A token's ``allow`` list narrows the global destination policy: each entry is either a
  configured sensor name (standing for that sensor's URI) or an allow pattern. The gateway
  must require both the global policy and :meth:`Principal.allows`.
* Tokens never appear in reprs, error messages or logs: :class:`Principal` does not hold
  one, :class:`TokenStore` shows only names, and :func:`redact_query` strips the query
  (where ``access_token`` travels) from request paths before they are logged.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import parse_qsl

from translator.config import SCOPES, AuthConfig, ConfigError, TokenConfig
from translator.core.policy import PatternError, Policy
from translator.core.uris import CoapUri, parse_coap_uri

__all__ = [
    "ANONYMOUS",
    "ENV_TOKEN",
    "READ",
    "WRITE",
    "Principal",
    "TokenStore",
    "redact_query",
    "scope_for_method",
    "startup_problem",
]

READ: Final = "read"
WRITE: Final = "write"
ENV_TOKEN: Final = "COAP_WS_GATEWAY_TOKEN"
"""The environment variable holding one more token, with scopes read and write."""

_SCOPES_BY_ACTION: Final[dict[str, str]] = {
    "GET": READ,
    "subscribe": READ,
    "list": READ,
    "POST": WRITE,
    "PUT": WRITE,
    "DELETE": WRITE,
    "FETCH": WRITE,
    "PATCH": WRITE,
    "iPATCH": WRITE,
}
_QUERY_PARAMETER: Final = "access_token"
# Bounds the work a hostile query string can cause before the token is even looked at.
_MAX_QUERY_FIELDS: Final = 64


@dataclass(frozen=True)
class Principal:
    """An authenticated client (or, with authentication off, :data:`ANONYMOUS`)."""

    name: str
    """The token's label, for logs; never the token itself."""
    scopes: frozenset[str]
    """Granted scopes: ``read`` and/or ``write``."""
    allow: Policy | None = None
    """The token's own allow rules (its patterns, plus the URIs of the sensor names it
    lists), narrowing the global policy; None: no narrowing."""
    allow_names: frozenset[str] = frozenset()
    """The sensor names the token's ``allow`` lists, as written. Their URIs are already in
    ``allow``; :meth:`allows` also looks them up in the sensor table it is given."""

    def can(self, scope: str) -> bool:
        """Whether this principal holds ``scope`` (see :func:`scope_for_method`)."""
        return scope in self.scopes

    def allows(
        self, uri: CoapUri | str, sensor_uris_by_name: Mapping[str, str] | None = None
    ) -> bool:
        """Whether this principal's own rules let it reach ``uri``.

        This is only the narrowing: the global policy must allow ``uri`` as well. True when
        the token has no ``allow`` list; otherwise when ``uri`` is the URI of a sensor name
        it lists (resolved when the store was built, or through ``sensor_uris_by_name``,
        name -> URI, when given) or the token's patterns allow it -- including the
        multicast/broadcast rule of :mod:`translator.core.policy`. A string is parsed first; a
        :class:`~translator.core.uris.UriError` propagates.
        """
        if self.allow is None and not self.allow_names:
            return True
        target = parse_coap_uri(uri) if isinstance(uri, str) else uri
        if self.allow is not None and self.allow.allows(target):
            return True
        if sensor_uris_by_name:
            normalized = str(target)
            for name in self.allow_names:
                sensor_uri = sensor_uris_by_name.get(name)
                if sensor_uri is not None and str(parse_coap_uri(sensor_uri)) == normalized:
                    return True
        return False


ANONYMOUS: Final = Principal(name="anonymous", scopes=frozenset(SCOPES))
"""The principal of every client when authentication is off: all scopes, no narrowing."""


@dataclass(frozen=True)
class _Entry:
    digest: bytes
    principal: Principal
    key: str
    """The configuration key of the token, for errors: ``auth.tokens[0].token``, ..."""
    line: int | None = None
    """The line of ``auth.token_file`` it is on."""

    @property
    def where(self) -> str:
        return self.key if self.line is None else f"{self.key} line {self.line}"


@dataclass(frozen=True)
class TokenStore:
    """The configured tokens, kept as SHA-256 digests, each with its :class:`Principal`."""

    _entries: tuple[_Entry, ...] = field(default=(), repr=False)

    @classmethod
    def from_config(
        cls,
        auth: AuthConfig,
        *,
        sensors: Mapping[str, str],
        env: Mapping[str, str],
    ) -> TokenStore:
        """Collect the tokens of ``[[auth.tokens]]``, ``[auth] token_file`` and ``env``.

        ``sensors`` maps each configured sensor name to its (normalized) URI, to resolve
        names in a token's ``allow``; ``env`` is the process environment (``os.environ``),
        of which only :data:`ENV_TOKEN` is read. The token file is read here: one token per
        line, optionally followed by its scopes separated by spaces (default ``read``);
        blank lines are skipped, and a word starting with ``#`` starts a comment that runs
        to the end of the line (so a token in the file cannot start with ``#``). A
        configured file without any
        token is an error, so that a truncated file cannot silently turn authentication
        off. Raises :class:`~translator.config.ConfigError` naming the key (and line);
        messages never contain a token.
        """
        entries: list[_Entry] = []
        for index, token in enumerate(auth.tokens):
            key = f"auth.tokens[{index}]"
            digest = _digest(token.token, f"{key}.token")
            entries.append(_Entry(digest, _principal(token, key, sensors), f"{key}.token"))
        if auth.token_file is not None:
            entries.extend(_read_token_file(auth.token_file))
        env_token = env.get(ENV_TOKEN, "").strip()
        if env_token:
            principal = Principal(name=f"env:{ENV_TOKEN}", scopes=frozenset((READ, WRITE)))
            entries.append(_Entry(_digest(env_token, ENV_TOKEN), principal, ENV_TOKEN))

        seen: dict[bytes, str] = {}
        for entry in entries:
            if entry.digest in seen:
                line = "" if entry.line is None else f"line {entry.line}: "
                raise ConfigError(
                    entry.key, f"{line}the same token is already configured by {seen[entry.digest]}"
                )
            seen[entry.digest] = entry.where
        return cls(tuple(entries))

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def names(self) -> tuple[str, ...]:
        """The principals' names, in configuration order (safe to log)."""
        return tuple(entry.principal.name for entry in self._entries)

    def __repr__(self) -> str:
        return f"TokenStore({len(self._entries)} tokens: {', '.join(self.names)})"

    def authenticate(self, authorization_header: str | None, query: str) -> Principal | None:
        """The principal whose token the handshake presents, or None (answer HTTP 401).

        ``authorization_header`` is the value of the ``Authorization`` header, or None;
        ``query`` is the query string of the request URL (a leading ``?`` is allowed),
        where a browser puts ``access_token``. A Bearer header wins over the query; an
        empty, malformed or repeated ``access_token`` presents no token. The presented
        token is compared with every configured one in constant time.
        """
        presented = _bearer_token(authorization_header)
        if presented is None:
            presented = _query_token(query)
        if presented is None:
            return None
        digest = hashlib.sha256(presented.encode("utf-8", "surrogatepass")).digest()
        found: Principal | None = None
        for entry in self._entries:
            # No early exit: every digest is compared whatever matched before.
            if hmac.compare_digest(entry.digest, digest) and found is None:
                found = entry.principal
        return found


def scope_for_method(method: str) -> str:
    """The scope an action needs: ``read`` for GET, ``subscribe`` and ``list``; ``write``
    for POST, PUT, DELETE, FETCH, PATCH and iPATCH (spelled exactly so).

    Raises ValueError for anything else (``ping`` and ``unsubscribe`` need no scope).
    """
    try:
        return _SCOPES_BY_ACTION[method]
    except KeyError:
        raise ValueError(f"no scope is defined for {method!r}") from None


def startup_problem(host: str, auth: AuthConfig, store: TokenStore) -> str | None:
    """Why the gateway must not start with this authentication setup, or None.

    With ``[auth] mode = "none"`` or with tokens configured there is no problem. With no
    tokens and mode ``auto``, serving on a loopback address (``127.0.0.0/8``, ``::1``,
    ``localhost``) is allowed -- the caller logs a warning that clients are not
    authenticated -- and any other address is refused with the message returned (the
    caller exits with code 2).
    """
    if auth.mode == "none" or len(store) > 0 or _is_loopback(host):
        return None
    return (
        f"refusing to serve on {host!r} without authentication: configure tokens "
        "([[auth.tokens]], [auth] token_file or the environment variable "
        f"{ENV_TOKEN}), or set [auth] mode = \"none\" (--no-auth) to serve "
        "unauthenticated clients deliberately"
    )


def redact_query(path: str) -> str:
    """The request path without its query string, for logs (``access_token`` travels there).

    ``/ws?access_token=s3cret`` becomes ``/ws``.
    """
    return path.partition("?")[0].partition("#")[0]


# --- helpers ---------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    name = host.strip().lower().rstrip(".")
    if name == "localhost" or name.endswith(".localhost"):
        return True
    if name.startswith("[") and name.endswith("]"):
        name = name[1:-1]
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def _token_problem(token: str) -> str | None:
    # Printable ASCII without spaces: the characters an HTTP header carries intact after
    # the "Bearer " scheme. The message never shows the token.
    if not token:
        return "a token must not be empty"
    if not all("\x21" <= char <= "\x7e" for char in token):
        return "a token must be printable ASCII without spaces or control characters"
    return None


def _digest(token: str, key: str, line: int | None = None) -> bytes:
    problem = _token_problem(token)
    if problem is not None:
        raise ConfigError(key, problem if line is None else f"line {line}: {problem}")
    return hashlib.sha256(token.encode("ascii")).digest()


def _principal(token: TokenConfig, key: str, sensors: Mapping[str, str]) -> Principal:
    patterns: list[str] = []
    names: set[str] = set()
    for index, entry in enumerate(token.allow):
        # A sensor name takes precedence: names never contain "://", so the only overlap
        # is a sensor literally named like a pattern such as "*".
        if entry in sensors:
            names.add(entry)
            continue
        try:
            Policy(allow=(entry,))
        except PatternError as error:
            raise ConfigError(
                f"{key}.allow[{index}]",
                f"neither a configured sensor name nor a valid pattern: {error}",
            ) from None
        patterns.append(entry)
    allow = None
    if token.allow:
        allow = Policy(
            allow=tuple(patterns), sensor_uris=frozenset(sensors[name] for name in names)
        )
    return Principal(
        name=token.name, scopes=frozenset(token.scopes), allow=allow, allow_names=frozenset(names)
    )


def _read_token_file(path: str) -> Iterable[_Entry]:
    key = "auth.token_file"
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError(key, f"cannot read {path!r}: {reason}") from None
    except UnicodeDecodeError as error:
        raise ConfigError(key, f"{path!r} is not UTF-8: {error.reason}") from None
    entries: list[_Entry] = []
    for number, line in enumerate(text.splitlines(), start=1):
        fields = line.split()
        comment = next((i for i, word in enumerate(fields) if word.startswith("#")), None)
        fields = fields[:comment]
        if not fields:
            continue
        token, scopes = fields[0], fields[1:] or [READ]
        for scope in scopes:
            if scope not in SCOPES:
                # The word is not shown: a second token pasted on the line would land here.
                raise ConfigError(
                    key,
                    f"line {number}: after the token, only the scopes "
                    f"{' and '.join(repr(s) for s in SCOPES)} may follow",
                )
        principal = Principal(name=f"token_file:{number}", scopes=frozenset(scopes))
        entries.append(_Entry(_digest(token, key, number), principal, key, number))
    if not entries:
        raise ConfigError(key, f"{path!r} contains no token")
    return entries


def _bearer_token(header: str | None) -> str | None:
    if header is None:
        return None
    parts = header.split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1].strip() or None


def _query_token(query: str) -> str | None:
    if query.startswith("?"):
        query = query[1:]
    try:
        pairs = parse_qsl(
            query,
            keep_blank_values=True,
            strict_parsing=False,
            errors="strict",
            max_num_fields=_MAX_QUERY_FIELDS,
        )
    except (ValueError, UnicodeDecodeError):
        return None
    values = [value for name, value in pairs if name == _QUERY_PARAMETER]
    if len(values) != 1 or not values[0]:
        return None
    return values[0]
