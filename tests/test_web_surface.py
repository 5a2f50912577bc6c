"""The web surface of the gateway's port, attacked with raw bytes (issue 20, round 3).

Real gateway on loopback, real sockets: each test sends what an attacker sent and checks
what must and must not come back (answers, logs, memory). Every wait is on bytes or EOF,
bounded by `WAIT`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest

from translator.gateway import Gateway
from translator.redaction import REDACTED, install_redaction, redact
from translator.web.front import page_bytes, page_csp

from .conftest import WAIT, handshake_request

SECRET = "tok;en#0123456789-secret-0123456789"
"""A real, configured token; `;` and `#` are legal in tokens and end no query value."""
SECRET_TAIL = "secret-0123456789"
"""A part of SECRET that appears in any spelling of it, encoded or not."""


def gateway_mapping(**extra: Any) -> dict[str, Any]:
    return {
        "server": {"host": "127.0.0.1", "port": 0, "linger": 0},
        "policy": {"allow": ["coap://127.0.0.1/*"]},
        **extra,
    }


def with_auth() -> dict[str, Any]:
    return gateway_mapping(
        auth={"tokens": [{"token": SECRET, "name": "dashboard", "scopes": ["read"]}]}
    )


@dataclass
class HttpAnswer:
    status: int
    headers: dict[str, list[str]]
    """By lower-case name."""
    body: bytes

    def header(self, name: str) -> str:
        [value] = self.headers[name.lower()]
        return value


async def exchange(port: int, data: bytes, head_only: bool = False) -> HttpAnswer:
    """Send `data` on a fresh TCP connection and read one complete HTTP answer, without
    closing our side first: the answer must not wait for the client. Then half-close and
    check that nothing follows the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(WAIT):
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
            version, status, _ = status_line.split(" ", 2)
            assert version == "HTTP/1.1"
            headers: dict[str, list[str]] = {}
            for line in lines:
                name, _, value = line.partition(":")
                headers.setdefault(name.lower(), []).append(value.strip())
            [length] = headers["content-length"]
            body = b"" if head_only else await reader.readexactly(int(length))
            if writer.can_write_eof():
                writer.write_eof()
            try:
                rest = await reader.read()
            except ConnectionResetError:
                rest = b""
        assert rest == b"", rest
        return HttpAnswer(int(status), headers, body)
    finally:
        writer.close()


# --- item 8: tokens in debug logs ---------------------------------------------------------

MALFORMED_WITH_TOKEN = [
    # Not GET, with the token in the query.
    f"POST /ws?access_token={SECRET} HTTP/1.1\r\nHost: h\r\n\r\n",
    f"DELETE /?access_token={SECRET} HTTP/1.1\r\nHost: h\r\n\r\n",
    # An unsupported or broken HTTP version: websockets puts the whole line in its exception.
    f"GET /ws?access_token={SECRET} HTTP/2.0\r\nHost: h\r\n\r\n",
    f"GET /ws?access_token={SECRET}\r\nHost: h\r\n\r\n",
    # A header with a control character, after a token in the query or in the header itself.
    f"GET /ws?access_token={SECRET} HTTP/1.1\r\nHost: h\x01\r\n\r\n",
    f"GET /ws HTTP/1.1\r\nHost: h\r\nAuthorization: Bearer {SECRET}\x01\r\n\r\n",
    # A header line without a colon.
    f"GET /ws HTTP/1.1\r\nHost: h\r\nAuthorization Bearer {SECRET}\r\n\r\n",
    # Spellings of the query parameter the authentication accepts, and its value encoded.
    f"GET /ws?access%5Ftoken={SECRET} HTTP/1.1\r\nHost: h\r\n\r\n",
    f"PUT /ws?access%5ftoken={SECRET} HTTP/1.1\r\nHost: h\r\n\r\n",
    f"GET /ws?x=1&%61ccess_token={quote(SECRET, safe='')} HTTP/1.1\r\nHost: h\r\n\r\n",
    f"GET http://h/ws?access_token={SECRET} HTTP/1.1\r\nHost: h\r\n\r\n",
    f"GET ws?access_token={SECRET} HTTP/1.1\r\nHost: h\r\n\r\n",
    # The scheme in another case, and the token in a Referer (the page's own URL).
    f"GET /ws HTTP/1.1\r\nHost: h\r\nauthorization: bEaReR {SECRET}\r\n\r\n",
    f"GET / HTTP/1.1\r\nHost: h\r\nReferer: http://h/?access_token={SECRET}\r\n\r\n",
    # A request body, which websockets refuses with an exception.
    f"GET /ws?access_token={SECRET} HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabc",
]


