"""CoAP over WebSockets (RFC 8323 §4): the message codec and one connection's protocol state.

Pure (no I/O, no asyncio), in the style of python-websockets' Sans-I/O protocol: the web side
feeds each WebSocket message to `CoapWsProtocol.receive` and carries out what it returns:
bytes to send (`Send`), the WebSocket to close (`Close`), and the requests a client made, as
`Forward` (a request to proxy), `Register` / `Deregister` (Observe = 0 / 1 on a GET) and
`Released`, for the wiring (translator/coap_ws_proxy.py) to check against the token, the
policy and the limits. What the wiring answers goes back out through `response`,
`notifications` and `failure`, which also keep the connection's observations (token -> URI).

What this module decides:

* Framing (RFC 8323 §4.4): one CoAP message per binary WebSocket message, Len = 0, TKL 0-8,
  then Code, Token, Options and Payload as in RFC 7252 §3.1. A text message, a malformed
  message, a first message that is not a CSM, an unknown signaling code or a critical
  option in a signaling message is a connection error: the answer is an Abort (7.05) whose
  payload says why, then the WebSocket closes (`Close`). Nothing a client sends raises.
* Signaling (§5): the server's CSM announces Max-Message-Size (the WebSocket side's frame
  limit) and no block-wise transfer; a Ping gets a Pong with its token (`PongReply`, which
  the rate limit may drop: a Ping has no error answer); a Release means
  the client will send no more requests (the wiring finishes what is in flight, then
  closes); an Abort closes at once.
* Requests: this endpoint is a forward proxy (RFC 7252 §5.7.2). The target is Proxy-Uri, or
  Proxy-Scheme with Uri-Host (required here: the default, the proxy's own address, is never
  a sensor), Uri-Port, Uri-Path and Uri-Query. A scheme other than coap/coaps is 5.05; no
  proxy option at all is 4.04; an unknown method 4.05; a critical option the gateway does
  not carry upstream (If-Match, If-None-Match, Block1, OSCORE, ...) 4.02, as RFC 7252
  §5.4.1 requires of an unrecognized one. Only Content-Format and Accept go upstream.
* Observe (RFC 7641, RFC 8323 §7): a GET with Observe = 0 is a registration, = 1 a
  deregistration. Notifications carry the hub's sequence number (24 bits) as Observe; a
  token never gets the same or an older sequence number twice (a late joiner's cached
  value, a re-registration), and a non-2.xx notification ends the observation (RFC 7641
  §3.2), as does the client's deregistration, Release, Abort or close.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

# -- codes ------------------------------------------------------------------------------------


def code_of(dotted: str) -> int:
    """The code byte of a dotted code such as ``"2.05"`` (class in the top 3 bits)."""
    klass, _, detail = dotted.partition(".")
    return (int(klass) << 5) | int(detail)


def dotted(code: int) -> str:
    return f"{code >> 5}.{code & 0x1F:02d}"


EMPTY: Final = 0x00
CSM: Final = code_of("7.01")
PING: Final = code_of("7.02")
PONG: Final = code_of("7.03")
RELEASE: Final = code_of("7.04")
ABORT: Final = code_of("7.05")

METHODS: Final[dict[int, str]] = {
    1: "GET", 2: "POST", 3: "PUT", 4: "DELETE", 5: "FETCH", 6: "PATCH", 7: "iPATCH",
}
"""Request codes (0.01-0.07) by the names the JSON protocol uses (RFC 7252, RFC 8132)."""

BAD_OPTION: Final = code_of("4.02")
NOT_FOUND: Final = code_of("4.04")
METHOD_NOT_ALLOWED: Final = code_of("4.05")
BAD_REQUEST: Final = code_of("4.00")
BAD_GATEWAY: Final = code_of("5.02")
SERVICE_UNAVAILABLE: Final = code_of("5.03")
PROXYING_NOT_SUPPORTED: Final = code_of("5.05")

# -- options (RFC 7252 §5.10, RFC 7641, RFC 7959, RFC 8323 §5) -----------------------------------

URI_HOST: Final = 3
OBSERVE: Final = 6
URI_PORT: Final = 7
URI_PATH: Final = 11
CONTENT_FORMAT: Final = 12
MAX_AGE: Final = 14
URI_QUERY: Final = 15
ACCEPT: Final = 17
BLOCK2: Final = 23
PROXY_URI: Final = 35
PROXY_SCHEME: Final = 39

# Signaling options: their numbers are per signaling code.
MAX_MESSAGE_SIZE: Final = 2  # CSM
BLOCK_WISE_TRANSFER: Final = 4  # CSM
BAD_CSM_OPTION: Final = 2  # Abort

DEFAULT_MAX_MESSAGE_SIZE: Final = 1152
"""A peer's Max-Message-Size until its CSM says otherwise (RFC 8323 §5.3.1)."""
OBSERVE_MODULUS: Final = 1 << 24
"""Observe values are 3 bytes (RFC 7641 §4.4)."""

