"""What the gateway's log records may contain: no secret a client presented.

This module owns one rule for every log record of the process, whatever logger made it (the
gateway's, websockets', aiocoap's, asyncio's) and whatever handler writes it: the text of the
message, the text of an attached exception and the stack text are redacted when the record
is created, before any handler or formatter sees it.

What is redacted (see `redact`), so that no spelling the authentication accepts survives:

* the query of a URL or request target (`/ws?access_token=...` becomes `/ws?<redacted>`),
  however the method, the path or the HTTP version look, and whether or not the request was
  well formed; CoAP URIs keep theirs (no secret travels there, and it helps debugging);
* the value of any `name=value` pair whose name, percent- and plus-decoded and in any case,
  contains `token` (`access%5Ftoken=...`, `ACCESS_TOKEN=...`, in a `Referer` as anywhere);
* everything after `Authorization` (with or without the colon) and after `Bearer` on a line.

Records are redacted by a log record factory rather than by a `logging.Filter`: a filter on a
logger sees only the records that logger creates (not those of its children, nor asyncio's),
and a filter on a handler misses handlers added later, such as a test's capture handler.
"""

from __future__ import annotations

import logging
import re
from typing import Any, Final
from urllib.parse import unquote_plus

REDACTED: Final = "<redacted>"

_URL_QUERY: Final = re.compile(
    # An absolute path or URL followed by a query: the query goes, up to the next space.
    r"(?P<target>(?:(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://[^\s/?#]*)?/[^\s?#]*)\?\S*"
)
_NAMED_VALUE: Final = re.compile(r"(?P<name>[^\s=&?]+)=(?P<value>[^\s&]*)")
_AUTHORIZATION: Final = re.compile(r"(?i)(authorization\b[^\S\r\n]*:?[^\S\r\n]*)[^\r\n]+")
_BEARER: Final = re.compile(r"(?i)\b(bearer[^\S\r\n]+)[^\r\n]+")
_COAP_SCHEMES: Final = frozenset({"coap", "coaps", "coap+tcp", "coaps+tcp", "coap+ws", "coaps+ws"})


def redact(text: str) -> str:
    """`text` without the secrets a client may present (see the module docstring)."""
    if "?" in text:
        text = _URL_QUERY.sub(_without_query, text)
    if "=" in text:
        text = _NAMED_VALUE.sub(_without_token_value, text)
    lowered = text.lower()
    if "authorization" in lowered:
        text = _AUTHORIZATION.sub(rf"\1{REDACTED}", text)
    if "bearer" in lowered:
        text = _BEARER.sub(rf"\1{REDACTED}", text)
    return text


def _without_query(match: re.Match[str]) -> str:
    scheme = match["scheme"]
    if scheme is not None and scheme.lower() in _COAP_SCHEMES:
        return match[0]
    return f"{match['target']}?{REDACTED}"


def _without_token_value(match: re.Match[str]) -> str:
    name = match["name"]
    # Decode as often as a client could have encoded it (bounded: each round shortens it).
    for _ in range(4):
        decoded = unquote_plus(name)
        if decoded == name:
            break
        name = decoded
    if "token" not in name.lower() or match["value"] == REDACTED:
        return match[0]
    return f"{match['name']}={REDACTED}"


def redact_record(record: logging.LogRecord) -> None:
    """Redact `record` in place: its message (arguments merged in), exception and stack text.

    The exception itself is dropped from the record once its text is kept (redacted): a
    handler that formatted `exc_info` on its own would show the original text again.
    Never raises: a record whose arguments do not format keeps its format string, redacted,
    without the arguments (which could hold a secret that no pattern recognizes).
    """
    try:
        message = record.getMessage()
    except Exception:
        message = f"{record.msg!r} (its arguments do not format)"
    redacted = redact(message)
    if redacted != message:
        record.msg, record.args = redacted, None
    if record.exc_info and record.exc_info[0] is not None:
        if not record.exc_text:
            record.exc_text = _EXCEPTION_FORMATTER.formatException(record.exc_info)
        record.exc_info = None
    if record.exc_text:
        record.exc_text = redact(record.exc_text)
    if record.stack_info:
        record.stack_info = redact(record.stack_info)


_EXCEPTION_FORMATTER: Final = logging.Formatter()


def install_redaction() -> None:
    """Redact every log record created from now on in this process (idempotent)."""
    previous = logging.getLogRecordFactory()
    if getattr(previous, "redacts_secrets", False):
        return

    def redacting_factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        redact_record(record)
        return record

    redacting_factory.redacts_secrets = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting_factory)