@pytest.mark.parametrize("request_text", MALFORMED_WITH_TOKEN)
async def test_no_token_in_any_log_record_of_a_malformed_request(
    request_text: str, make_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    gateway: Gateway = await make_gateway(with_auth())
    answer = await exchange(gateway.ws.port, request_text.encode("latin-1"))
    await gateway.stop()  # every record of the connection is written by now
    assert 200 <= answer.status < 600  # a complete answer, whatever the request
    assert caplog.text  # websockets logged the request at debug level
    formatted = logging.Formatter("%(name)s %(message)s").format
    for record in caplog.records:
        text = formatted(record)
        assert SECRET_TAIL not in text, text
        assert "access_token" not in text or REDACTED in text, text
    assert SECRET_TAIL not in caplog.text


async def test_exceptions_of_every_logger_are_redacted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    install_redaction()
    caplog.set_level(logging.DEBUG)
    try:
        raise ValueError(f"invalid HTTP header line: Authorization Bearer {SECRET}")
    except ValueError:
        logging.getLogger("asyncio").exception("callback failed for /ws?access_token=%s", SECRET)
    [record] = caplog.records
    assert record.getMessage() == f"callback failed for /ws?{REDACTED}"
    assert "Traceback" in caplog.text and "ValueError" in caplog.text
    assert SECRET_TAIL not in caplog.text


def test_a_record_whose_arguments_do_not_format_is_kept_and_redacted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    install_redaction()
    caplog.set_level(logging.INFO)
    logging.getLogger("translator.test").info("%d /?access_token=%s", "not a number", SECRET)
    [record] = caplog.records
    assert "do not format" in record.getMessage()
    assert SECRET_TAIL not in caplog.text


@pytest.mark.parametrize(
    ("text", "redacted"),
    [
        ("< GET /ws?access_token=abc HTTP/1.1", f"< GET /ws?{REDACTED} HTTP/1.1"),
        ("< PATCH /x/y?a=1&access_token=abc HTTP/1.0", f"< PATCH /x/y?{REDACTED} HTTP/1.0"),
        ("GET ws?access%5ftoken=abc HTTP/1.1", f"GET ws?access%5ftoken={REDACTED} HTTP/1.1"),
        ("GET *?ACCESS_TOKEN=abc;d#e", f"GET *?ACCESS_TOKEN={REDACTED}"),
        ("Referer: https://h:1/?access_token=abc", f"Referer: https://h:1/?{REDACTED}"),
        ("value: access%255Ftoken=abc", f"value: access%255Ftoken={REDACTED}"),
        ("< Authorization: Bearer abc", f"< Authorization: {REDACTED}"),
        ("header line: Authorization Bearer abc", f"header line: Authorization {REDACTED}"),
        ("header value: bearer\tabc\x01", f"header value: bearer\t{REDACTED}"),
        # Left alone: CoAP URIs (no secret travels there) and ordinary text.
        ("subscribe coap://127.0.0.1/t?unit=C", "subscribe coap://127.0.0.1/t?unit=C"),
        ("max_size=65536 is it?", "max_size=65536 is it?"),
    ],
)
def test_redact(text: str, redacted: str) -> None:
    assert redact(text) == redacted


# --- item 7: bytes after a request -----------------------------------------------------------


def head(method: str, path: str, *headers: str) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]
    return "\r\n".join(lines).encode()


UPGRADE = (
    "Upgrade: websocket",
    "Connection: Upgrade",
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
    "Sec-WebSocket-Version: 13",
)
REQUESTS = {
    "page": (head("GET", "/"), 200),
    "unknown path": (head("GET", "/nope?x=1"), 404),
    "foreign origin": (head("GET", "/ws", *UPGRADE, "Origin: http://evil.example"), 403),
    "no token": (head("GET", "/ws", *UPGRADE), 401),
    "wrong token": (head("GET", "/ws?access_token=wrong", *UPGRADE), 401),
    "no upgrade": (head("GET", f"/ws?access_token={quote(SECRET)}"), 426),
}
AFTERWARDS = {
    "junk": b"XYZ\r\n\x00\xff\x81\x85",
    "a second request": head("GET", "/"),
    "a second handshake": head("GET", "/ws", *UPGRADE),
    "a ping frame": b"\x89\x80" + os.urandom(4),
}


