"""Block-wise representations (RFC 7959 §2), assembled without I/O: feed a block, get what to
do next.

The caller (translator/coap/exchanges.py) sends what `BlockAssembler` asks for and feeds it
the answers; every rule about what a sensor may send is here, as plain code:

    block received                                     decision
    -------------------------------------------------  ------------------------------------------
    the first answer, whole (no Block2, or block 0     Done (TooLarge past the limit)
      with M = 0)
    the first answer is not block 0                    Broken
    SZX 7 (BERT: CoAP over TCP only, RFC 8323 §6)      Broken
    a later block with another code than the first's   Broken ("block 2 answered 4.04")
    a later block without Block2 (the sensor sent      Done: it stands on its own
      the whole representation after all)
    a later block with another ETag than block 0's     RequestBlock(0): the representation
                                                       changed, start over (`restarts` times at
                                                       most), then Changed
    a larger SZX than the one asked for                Broken: the size may only shrink (§2.4)
    a block that does not start at the bytes received  Broken: the number goes up by one
    M = 1 and a payload other than the block size      Broken: only the last block is short
                                                       (§2.2); a shorter one would have the
                                                       same block asked for again and again
    M = 0 and a payload longer than the block size     Broken
    the bytes received, or Size2 on a block with       TooLarge (`announced` for Size2)
      M = 1, past `limit`
    M = 1, all of the above fine                       RequestBlock(next number, its SZX)
    M = 0                                              Done(the representation)

Every block with M = 1 adds exactly its size, 16 bytes at least, so one attempt ends within
``limit // 16 + 2`` exchanges and the whole transfer within ``restarts + 1`` times that
(`max_exchanges`). The caller bounds the time it takes with a deadline.

A block is what the rules need of a response (`Block`), with the caller's message attached
(`Block.message`) and handed back in `Done` and `TooLarge`, so that the caller can take the
representation's code, Content-Format and Max-Age from the block 0 that the payload belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "BERT_EXPONENT",
    "Block",
    "BlockAssembler",
    "Broken",
    "Changed",
    "Decision",
    "Done",
    "RequestBlock",
    "TooLarge",
    "block_size",
    "max_exchanges",
]

BERT_EXPONENT: Final = 7
"""SZX 7 means BERT (RFC 8323 §6), which only CoAP over reliable transports has."""
SMALLEST_BLOCK: Final = 16


def block_size(size_exponent: int) -> int:
    """The block size of SZX `size_exponent`: 2 ** (SZX + 4) bytes (RFC 7959 §2.2)."""
    return 1 << (size_exponent + 4)


def max_exchanges(limit: int, restarts: int) -> int:
    """The most blocks a transfer bounded by `limit` bytes can ask for (module docstring)."""
    return (restarts + 1) * (limit // SMALLEST_BLOCK + 2)


@dataclass(frozen=True, slots=True)
class Block:
    """What the rules need of one response: its code, its Block2 option (None without one),
    payload, ETag and Size2, and the caller's message it came from."""

    code: str
    number: int | None
    more: bool
    size_exponent: int
    payload: bytes
    etag: bytes | None = None
    size2: int | None = None
    message: object = field(default=None, compare=False, repr=False)


@dataclass(frozen=True, slots=True)
class RequestBlock:
    """Ask for block `number` of size 2 ** (`size_exponent` + 4), then `feed` the answer."""

    number: int
    size_exponent: int


@dataclass(frozen=True, slots=True)
class Done:
    """The whole representation: `payload`, and `head`, the block it starts with (or the
    whole answer)."""

    payload: bytes
    head: Block


@dataclass(frozen=True, slots=True)
class TooLarge:
    """Past the limit: `size` bytes received, or announced in Size2 (`announced`)."""

    size: int
    announced: bool
    head: Block


@dataclass(frozen=True, slots=True)
class Broken:
    """The sensor broke a rule of RFC 7959; `reason` says which."""

    reason: str


@dataclass(frozen=True, slots=True)
class Changed:
    """The representation kept changing (another ETag) after every restart."""


