"""What the CoAP side reports: answers as plain values, its errors, and failures in words a user
can act on.

`CoapAnswer` is one response or notification, block-wise ones reassembled; the gateway and the
hub see nothing of aiocoap's messages. `UpstreamError` is what a request frame turns into
``upstream_error``; `describe` is the text of a failure, for ``upstream_error`` messages and
``status`` reasons alike.

aiocoap reports every failure of the network as a ``NetworkError`` whose text is its class
name ("Network error: NetworkError"), with the cause, if any, attached. `describe` says
instead what failed: the port is unreachable, there is no route, the sensor reset the
exchange, the retransmissions ran out; and whether an ICMP error said so (`IcmpError`, raised
by translator/coap/batch.py for an ICMP error it vetted).
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, replace
from typing import Any, Final

from aiocoap import error as coap_error

__all__ = [
    "CoapAnswer",
    "IcmpError",
    "RepresentationTooLarge",
    "UpstreamError",
    "code_text",
    "describe",
    "to_answer",
]


@dataclass(frozen=True, slots=True)
class CoapAnswer:
    """One CoAP response or notification, as plain values (block-wise ones reassembled)."""

    code: str
    cf: int | None
    payload: bytes
    max_age: int | None
    observe: int | None
    observable: bool | None = None
    """On the answer to a registration: whether the sensor accepted the observation (the
    answer carried Observe). None on notifications and poll answers: they do not say."""
    too_large: int | None = None
    """Set when the representation exceeded ``max_representation`` and was dropped (then
    `payload` is empty): the bytes received before the gateway stopped, or the size the
    sensor announced in Size2."""
    broken: str | None = None
    """Set when the representation could not be taken (then `payload` is empty): why, such
    as a block-wise transfer that broke RFC 7959 or took longer than its deadline."""


class UpstreamError(Exception):
    """A request's sensor is unreachable, reset it, or sent something unusable (protocol
    error `upstream_error`)."""


class RepresentationTooLarge(UpstreamError):
    """A representation exceeded the limit (``[limits] max_upstream_bytes``).

    `size` is what was known when the gateway stopped: the bytes received, or the size the
    sensor announced in Size2. `answer` is the representation's answer without its payload
    (code, Content-Format, Max-Age, Observe of its first block), with `too_large` set.
    """

    def __init__(self, limit: int, size: int, announced: bool, head: Any) -> None:
        how = "announced in Size2" if announced else "received before stopping"
        super().__init__(
            f"representation larger than max_upstream_bytes ({limit} bytes): "
            f"{size} bytes {how}"
        )
        self.limit = limit
        self.size = size
        self.answer = replace(to_answer(head, with_payload=False), too_large=size)


class IcmpError(OSError):
    """An ICMP error about a request in flight, vetted by the guard."""


def code_text(code: Any) -> str:
    return str(code.dotted)  # "2.05"


def to_answer(message: Any, *, with_payload: bool = True) -> CoapAnswer:
    """The plain values of an aiocoap message."""
    cf = message.opt.content_format
    return CoapAnswer(
        code=code_text(message.code),
        cf=None if cf is None else int(cf),
        payload=bytes(message.payload) if with_payload else b"",
        max_age=message.opt.max_age,
        observe=message.opt.observe,
    )


_ERRNO_TEXT: Final = {
    errno.ECONNREFUSED: "port unreachable: nothing listens on that UDP port",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "no route to the network",
    errno.EHOSTDOWN: "host down",
    errno.EACCES: "the operating system refused to send (a firewall, or a broadcast address)",
    errno.EPERM: "the operating system refused to send (a firewall)",
    errno.EMSGSIZE: "message too large for the path (MTU)",
    errno.EADDRNOTAVAIL: "the address cannot be reached from this host",
}


def describe(exc: BaseException) -> str:
    """What failed, in one line a user can act on (see the module docstring)."""
    if isinstance(exc, coap_error.MessageError):
        return "the sensor reset the exchange (RST): it does not know the request"
    if isinstance(exc, coap_error.ConRetransmitsExceeded):
        return "no answer: every retransmission of the confirmable request went unanswered"
    cause = exc if isinstance(exc, OSError) else exc.__cause__
    if isinstance(cause, OSError) and cause.errno is not None:
        text = _ERRNO_TEXT.get(cause.errno) or os.strerror(cause.errno).lower()
        return f"{text} (ICMP error)" if isinstance(cause, IcmpError) else text
    text = str(exc) or type(exc).__name__
    if isinstance(exc, coap_error.NetworkError) and text.startswith("Network error: "):
        text = f"network error ({type(exc).__name__})"
    return text.splitlines()[0][:200]