_UINT_OPTIONS: Final[dict[int, int]] = {
    OBSERVE: 3, URI_PORT: 2, CONTENT_FORMAT: 2, MAX_AGE: 4, ACCEPT: 2, BLOCK2: 3,
}
"""Options holding an unsigned integer, with their longest length in bytes."""
_STRING_OPTIONS: Final[dict[int, tuple[int, int]]] = {
    URI_HOST: (1, 255), URI_PATH: (0, 255), URI_QUERY: (0, 255),
    PROXY_URI: (1, 1034), PROXY_SCHEME: (1, 255),
}
"""Options holding UTF-8 text, with their shortest and longest lengths (RFC 7252 §5.10)."""
_REPEATABLE: Final = frozenset({URI_PATH, URI_QUERY})
HANDLED_OPTIONS: Final = frozenset(
    {URI_HOST, OBSERVE, URI_PORT, URI_PATH, CONTENT_FORMAT, URI_QUERY, ACCEPT, BLOCK2,
     PROXY_URI, PROXY_SCHEME}
)
"""Request options the gateway understands. Any other critical (odd) option is refused
with 4.02: the gateway would otherwise drop it on the way upstream, and a critical option
must never be ignored. Elective ones (ETag, Size1, No-Response, ...) are ignored."""
PROXY_SCHEMES: Final = ("coap", "coaps")
_PATH_SAFE: Final = "!$&'()*+,;=:@"
_QUERY_SAFE: Final = "!$'()*+,;=:@/?"
_HOST_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:")


class MessageError(ValueError):
    """Bytes that are not a CoAP-over-WebSocket message; the text says what is wrong."""


@dataclass(frozen=True, slots=True)
class Message:
    """One CoAP message as RFC 8323 §4.4 frames it over a WebSocket."""

    code: int
    token: bytes = b""
    options: tuple[tuple[int, bytes], ...] = ()
    """(number, value) pairs; `serialize` writes them sorted by number (stable)."""
    payload: bytes = b""

    @classmethod
    def parse(cls, data: bytes) -> Message:
        """The message in `data`; MessageError names the first thing that is wrong."""
        if len(data) < 2:
            raise MessageError(f"a message has at least 2 bytes, not {len(data)}")
        length, tkl = data[0] >> 4, data[0] & 0x0F
        if length:
            raise MessageError(f"the Len nibble must be 0 over WebSockets, not {length}")
        if tkl > 8:
            raise MessageError(f"token length {tkl} is reserved (at most 8)")
        if len(data) < 2 + tkl:
            raise MessageError(f"the message ends inside its {tkl}-byte token")
        code, token = data[1], bytes(data[2 : 2 + tkl])
        options: list[tuple[int, bytes]] = []
        number, i, end = 0, 2 + tkl, len(data)
        while i < end:
            head = data[i]
            i += 1
            if head == 0xFF:
                if i == end:
                    raise MessageError("a payload marker must be followed by a payload")
                return cls(code, token, tuple(options), bytes(data[i:]))
            delta, i = _extended(head >> 4, data, i, "delta")
            size, i = _extended(head & 0x0F, data, i, "length")
            if i + size > end:
                raise MessageError(f"option {number + delta} runs past the end of the message")
            number += delta
            options.append((number, bytes(data[i : i + size])))
            i += size
        return cls(code, token, tuple(options))

    def serialize(self) -> bytes:
        out = bytearray((len(self.token), self.code))
        out += self.token
        previous = 0
        for number, value in sorted(self.options, key=lambda option: option[0]):
            delta, size = number - previous, len(value)
            previous = number
            delta_nibble, delta_extra = _nibble(delta)
            size_nibble, size_extra = _nibble(size)
            out.append(delta_nibble << 4 | size_nibble)
            out += delta_extra + size_extra + value
        if self.payload:
            out.append(0xFF)
            out += self.payload
        return bytes(out)

    def values(self, number: int) -> list[bytes]:
        return [value for n, value in self.options if n == number]

    def first(self, number: int) -> bytes | None:
        return next((value for n, value in self.options if n == number), None)


