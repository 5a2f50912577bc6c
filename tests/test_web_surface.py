"""The web surface of the gateway's port, attacked with raw bytes (issue 20, round 3).

Real gateway on loopback, real sockets: each test sends what an attacker sent and checks
what must and must not come back (answers, logs, memory). Every wait is on bytes or EOF,
bounded by `WAIT`.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import quote

import pytest

from translator.gateway import Gateway
from translator.logs import REDACTED, install_redaction, redact

from .conftest import WAIT

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


async def exchange(port: int, data: bytes) -> bytes:
    """Send `data` on a fresh TCP connection, then read everything until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        async with asyncio.timeout(WAIT):
            chunks = []
            while True:
                try:
                    chunk = await reader.read(65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
        return b"".join(chunks)
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
    await exchange(gateway.ws.port, request_text.encode("latin-1"))
    await gateway.stop()  # every record of the connection is written by now
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