@pytest.mark.parametrize("afterwards", AFTERWARDS.values(), ids=AFTERWARDS.keys())
@pytest.mark.parametrize("request_bytes, status", REQUESTS.values(), ids=REQUESTS.keys())
async def test_bytes_after_a_request_leave_its_answer_whole(
    request_bytes: bytes,
    status: int,
    afterwards: bytes,
    make_gateway: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    gateway: Gateway = await make_gateway(with_auth())
    answer = await exchange(gateway.ws.port, request_bytes + afterwards)
    assert answer.status == status
    # One request per connection: the second one is not answered on it, and the gateway
    # still answers the next connection.
    assert (await exchange(gateway.ws.port, head("GET", "/"))).status == 200
    await gateway.stop()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert "Traceback" not in caplog.text


async def test_frames_right_after_a_handshake_are_read_once_it_is_accepted(
    make_gateway: Any,
) -> None:
    gateway: Gateway = await make_gateway(with_auth())
    port = gateway.ws.port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # The handshake and a first request frame in one segment, as an eager client sends.
        writer.write(handshake_request(port, f"/ws?access_token={quote(SECRET)}")
                     + masked_frame(0x1, json.dumps({"type": "ping", "id": 7}).encode()))
        async with asyncio.timeout(WAIT):
            answer = await reader.readuntil(b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 101 ")
            opcode, payload = await read_frame(reader)
        assert opcode == 0x1
        assert json.loads(payload) == {"type": "pong", "id": 7}
    finally:
        writer.close()


def masked_frame(opcode: int, payload: bytes) -> bytes:
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((0x80 | opcode, 0x80 | len(payload))) + mask + masked


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, length = await reader.readexactly(2)
    length &= 0x7F
    if length == 126:
        length = int.from_bytes(await reader.readexactly(2))
    elif length == 127:
        length = int.from_bytes(await reader.readexactly(8))
    return first & 0x0F, await reader.readexactly(length)


# --- item 9: the page can be framed ----------------------------------------------------------

SECURITY_HEADERS = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


def assert_not_frameable(answer: HttpAnswer) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert answer.header(name) == value, (name, answer.headers)
    directives = csp_directives(answer.header("Content-Security-Policy"))
    assert directives["frame-ancestors"] == ["'none'"]
    assert directives["default-src"] == ["'none'"]


def csp_directives(policy: str) -> dict[str, list[str]]:
    directives = {}
    for directive in policy.split(";"):
        name, *sources = directive.split()
        directives[name] = sources
    return directives


ANSWERS = {
    "page": (head("GET", "/"), 200),
    "index.html": (head("GET", "/index.html?access_token=x"), 200),
    "404": (head("GET", "/favicon.ico"), 404),
    "405": (head("OPTIONS", "/"), 405),
    "401": (head("GET", "/ws", *UPGRADE), 401),
    "403": (head("GET", "/ws", *UPGRADE, "Origin: http://evil.example"), 403),
    "426": (head("GET", f"/ws?access_token={quote(SECRET)}"), 426),
    "400 bad key": (
        head("GET", f"/ws?access_token={quote(SECRET)}", *UPGRADE[:2],
             "Sec-WebSocket-Key: short", "Sec-WebSocket-Version: 13"),
        400,
    ),
    "400 malformed": (b"GET / HTTP/1.1\r\nHost 127.0.0.1\r\n\r\n", 400),
    "505": (b"GET / HTTP/2.0\r\n\r\n", 505),
}


@pytest.mark.parametrize("request_bytes, status", ANSWERS.values(), ids=ANSWERS.keys())
async def test_every_answer_forbids_framing_and_sniffing(
    request_bytes: bytes, status: int, make_gateway: Any
) -> None:
    gateway: Gateway = await make_gateway(with_auth())
    answer = await exchange(gateway.ws.port, request_bytes)
    assert answer.status == status
    assert_not_frameable(answer)


async def test_the_page_policy_runs_the_page_and_nothing_else(make_gateway: Any) -> None:
    gateway: Gateway = await make_gateway(gateway_mapping())
    port = gateway.ws.port
    own_host = f"127.0.0.1:{port}".encode()
    answer = await exchange(port, head("GET", "/").replace(b"127.0.0.1", own_host))
    assert answer.body == page_bytes()
    directives = csp_directives(answer.header("Content-Security-Policy"))
    page = answer.body.decode()
    # Scripts and styles come from the gateway's own files only: no inline element, no
    # 'unsafe-inline', no other source.
    assert directives["script-src"] == ["'self'"]
    assert directives["style-src"] == ["'self'"]
    assert not re.search(r"<script[^>]*>\s*[^<\s]", page), "an inline script"
    assert "<style" not in page
    # Script that CSP would block: handler attributes, style attributes, javascript: URLs.
    assert not re.search(r"<[^>]*\s(on\w+|style)\s*=", page, re.IGNORECASE)
    assert "javascript:" not in page
    # The page's WebSocket goes back to the host it came from, ws: or wss:.
    assert directives["connect-src"] == [
        "'self'", f"ws://127.0.0.1:{port}", f"wss://127.0.0.1:{port}"
    ]
    # Each file the page loads is served, as what the page loads it as.
    wanted = {"script": "text/javascript", "stylesheet": "text/css", "icon": "image/svg+xml"}
    loaded = re.findall(r'<script type="module" src="([^"]+)">', page)
    loaded += re.findall(r'<link rel="(?:stylesheet|icon)" href="([^"]+)"', page)
    assert len(loaded) == 3, loaded
    for path in loaded:
        served = await exchange(port, head("GET", path))
        assert served.status == 200, path
        assert served.header("Content-Type").split(";")[0] in wanted.values(), path
        assert_not_frameable(served)


async def test_a_host_header_cannot_inject_into_the_policy(make_gateway: Any) -> None:
    gateway: Gateway = await make_gateway(gateway_mapping())
    injected = "evil.example; script-src *; frame-ancestors *"
    answer = await exchange(gateway.ws.port, f"GET / HTTP/1.1\r\nHost: {injected}\r\n\r\n".encode())
    # A name the gateway does not serve gets 421 (issue 13 §2), with the plain policy...
    assert answer.status == 421
    directives = csp_directives(answer.header("Content-Security-Policy"))
    assert directives == {"default-src": ["'none'"], "frame-ancestors": ["'none'"]}
    # ...and the page's own policy would not take such a host in either.
    directives = csp_directives(page_csp(injected))
    assert directives["connect-src"] == ["'self'"]
    assert directives["frame-ancestors"] == ["'none'"]
    assert "*" not in directives["script-src"]


# --- item 12: HTTP methods on / ------------------------------------------------------------


async def test_head_gets_the_headers_of_get_and_no_body(make_gateway: Any) -> None:
    gateway: Gateway = await make_gateway(gateway_mapping())
    got = await exchange(gateway.ws.port, head("GET", "/"))
    headed = await exchange(gateway.ws.port, head("HEAD", "/"), head_only=True)
    assert headed.status == got.status == 200
    assert headed.body == b""  # and `exchange` saw nothing after the headers
    assert headed.header("Content-Length") == str(len(page_bytes()))
    for answer in (got, headed):
        del answer.headers["date"]
    assert headed.headers == got.headers


@pytest.mark.parametrize("method", ["OPTIONS", "POST", "PUT", "DELETE", "PATCH", "TRACE", "FOO"])
@pytest.mark.parametrize("path", ["/", "/index.html?access_token=x"])
async def test_other_methods_on_the_page_get_405(
    method: str, path: str, make_gateway: Any
) -> None:
    gateway: Gateway = await make_gateway(gateway_mapping())
    for request_bytes in (
        head(method, path),
        head(method, path, "Content-Type: text/plain", "Content-Length: 5") + b"hello",
        head(method, path, "Transfer-Encoding: chunked") + b"5\r\nhello\r\n0\r\n\r\n",
    ):
        answer = await exchange(gateway.ws.port, request_bytes)
        assert answer.status == 405
        assert answer.header("Allow") == "GET, HEAD"
        assert page_bytes() not in answer.body


@pytest.mark.parametrize(
    ("request_bytes", "status", "allow"),
    [
        (head("POST", "/ws", *UPGRADE), 405, "GET"),
        (head("HEAD", "/ws"), 405, "GET"),
        (head("GET", "/ws", *UPGRADE, "Content-Length: 3") + b"abc", 400, None),
        (head("GET", "/", "Content-Length: 3") + b"abc", 400, None),
        (head("HEAD", "/nope"), 404, None),
    ],
)
async def test_methods_and_bodies_elsewhere(
    request_bytes: bytes, status: int, allow: str | None, make_gateway: Any
) -> None:
    gateway: Gateway = await make_gateway(gateway_mapping())
    answer = await exchange(gateway.ws.port, request_bytes, head_only=b"HEAD" in request_bytes)
    assert answer.status == status
    assert answer.headers.get("allow") == ([allow] if allow else None)


# --- heads that are not HTTP get an HTTP answer too ----------------------------------------

UNREADABLE = {
    "bare LF": (b"GET / HTTP/1.1\nHost: h\n\n", 400),
    "no version": (b"GET /\r\n\r\n", 400),
    "two spaces": (b"GET  / HTTP/1.1\r\n\r\n", 400),
    "HTTP/2": (b"GET / HTTP/2\r\n\r\n", 505),
    "no colon": (b"GET / HTTP/1.1\r\nHost h\r\n\r\n", 400),
    "control character": (b"GET / HTTP/1.1\r\nHost: h\x7f\r\n\r\n", 400),
    "folded header": (b"GET / HTTP/1.1\r\nHost: h\r\n x\r\n\r\n", 400),
    "non-ASCII target": ("GET /é HTTP/1.1\r\n\r\n".encode(), 400),
    "bad Content-Length": (b"GET / HTTP/1.1\r\nContent-Length: 00x\r\n\r\n", 400),
    "long request line": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    "long header": (b"GET / HTTP/1.1\r\nX: " + b"a" * 9000 + b"\r\n\r\n", 431),
    "many headers": (b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * 129 + b"\r\n", 431),
    "huge head": (b"GET / HTTP/1.1\r\n" + (b"X: " + b"a" * 8000 + b"\r\n") * 9 + b"\r\n", 431),
}


@pytest.mark.parametrize("request_bytes, status", UNREADABLE.values(), ids=UNREADABLE.keys())
async def test_an_unreadable_head_gets_a_clear_answer(
    request_bytes: bytes, status: int, make_gateway: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    gateway: Gateway = await make_gateway(gateway_mapping())
    answer = await exchange(gateway.ws.port, request_bytes)
    assert answer.status == status
    assert_not_frameable(answer)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# --- item 5: ping floods -----------------------------------------------------------------

MAX_PENDING = 65536


async def test_a_client_that_pings_and_never_reads_is_closed_within_a_bound(
    make_gateway: Any, make_client: Any
) -> None:
    gateway: Gateway = await make_gateway(
        gateway_mapping(limits={"max_pending_bytes": MAX_PENDING, "ping_interval": 0})
    )
    port = gateway.ws.port
    bystander = await make_client(gateway.url)
    # A receive buffer as small as the kernel allows, so that the pongs pile up in the
    # gateway rather than in this socket (set before connecting: it sets the TCP window).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(handshake_request(port))
    async with asyncio.timeout(WAIT):
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101 ")
    # The gateway's side of this connection, to watch what waits in its memory.
    [flooder] = [
        c for c in gateway.ws.connections if c.ws.remote_address[1] == sock.getsockname()[1]
    ]
    pings = masked_frame(0x9, b"p" * 125) * 512  # 65 KiB of the largest pings
    sent = peak = 0
    # The kernel's buffers on both sides hold some of the flood once the gateway stops
    # reading; past them (plus a margin), an unbounded gateway would still be answering.
    bound = kernel_buffer_bytes() + 16 * 2**20
    closed = False
    try:
        while sent < bound:
            writer.write(pings)
            async with asyncio.timeout(WAIT):
                await writer.drain()
            sent += len(pings)
            peak = max(peak, flooder.ws.transport.get_write_buffer_size())
    except (ConnectionResetError, BrokenPipeError):
        closed = True
    finally:
        writer.close()
    assert closed, f"still open after {sent} bytes of pings"
    # What waits in the gateway's memory for this client: the bound, plus the pongs of one
    # read (asyncio reads at most 256 KiB at a time).
    assert peak <= MAX_PENDING + 256 * 1024, peak
    assert gateway.ws.slow_consumers_closed == 1
    # The others are served as before.
    assert (await bystander.call({"type": "ping"}))["type"] == "pong"


def kernel_buffer_bytes() -> int:
    """The most a TCP receive buffer and a send buffer can hold together on this system."""
    try:
        with open("/proc/sys/net/ipv4/tcp_rmem") as rmem:
            receive = int(rmem.read().split()[2])
        with open("/proc/sys/net/ipv4/tcp_wmem") as wmem:
            return receive + int(wmem.read().split()[2])
    except (OSError, ValueError, IndexError):
        return 48 * 2**20
