"""Plain HTTP on the WebSocket port: the request head, and every answer but the upgrade.

Pure (no I/O, no event loop, no websockets): `web.server` feeds it a connection's first bytes
and carries out what it decides. It owns

* finding the end of the request head in a byte stream (`HeadReader`) and parsing it
  (`parse_head`), at least as strictly as websockets does, so that every head it hands to
  websockets is one websockets answers (websockets closes the connection without a word on
  a head it cannot parse);
* the operator's endpoints: `/healthz`, `/readyz` and `/metrics` (`Operations` decides);
* the answers to everything that is not a WebSocket handshake on `/ws` or on
  `/.well-known/coap` (RFC 8323) (`answer_request`):
  the page at `/` (the dashboard: its script and style at `/dashboard.js` and
  `/dashboard.css`), the JavaScript client at `/client.js` (its types at `/client.d.ts`),
  `HEAD`, 404 (an upgrade on another path says where the endpoint is), 405, and
  400/414/431/505 for heads that are not HTTP;
* which host names the port answers to (`HostNames`): a request whose `Host` is a name the
  gateway does not serve gets 421 before anything else, page and handshake alike, so that
  a page on `evil.example` that its DNS points at the gateway (DNS rebinding) can neither
  read the page nor pass the handshake's Origin check as the gateway's own origin;
* the headers that keep a browser from framing, sniffing or leaking what it gets
  (`security_headers`), on every answer, including websockets' own refusals.

The port speaks one request per connection: every answer says `Connection: close`, and
bytes after the request head (a body, a second pipelined request, junk) are never read as a
request. After a WebSocket upgrade they are the first frames.
"""

from __future__ import annotations

import http
import ipaddress
import re
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from typing import Final, Protocol