def _extended(nibble: int, data: bytes, i: int, what: str) -> tuple[int, int]:
    """An option delta or length from its nibble and extended bytes (RFC 7252 §3.1)."""
    if nibble < 13:
        return nibble, i
    if nibble == 15:
        raise MessageError(f"option {what} nibble 15 is reserved")
    extra = 1 if nibble == 13 else 2
    if i + extra > len(data):
        raise MessageError(f"the message ends inside an extended option {what}")
    value = int.from_bytes(data[i : i + extra], "big") + (13 if nibble == 13 else 269)
    return value, i + extra


def _nibble(value: int) -> tuple[int, bytes]:
    if value < 13:
        return value, b""
    if value < 269:
        return 13, bytes((value - 13,))
    return 14, (value - 269).to_bytes(2, "big")


def uint(value: int) -> bytes:
    """An unsigned-integer option value in its shortest form (0 is empty)."""
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


MAX_DIAGNOSTIC: Final = 512
"""Bytes of a diagnostic payload at most (it may quote a client's URI)."""


def _utf8(text: str) -> bytes:
    """`text` as UTF-8, cut to `MAX_DIAGNOSTIC` bytes without splitting a character."""
    return text.encode()[:MAX_DIAGNOSTIC].decode("utf-8", "ignore").encode()


def diagnostic(code: int, token: bytes, text: str) -> Message:
    """An error response with a diagnostic payload (RFC 7252 §5.5.2)."""
    return Message(code, token, (), _utf8(text))


# -- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send these bytes as one binary WebSocket message."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Refused:
    """A request this module answers with an error by itself (`data`); it still costs the
    connection as much as a request that is forwarded."""

    token: bytes
    data: bytes


@dataclass(frozen=True, slots=True)
class PongReply:
    """The Pong (`data`) that answers a Ping: sent unless the connection's rate limit says
    otherwise (a Ping costs as much as the JSON `ping` frame)."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    """Close the WebSocket (after what was sent before)."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class Forward:
    """A request to forward to `uri`; answer it with `response(token, ...)`."""

    token: bytes
    method: str
    uri: str
    payload: bytes = b""
    cf: int | None = None
    accept: int | None = None


@dataclass(frozen=True, slots=True)
class Register:
    """A GET with Observe = 0: observe `uri` for `token` (`observe`), or answer an error."""

    token: bytes
    uri: str
    accept: int | None = None


@dataclass(frozen=True, slots=True)
class Deregister:
    """A GET with Observe = 1 (RFC 7641 §3.6): the observation of `token` has ended; `left`
    is the URI it observed when no other token of the connection observes it any more (to
    be unsubscribed). The GET is still to be answered, as a plain GET of `uri`."""

    token: bytes
    uri: str
    accept: int | None
    left: str | None


@dataclass(frozen=True, slots=True)
class Released:
    """The client sent Release: no more requests come; close once the answers are out."""


Event = Send | PongReply | Close | Refused | Forward | Register | Deregister | Released


@dataclass(frozen=True, slots=True)
class Notification:
    """A message for an observer. `key` (one per token) lets a newer notification replace
    this one while it waits for a slow client (RFC 7641 §4.5.2: a client needs only the
    newest state); an observation's last message, an error, has none and is never dropped."""

    data: bytes
    key: str | None = None


class RequestRefused(Exception):
    """A request answered with an error code by this module alone."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass(slots=True)
class _Observation:
    uri: str
    accept: int | None
    key: str
    """The outbox key of this token's notifications (see `Notification`)."""
    last_seq: int = -1
    """The newest hub sequence number this token was sent (-1: none yet)."""


# -- the connection ------------------------------------------------------------------------------


