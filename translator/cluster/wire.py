"""What the owner of a resource publishes on its subject, byte for byte: pure, no I/O.

Every node relays the owner's frame text to its clients unchanged, but two kinds of client
need more than the JSON text: a CBOR client gets a value that came from the sensor as CBOR
as the sensor's very bytes (`NotifyMeta.cbor_value`), and an RFC 8323 client
(`/.well-known/coap`) gets the sensor's representation itself (its payload, with the code,
Content-Format and Max-Age the notify names). Neither can be rebuilt from the JSON text, so a
notify travels with the sensor's payload:

    <frame text, UTF-8>                                   a status frame (or a notify
                                                          published without its payload)
    <frame text, UTF-8> LF <flags: 1 byte> <payload>      a notify and the sensor's bytes

The frame text is compact JSON (`frames.dumps`), which never holds a raw line feed, so the
first LF ends it. Flags: `CBOR_ITEM` (the payload is the value's CBOR data item, as the hub
checked it), `DROPPED` (the representation was dropped, too large or broken: no payload).
A message without LF is a frame alone (what earlier versions published), so a stream
written by them is still read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

CBOR_ITEM: Final = 0x01
DROPPED: Final = 0x02
_KNOWN: Final = CBOR_ITEM | DROPPED


@dataclass(frozen=True, slots=True)
class Published:
    """One message on a resource's subject."""

    text: str
    """The notify or status frame, as every node's clients get it."""
    payload: bytes | None = None
    """A notify's representation as the sensor sent it; None: not carried (a status)."""
    cbor_item: bool = False
    """`payload` is the notify's `value` as one CBOR data item (cf 60, 112, ...)."""
    dropped: bool = False
    """The representation was dropped (larger than allowed, or broken): `payload` is
    empty and the notify's `decode_error` says why."""

    @property
    def cbor_value(self) -> bytes | None:
        """What a CBOR client gets as the value (`NotifyMeta.cbor_value`)."""
        return self.payload if self.cbor_item else None

    def encode(self) -> bytes:
        text = self.text.encode()
        if self.payload is None:
            return text
        flags = (CBOR_ITEM if self.cbor_item else 0) | (DROPPED if self.dropped else 0)
        return b"".join((text, b"\n", bytes((flags,)), self.payload))


def decode(data: bytes) -> Published:
    """A message from a resource's subject; ValueError for one no node would publish."""
    text, newline, rest = data.partition(b"\n")
    try:
        frame_text = text.decode()
    except UnicodeDecodeError as exc:
        raise ValueError(f"the frame is not UTF-8: {exc}") from None
    if not newline:
        return Published(frame_text)
    if not rest:
        raise ValueError("a line feed without the flags byte")
    flags = rest[0]
    if flags & ~_KNOWN:
        raise ValueError(f"unknown flags {flags:#04x}")
    return Published(frame_text, rest[1:], bool(flags & CBOR_ITEM), bool(flags & DROPPED))