WS_PATH: Final = "/ws"
COAP_WS_PATH: Final = "/.well-known/coap"
"""CoAP over WebSockets (RFC 8323 §4), subprotocol ``coap``, beside the JSON API."""
WS_PATHS: Final = (WS_PATH, COAP_WS_PATH)
PAGE_PATHS: Final = ("/", "/index.html")
CLIENT_FILES: Final = {
    "/client.js": ("client.js", "text/javascript; charset=utf-8"),
    "/client.d.ts": ("client.d.ts", "application/typescript; charset=utf-8"),
}
"""The JavaScript client (`static/`) and its types, by path: file and Content-Type."""
PAGE_FILES: Final = {
    "/dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "/dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
    "/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
"""The page's own script, style and icon (`static/`), by path: file and Content-Type. Files
rather than inline elements, so that the page's policy names them by origin and no inline
code runs at all."""

MAX_LINE_BYTES: Final = 8192
"""Longest request or header line, CRLF included (websockets' limit too)."""
MAX_HEADERS: Final = 128
"""Most header lines in a head (websockets' limit too)."""
MAX_HEAD_BYTES: Final = 65536
"""Longest request head. A browser's is 1-2 KiB, with large cookies some 10 KiB."""

PAGE_METHODS: Final = "GET, HEAD"
WS_METHODS: Final = "GET"

_TOKEN: Final = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_TARGET: Final = re.compile(rb"[\x21-\x7e]+")
_FIELD_VALUE: Final = re.compile(rb"[\t\x20-\x7e\x80-\xff]*")
_HTTP_VERSION: Final = re.compile(rb"HTTP/[0-9](?:\.[0-9])?")
_SUPPORTED_VERSIONS: Final = (b"HTTP/1.1", b"HTTP/1.0")
_BARE_LF: Final = re.compile(rb"(?<!\r)\n")
# A host (and port) that may stand in a CSP source expression: a DNS name or IPv4 address.
_CSP_HOST: Final = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?(?::[0-9]{1,5})?")

_NOT_FRAMED: Final = "frame-ancestors 'none'"
PLAIN_CSP: Final = f"default-src 'none'; {_NOT_FRAMED}"
"""The Content-Security-Policy of every answer that is not the page: it runs nothing."""


class HttpError(Exception):
    """A request head that gets an HTTP error instead of a look at its path."""

    def __init__(self, status: http.HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]

    @property
    def path(self) -> str:
        """The target without its query (where a browser's token travels)."""
        return self.target.partition("?")[0]

    def get_all(self, name: str) -> list[str]:
        lowered = name.lower()
        return [value for key, value in self.headers if key.lower() == lowered]

    @property
    def has_body(self) -> bool:
        """Whether a body follows the head. No endpoint takes one; `Content-Length: 0` is
        tolerated because some clients send it with a GET."""
        return bool(self.get_all("Transfer-Encoding")) or any(
            value != "0" for value in self.get_all("Content-Length")
        )


@dataclass(frozen=True, slots=True)
class Answer:
    """An HTTP answer: status, headers (Date and Server are the I/O layer's), body."""

    status: http.HTTPStatus
    headers: tuple[tuple[str, str], ...]
    body: bytes
    """What to send after the headers: empty for HEAD, whose Content-Length is the GET's."""


class HeadReader:
    """Collects a connection's first bytes until the request head is complete."""

    __slots__ = ("_buffer", "_scanned")

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._scanned = 0
        """Bytes already searched for the end of the head and for bare LFs."""

    def feed(self, data: bytes) -> tuple[bytes, bytes] | None:
        """The complete head (up to its blank line) and the bytes after it, or None while
        the head is incomplete. Raises HttpError as soon as the bytes cannot become a head
        the gateway reads (too long, or lines not ended by CRLF), rather than waiting for the
        handshake timeout."""
        buffer = self._buffer
        buffer += data
        start = self._scanned
        end = buffer.find(b"\r\n\r\n", max(start - 3, 0))
        limit = len(buffer) if end < 0 else end + 4
        # Only the new bytes are searched; the look-behind still sees the byte before them.
        if _BARE_LF.search(buffer, start, limit):
            raise HttpError(http.HTTPStatus.BAD_REQUEST, "lines must end with CRLF")
        if end < 0:
            self._scanned = len(buffer)
            first_line_end = buffer.find(b"\n")
            if (first_line_end < 0 and len(buffer) > MAX_LINE_BYTES) or (
                first_line_end + 1 > MAX_LINE_BYTES
            ):
                raise HttpError(http.HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long")
            if len(buffer) > MAX_HEAD_BYTES:
                raise HttpError(
                    http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large"
                )
            return None
        if end + 4 > MAX_HEAD_BYTES:
            raise HttpError(
                http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "request head too large"
            )
        head, rest = bytes(buffer[: end + 4]), bytes(buffer[end + 4 :])
        buffer.clear()
        return head, rest


def parse_head(head: bytes) -> RequestHead:
    """Parse a request head ending with an empty line (RFC 9112 §2-5; no obsolete line
    folding). Raises HttpError; its message never repeats the request's bytes (they may hold
    a token, and an error page must not reflect them)."""
    if not head.endswith(b"\r\n\r\n"):
        raise HttpError(http.HTTPStatus.BAD_REQUEST, "incomplete request head")
    request_line, *header_lines = head[:-4].split(b"\r\n")
    if len(request_line) + 2 > MAX_LINE_BYTES:
        raise HttpError(http.HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise HttpError(http.HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise HttpError(http.HTTPStatus.BAD_REQUEST, "malformed method")
    if not _TARGET.fullmatch(target):
        raise HttpError(http.HTTPStatus.BAD_REQUEST, "malformed request target")
    if version not in _SUPPORTED_VERSIONS:
        if _HTTP_VERSION.fullmatch(version):
            raise HttpError(
                http.HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "only HTTP/1.1 and HTTP/1.0"
            )
        raise HttpError(http.HTTPStatus.BAD_REQUEST, "malformed HTTP version")
    if len(header_lines) > MAX_HEADERS:
        raise HttpError(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many headers")
    headers = []
    for line in header_lines:
        if len(line) + 2 > MAX_LINE_BYTES:
            raise HttpError(http.HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "header too long")
        name, colon, value = line.partition(b":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HttpError(http.HTTPStatus.BAD_REQUEST, "malformed header line")
        value = value.strip(b" \t")
        if not _FIELD_VALUE.fullmatch(value):
            raise HttpError(http.HTTPStatus.BAD_REQUEST, "malformed header value")
        # Values are ISO-8859-1, as websockets reads them: any byte maps to one character.
        headers.append((name.decode("ascii"), value.decode("latin-1")))
    parsed = RequestHead(method.decode(), target.decode(), version.decode(), tuple(headers))
    if not all(value.isdigit() and value.isascii() for value in parsed.get_all("Content-Length")):
        raise HttpError(http.HTTPStatus.BAD_REQUEST, "malformed Content-Length")
    return parsed


@dataclass(frozen=True, slots=True)
class HostNames:
    """The host names the gateway serves: a `Host` header must name one of them, or be an
    IP literal (an address cannot be rebound: a browser's origin for it is the address).

    `names` are lower case, without a trailing dot: ``localhost``, the listen address when
    it is a name, and ``[server] server_names``. The port is not compared (a reverse proxy
    may serve the gateway on another one).
    """

    names: frozenset[str] = frozenset({"localhost"})

    def refusal(self, host: str | None) -> Answer | None:
        """None when `host` (the Host header's value; None when absent or repeated) is
        served here, else the answer: 400 without a single Host, 421 for another name."""
        if host is None:
            return error_answer(http.HTTPStatus.BAD_REQUEST, "exactly one Host header is needed")
        name = _host_name(host)
        if name is None or name in self.names:
            return None
        return error_answer(
            http.HTTPStatus.MISDIRECTED_REQUEST,
            f"this gateway does not serve the host name {name[:80]!r} (if it is the gateway's,"
            " add it to [server] server_names)",
        )


def _host_name(host: str) -> str | None:
    """The name in a Host header's value (lower case, no port, no trailing dot), or None
    when it is an IP literal."""
    value = host.strip().lower()
    if value.startswith("["):
        return None  # an IPv6 literal (a malformed one fails websockets' own checks)
    name = value.rpartition(":")[0] if ":" in value else value
    name = name.rstrip(".")
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return name
    return None


class Operations(Protocol):
    """What the operator's endpoints ask the gateway (implemented by the wiring module)."""

    def ready(self) -> bool:
        """Listening, the CoAP side started, and not shutting down."""

    def degraded(self) -> str | None:
        """Why the gateway, though ready, serves less than it should (a cluster node cut
        off from NATS serves what it observes itself), or None."""

    def metrics(self, authorization: str | None) -> Answer:
        """The answer to ``GET /metrics`` presenting this Authorization header (or none)."""


OPERATIONS_PATHS: Final = ("/healthz", "/readyz", "/metrics")


def answer_request(
    head: RequestHead, hosts: HostNames | None = None, operations: Operations | None = None
) -> Answer | None:
    """The answer to `head`, or None for a WebSocket handshake (GET on a `WS_PATHS`), which is
    websockets' to check and answer. An answer to HEAD has the headers of the GET's, and
    no body. `hosts`: the names served (default: ``localhost`` and IP literals);
    `operations`: who answers `/readyz` and `/metrics` (without, only `/healthz` is)."""
    answer = (hosts or HostNames()).refusal(_single(head, "Host")) or _route(head, operations)
    if answer is not None and head.method == "HEAD":
        return replace(answer, body=b"")
    return answer


def _route(head: RequestHead, operations: Operations | None = None) -> Answer | None:
    path = head.path
    if path not in WS_PATHS and any(
        "websocket" in value.lower() for value in head.get_all("Upgrade")
    ):
        return error_answer(
            http.HTTPStatus.NOT_FOUND, f"no WebSocket endpoint at {path[:80]}; it is at {WS_PATH}"
        )
    if path in OPERATIONS_PATHS:
        return operations_answer(head, operations)
    if path in PAGE_PATHS:
        if head.method not in ("GET", "HEAD"):
            return method_not_allowed(PAGE_METHODS)
        if head.has_body:
            return error_answer(http.HTTPStatus.BAD_REQUEST, "a request body is not accepted")
        return page_answer(_single(head, "Host"))
    if path in CLIENT_FILES or path in PAGE_FILES:
        if head.method not in ("GET", "HEAD"):
            return method_not_allowed(PAGE_METHODS)
        if head.has_body:
            return error_answer(http.HTTPStatus.BAD_REQUEST, "a request body is not accepted")
        return client_answer(path) if path in CLIENT_FILES else page_file_answer(path)
    if path in WS_PATHS:
        if head.method != "GET":
            return method_not_allowed(WS_METHODS)
        if head.has_body:
            return error_answer(http.HTTPStatus.BAD_REQUEST, "a request body is not accepted")
        return None
    return error_answer(http.HTTPStatus.NOT_FOUND, f"no such path; WebSocket is at {WS_PATH}")


def operations_answer(head: RequestHead, operations: Operations | None) -> Answer:
    """`/healthz` (the process answers), `/readyz` (it serves) and `/metrics` (Prometheus,
    behind the token check of `operations`). The first two reveal nothing and need no
    token."""
    if head.method not in ("GET", "HEAD"):
        return method_not_allowed(PAGE_METHODS)
    if head.has_body:
        return error_answer(http.HTTPStatus.BAD_REQUEST, "a request body is not accepted")
    if head.path == "/healthz":
        return text_answer(http.HTTPStatus.OK, "ok\n")
    if operations is None:
        return error_answer(http.HTTPStatus.NOT_FOUND, "no such path")
    if head.path == "/readyz":
        if operations.ready():
            note = operations.degraded()
            text = "ready\n" if note is None else f"ready, {note}\n"
            return text_answer(http.HTTPStatus.OK, text)
        return text_answer(http.HTTPStatus.SERVICE_UNAVAILABLE, "not ready\n")
    return operations.metrics(_single(head, "Authorization"))


def text_answer(
    status: http.HTTPStatus, body: str, content_type: str = "text/plain; charset=utf-8",
    headers: tuple[tuple[str, str], ...] = (),
) -> Answer:
    """An answer with a text body (and the headers of every answer)."""
    answer = _answer(status, content_type, body.encode(), PLAIN_CSP)
    return Answer(answer.status, (*answer.headers, *headers), answer.body)


def method_not_allowed(allowed: str) -> Answer:
    answer = error_answer(http.HTTPStatus.METHOD_NOT_ALLOWED, f"allowed methods: {allowed}")
    return Answer(answer.status, (*answer.headers, ("Allow", allowed)), answer.body)


def error_answer(status: http.HTTPStatus, message: str) -> Answer:
    """A short plain-text answer, which closes the connection."""
    body = f"{message}\n".encode()
    return _answer(status, "text/plain; charset=utf-8", body, PLAIN_CSP)


def page_answer(host: str | None) -> Answer:
    """The page at `/` (`static/index.html`); `host` is the request's Host header, which
    the page's WebSocket connects back to."""
    return _answer(http.HTTPStatus.OK, "text/html; charset=utf-8", page_bytes(), page_csp(host))


def client_answer(path: str) -> Answer:
    """The JavaScript client or its types. Public code with no secret in it, so any origin
    may load it (a module script from another origin is fetched with CORS); the policy of
    every non-page answer stays, since a script's own CSP header does not apply to the page
    that imports it."""
    name, content_type = CLIENT_FILES[path]
    answer = _answer(http.HTTPStatus.OK, content_type, static_bytes(name), PLAIN_CSP)
    extra = (("Access-Control-Allow-Origin", "*"), ("Cache-Control", "no-cache"))
    return Answer(answer.status, (*answer.headers, *extra), answer.body)


def page_file_answer(path: str) -> Answer:
    """The page's script, style or icon. Same-origin only (no CORS header: nothing else needs
    them); revalidated on each load, so that an upgraded gateway never runs a stale script
    against a newer page."""
    name, content_type = PAGE_FILES[path]
    answer = _answer(http.HTTPStatus.OK, content_type, static_bytes(name), PLAIN_CSP)
    return Answer(answer.status, (*answer.headers, ("Cache-Control", "no-cache")), answer.body)


def _answer(status: http.HTTPStatus, content_type: str, body: bytes, csp: str) -> Answer:
    headers = (
        ("Content-Type", content_type),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
        *security_headers(csp),
    )
    return Answer(status, headers, body)


def security_headers(csp: str = PLAIN_CSP) -> tuple[tuple[str, str], ...]:
    """What keeps a browser from framing an answer (clickjacking: the page has buttons that
    drive actuators), from guessing another type for it, and from sending the page's URL,
    which may carry `access_token`, to anywhere as a Referer."""
    return (
        ("Content-Security-Policy", csp),
        ("X-Frame-Options", "DENY"),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
    )


def page_csp(host: str | None) -> str:
    """The page's Content-Security-Policy: scripts and styles from the gateway's own origin
    only (the page has no inline script or style, so none is allowed: nothing injected
    runs), WebSocket connections and fetches to the gateway itself, nothing else.

    `'self'` as a script source admits only what this port serves as JavaScript: every
    other answer is text/plain or HTML, and with `nosniff` a browser does not run those as
    scripts. `'self'` also covers `ws:`/`wss:` to the same host in CSP Level 3; older
    browsers need the host spelled out, which is done when the Host header is a plain name
    or IPv4 address (anything else could inject directives, and IPv6 literals have no CSP
    spelling).
    """
    connect = "'self'"
    if host is not None and _CSP_HOST.fullmatch(host):
        connect += f" ws://{host} wss://{host}"
    return (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        f"connect-src {connect}; img-src 'self'; base-uri 'none'; form-action 'none'; "
        f"{_NOT_FRAMED}"
    )


@cache
def page_bytes() -> bytes:
    return static_bytes("index.html")


@cache
def static_bytes(name: str) -> bytes:
    return resources.files("translator").joinpath(f"static/{name}").read_bytes()


def _single(head: RequestHead, name: str) -> str | None:
    values = head.get_all(name)
    return values[0] if len(values) == 1 else None