@dataclass(slots=True)
class CoapWsProtocol:
    """One RFC 8323 connection, server side: feed it messages, carry out its events."""

    max_message_size: int
    """What this side accepts (announced in its CSM; the WebSocket side enforces it)."""
    max_observations: int = 256
    """Observations (tokens) this connection may hold at once."""
    peer_max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    peer_csm: bool = False
    released: bool = False
    aborted: bool = False
    _observations: dict[bytes, _Observation] = field(default_factory=dict)
    _by_uri: dict[str, dict[bytes, None]] = field(default_factory=dict)

    def csm(self) -> bytes:
        """The CSM this side sends first (RFC 8323 §5.3)."""
        options = ((MAX_MESSAGE_SIZE, uint(self.max_message_size)),)
        return Message(CSM, b"", options).serialize()

    # -- input --------------------------------------------------------------------------------

    def receive(self, data: str | bytes) -> list[Event]:
        """What to do about one WebSocket message from the client."""
        if self.aborted:
            return []
        if isinstance(data, str):
            return self.abort("CoAP over WebSockets takes binary messages, not text", 1003)
        try:
            message = Message.parse(data)
        except MessageError as exc:
            return self.abort(f"unparsable message: {exc}", 1002)
        if message.code >> 5 == 7:
            return self._signaling(message)
        if not self.peer_csm:
            return self.abort("the first message must be a CSM (7.01)", 1002)
        if message.code == EMPTY:
            return []  # RFC 8323 §3.4: always allowed, always ignored
        klass = message.code >> 5
        if klass in (2, 3, 4, 5):
            return []  # a response: the gateway sends no requests, so it answers nothing
        if klass != 0:
            return self.abort(f"code {dotted(message.code)} is reserved", 1002)
        try:
            return self._request(message)
        except RequestRefused as refused:
            answer = diagnostic(refused.code, message.token, refused.text).serialize()
            return [Refused(message.token, answer)]

    def abort(self, why: str, close_code: int = 1002, bad_option: int | None = None) -> list[Event]:
        """End the connection: an Abort with `why`, then the WebSocket closes."""
        if self.aborted:
            return []
        self.aborted = True
        options = () if bad_option is None else ((BAD_CSM_OPTION, uint(bad_option)),)
        abort = Message(ABORT, b"", options, _utf8(why))
        return [Send(abort.serialize()), Close(close_code, why[:120])]

    def _signaling(self, message: Message) -> list[Event]:
        code = message.code
        if code == CSM:
            for number, value in message.options:
                if number == MAX_MESSAGE_SIZE:
                    if len(value) > 4:
                        return self.abort("Max-Message-Size is longer than 4 bytes", 1002,
                                          bad_option=number)
                    self.peer_max_message_size = int.from_bytes(value, "big")
                elif number & 1:  # critical; Block-Wise-Transfer (4) and others: elective
                    return self.abort(f"critical CSM option {number} is not supported",
                                      1002, bad_option=number)
            self.peer_csm = True
            return []
        if not self.peer_csm:
            return self.abort("the first message must be a CSM (7.01)", 1002)
        critical = [n for n, _ in message.options if n & 1]
        if code not in (PING, PONG, RELEASE, ABORT):
            return self.abort(f"unknown signaling code {dotted(code)}", 1002)
        if critical and code != ABORT:
            return self.abort(f"critical option {critical[0]} of {dotted(code)} is not "
                              "supported", 1002)
        if code == PING:
            # Custody (2) would ask for the Pong after every earlier request is answered;
            # it is elective, and answering at once is allowed.
            return [PongReply(Message(PONG, message.token).serialize())]
        if code == PONG:
            return []
        if code == RELEASE:
            self.released = True
            return [Released()]
        self.aborted = True  # the client aborted: nothing more is sent
        why = message.payload.decode("utf-8", "replace")[:100]
        return [Close(1000, f"aborted by the client: {why}" if why else "aborted by the client")]

    def _request(self, message: Message) -> list[Event]:
        token = message.token
        method = METHODS.get(message.code & 0x1F) if message.code >> 5 == 0 else None
        if method is None:
            raise RequestRefused(METHOD_NOT_ALLOWED, f"no method {dotted(message.code)}")
        if self.released:
            raise RequestRefused(SERVICE_UNAVAILABLE, "the connection was released")
        self._check_options(message)
        uri = _target(message)
        cf = _uint_option(message, CONTENT_FORMAT)
        accept = _uint_option(message, ACCEPT)
        observe = _uint_option(message, OBSERVE)
        if method == "GET" and observe == 0:
            return [Register(token, uri, accept)]
        if method == "GET" and observe == 1:
            # The token names the observation; the options repeat the registration's.
            return [Deregister(token, uri, accept, self.end(token))]
        # Observe on another method, or another value, is no registration (RFC 7641 §2):
        # the request is forwarded as it is, and its answer carries no Observe.
        return [Forward(token, method, uri, message.payload, cf, accept)]

    @staticmethod
    def _check_options(message: Message) -> None:
        seen: set[int] = set()
        for number, value in message.options:
            if number not in HANDLED_OPTIONS:
                if number & 1:
                    raise RequestRefused(BAD_OPTION, f"critical option {number} is not "
                                         "supported by this proxy")
                continue
            if number in seen and number not in _REPEATABLE:
                raise RequestRefused(BAD_OPTION, f"option {number} must not repeat")
            seen.add(number)
            if number in _UINT_OPTIONS and len(value) > _UINT_OPTIONS[number]:
                raise RequestRefused(BAD_OPTION, f"option {number} is longer than "
                                     f"{_UINT_OPTIONS[number]} bytes")
            if number in _STRING_OPTIONS:
                shortest, longest = _STRING_OPTIONS[number]
                if not shortest <= len(value) <= longest:
                    raise RequestRefused(BAD_OPTION, f"option {number} must have "
                                         f"{shortest} to {longest} bytes")
                try:
                    value.decode("utf-8")
                except UnicodeDecodeError:
                    raise RequestRefused(BAD_OPTION, f"option {number} is not UTF-8") from None
        block2 = message.first(BLOCK2)
        if block2 is not None and int.from_bytes(block2, "big") >> 4:
            # Block2 with NUM > 0 asks for a later block; the gateway answers whole
            # representations (over WebSockets a message can be as large as the CSM says).
            raise RequestRefused(BAD_OPTION, "Block2 with a block number is not supported")

    # -- observations -------------------------------------------------------------------------

    @property
    def observation_count(self) -> int:
        return len(self._observations)

    @property
    def observed_uris(self) -> tuple[str, ...]:
        return tuple(self._by_uri)

    def observing(self, token: bytes) -> str | None:
        found = self._observations.get(token)
        return None if found is None else found.uri

    def observe(self, token: bytes, uri: str, accept: int | None = None) -> str | None:
        """Start (or restart) the observation of `uri` for `token`. Returns the URI the
        token observed before when that was its connection's last observer of it (to be
        unsubscribed), else None. Raises RequestRefused past `max_observations`."""
        previous = self._observations.get(token)
        if previous is None and len(self._observations) >= self.max_observations:
            raise RequestRefused(
                SERVICE_UNAVAILABLE,
                f"at most {self.max_observations} observations per connection",
            )
        left = None
        if previous is not None and previous.uri != uri:
            left = self.end(token)
        # A re-registration gets the current value again (RFC 7641 §4.1): its seq restarts.
        self._observations[token] = _Observation(uri, accept, f"coap:{token.hex()}")
        self._by_uri.setdefault(uri, {})[token] = None
        return left

    def end(self, token: bytes) -> str | None:
        """Forget `token`'s observation. Returns its URI when no other token of this
        connection observes it any more, else None."""
        found = self._observations.get(token)
        if found is None:
            return None
        del self._observations[token]
        tokens = self._by_uri[found.uri]
        del tokens[token]
        if tokens:
            return None
        del self._by_uri[found.uri]
        return found.uri

    def end_all(self) -> tuple[str, ...]:
        """Forget every observation (Release); returns the URIs that had one."""
        uris = tuple(self._by_uri)
        self._observations.clear()
        self._by_uri.clear()
        return uris

    # -- output -------------------------------------------------------------------------------

    def response(
        self,
        token: bytes,
        code: str,
        *,
        cf: int | None = None,
        payload: bytes = b"",
        max_age: int | None = None,
        observe: int | None = None,
    ) -> bytes:
        """A response message, or 5.02 when it would exceed the client's Max-Message-Size
        (the gateway does no block-wise transfer toward WebSocket clients)."""
        return self._with_token(token, *_response_body(code, cf, payload, max_age, observe))

    def _with_token(self, token: bytes, code: int, body: bytes) -> bytes:
        """The message of `code` for `token`, from what follows the token (`body`), which
        is the same for every token of a notification: serialized once."""
        size = 2 + len(token) + len(body)
        if size > self.peer_max_message_size:
            return diagnostic(
                BAD_GATEWAY, token,
                f"the response has {size} bytes, more than the {self.peer_max_message_size}"
                " of Max-Message-Size that the client announced",
            ).serialize()
        return bytes((len(token), code)) + token + body

    def error(self, token: bytes, code: str, text: str) -> bytes:
        return diagnostic(code_of(code), token, text).serialize()

    def notifications(
        self, uri: str, seq: int, code: str, cf: int | None, payload: bytes, max_age: int | None,
    ) -> list[Notification]:
        """The notification of update `seq` of `uri` for each token that has not had it (or
        a newer one), or the answer 4.06 for one whose Accept the representation misses
        (that observation then ends; see `failure`)."""
        out: list[Notification] = []
        refused: list[bytes] = []
        number, body = _response_body(code, cf, payload, max_age, seq)
        for token in self._by_uri.get(uri, ()):
            observation = self._observations[token]
            if observation.last_seq >= seq:
                continue
            if observation.accept is not None and observation.accept != cf:
                refused.append(token)
                continue
            observation.last_seq = seq
            out.append(Notification(self._with_token(token, number, body), observation.key))
        for token in refused:
            text = f"the representation has Content-Format {cf}"
            out.append(Notification(self.error(token, "4.06", text)))
            self.end(token)
        return out

    def failure(self, uri: str, code: str, text: str) -> list[bytes]:
        """A non-2.xx notification for every token observing `uri`, which ends them all."""
        tokens: Iterable[bytes] = tuple(self._by_uri.get(uri, ()))
        out = [self.error(token, code, text) for token in tokens]
        for token in tokens:
            self.end(token)
        return out