Decision = RequestBlock | Done | TooLarge | Broken | Changed


class BlockAssembler:
    """One block-wise transfer: `start` with the first answer, then `feed` each block asked
    for, until the decision is not a `RequestBlock`. At most `limit` bytes are taken; a
    change of ETag starts over from block 0 at most `restarts` times."""

    __slots__ = ("_asked", "_head", "_payload", "_restarts", "_started", "exchanges", "limit")

    def __init__(self, limit: int, restarts: int = 0) -> None:
        self.limit = limit
        self._restarts = restarts
        self._payload = bytearray()
        self._head: Block | None = None
        self._asked: RequestBlock | None = None
        self._started = False
        self.exchanges = 0
        """Blocks asked for so far (at most `max_exchanges`)."""

    def start(self, first: Block) -> Decision:
        """The first answer of the transfer (to the request itself)."""
        if self._started:
            raise RuntimeError("the transfer has started already")
        self._started = True
        return self._first(first)

    def feed(self, block: Block) -> Decision:
        """The answer to the `RequestBlock` decided last."""
        asked, self._asked = self._asked, None
        if asked is None or self._head is None:
            raise RuntimeError("no block was asked for")
        head = self._head
        if block.code != head.code:
            return Broken(f"block {asked.number} answered {block.code}, block 0 {head.code}")
        if asked.number == 0:  # starting over
            self._payload.clear()
            return self._first(block)
        if block.number is None:
            return self._whole(block)
        if block.etag != head.etag:
            return self._restart(asked)
        if block.size_exponent == BERT_EXPONENT:
            return Broken(f"block {block.number} has SZX 7 (BERT), which UDP does not have")
        if block.size_exponent > asked.size_exponent:
            return Broken(
                f"block {block.number} is {block_size(block.size_exponent)} bytes, larger "
                f"than the {block_size(asked.size_exponent)} asked for (RFC 7959 §2.4: the "
                "size may only shrink)"
            )
        size = block_size(block.size_exponent)
        received = len(self._payload)
        if block.number * size != received:
            return Broken(
                f"block {block.number} of {size} bytes is not the one asked for (block "
                f"{asked.number}: bytes from {received} on)"
            )
        return self._take(block)

    # -- the rules -----------------------------------------------------------------------------

    def _first(self, block: Block) -> Decision:
        if block.number is None:
            return self._whole(block)
        if block.size_exponent == BERT_EXPONENT:
            return Broken("the first block has SZX 7 (BERT), which UDP does not have")
        if block.number != 0:
            return Broken(f"the first block is block {block.number}, not 0")
        self._head = block
        return self._take(block)

    def _whole(self, block: Block) -> Decision:
        if len(block.payload) > self.limit:
            return TooLarge(len(block.payload), False, block)
        return Done(block.payload, block)

    def _take(self, block: Block) -> Decision:
        """A block in its place (number and size checked): check its length, append it."""
        assert self._head is not None
        size = block_size(block.size_exponent)
        length = len(block.payload)
        if block.more and length != size:
            return Broken(
                f"block {block.number} has {length} bytes and more to follow, not the block "
                f"size {size} (RFC 7959 §2.2: only the last block may be shorter)"
            )
        if length > size:
            return Broken(f"block {block.number} has {length} bytes, more than its size {size}")
        self._payload += block.payload
        received = len(self._payload)
        if received > self.limit:
            return TooLarge(received, False, self._head)
        if block.more and block.size2 is not None and block.size2 > self.limit:
            return TooLarge(block.size2, True, self._head)
        if not block.more:
            return Done(bytes(self._payload), self._head)
        return self._ask(RequestBlock(received // size, block.size_exponent))

    def _restart(self, asked: RequestBlock) -> Decision:
        if self._restarts <= 0:
            return Changed()
        self._restarts -= 1
        return self._ask(RequestBlock(0, asked.size_exponent))

    def _ask(self, request: RequestBlock) -> RequestBlock:
        self._asked = request
        self.exchanges += 1
        return request