def _response_body(
    code: str, cf: int | None, payload: bytes, max_age: int | None, observe: int | None
) -> tuple[int, bytes]:
    """A response's code byte and its bytes after the token (options and payload)."""
    options: list[tuple[int, bytes]] = []
    if observe is not None:
        options.append((OBSERVE, uint(observe % OBSERVE_MODULUS)))
    if cf is not None:
        options.append((CONTENT_FORMAT, uint(cf)))
    if max_age is not None:
        options.append((MAX_AGE, uint(max_age)))
    number = code_of(code)
    return number, Message(number, b"", tuple(options), payload).serialize()[2:]


def _uint_option(message: Message, number: int) -> int | None:
    value = message.first(number)
    return None if value is None else int.from_bytes(value, "big")


def _text(value: bytes) -> str:
    return value.decode("utf-8")  # checked by _check_options


def _target(message: Message) -> str:
    """The URI a proxy request names (RFC 7252 §5.7.2 and §6.5); RequestRefused when it
    names none, or one of a scheme the gateway does not proxy to."""
    proxy_uri = message.first(PROXY_URI)
    if proxy_uri is not None:
        # Proxy-Uri takes precedence over the Uri-* options (RFC 7252 §5.10.2).
        uri = _text(proxy_uri)
        scheme = uri.partition(":")[0].lower() if ":" in uri else ""
        if scheme not in PROXY_SCHEMES:
            raise RequestRefused(PROXYING_NOT_SUPPORTED, f"the gateway proxies only to "
                                 f"{' and '.join(PROXY_SCHEMES)} URIs, not {scheme or uri!r}")
        return uri
    proxy_scheme = message.first(PROXY_SCHEME)
    if proxy_scheme is None:
        raise RequestRefused(NOT_FOUND, "this endpoint is a forward proxy: name the sensor in "
                             "Proxy-Uri, or in Proxy-Scheme with Uri-Host")
    scheme = _text(proxy_scheme).lower()
    if scheme not in PROXY_SCHEMES:
        raise RequestRefused(PROXYING_NOT_SUPPORTED, f"the gateway proxies only to "
                             f"{' and '.join(PROXY_SCHEMES)}, not {scheme!r}")
    host_value = message.first(URI_HOST)
    if host_value is None:
        raise RequestRefused(BAD_REQUEST, "Proxy-Scheme needs Uri-Host (the proxy's own "
                             "address is not a sensor)")
    host = _text(host_value).strip("[]")
    if not set(host) <= _HOST_CHARS:
        raise RequestRefused(BAD_REQUEST, "Uri-Host is not a host name or an IP address")
    authority = f"[{host}]" if ":" in host else host
    port = _uint_option(message, URI_PORT)
    if port is not None:
        authority += f":{port}"
    path = "/" + "/".join(
        urllib.parse.quote(_text(v), safe=_PATH_SAFE) for v in message.values(URI_PATH)
    )
    queries = [urllib.parse.quote(_text(v), safe=_QUERY_SAFE) for v in message.values(URI_QUERY)]
    return f"{scheme}://{authority}{path}" + (f"?{'&'.join(queries)}" if queries else "")
