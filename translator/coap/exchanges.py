"""Requests and block fetches over aiocoap: the I/O that drives translator/coap/blocks.py.

Block-wise representations (RFC 7959), of notifications, poll answers and client requests
alike, are completed by one loop, `complete`: it feeds each block to a `BlockAssembler`
and fetches what it asks for, so every rule a sensor must keep is the assembler's. It stops
at the first block that takes the representation past ``max_representation`` (``[limits]
max_upstream_bytes``), or before fetching anything when the sensor's Size2 announces more
(every request asks for Size2). The caller bounds its time: a request by its timeout, an
observation's representation by ``[supervision] transfer_timeout``.

Client requests keep aiocoap's Block1 handling for request payloads larger than one message
(`compat.block1_request`), which hands over the response's first block; each later block is
the request again with Block2 and a fresh token (RFC 7959 §3.3). The blocks of an observed
resource are GETs without Observe (§2.6).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any, Final

import aiocoap
from aiocoap import error as coap_error
from aiocoap.numbers.codes import Code

from translator import compat
from translator.coap.answers import (
    CoapAnswer,
    RepresentationTooLarge,
    UpstreamError,
    code_text,
    describe,
    to_answer,
)
from translator.coap.blocks import (
    Block,
    BlockAssembler,
    Broken,
    Changed,
    Decision,
    Done,
    RequestBlock,
    TooLarge,
)

__all__ = [
    "MAX_BLOCK_RESTARTS",
    "BlockFetcher",
    "BrokenTransfer",
    "RepresentationChanged",
    "block_of",
    "complete",
    "get_block",
    "observed_blocks",
    "send",
    "unusable",
    "whole",
]

log = logging.getLogger(__name__)

MAX_BLOCK_RESTARTS: Final = 2
"""A block-wise fetch of a GET whose representation changed under it (another ETag) starts
over from block 0 at most this many times."""

METHOD_CODES: Final = {
    "GET": Code.GET,
    "POST": Code.POST,
    "PUT": Code.PUT,
    "DELETE": Code.DELETE,
    "FETCH": Code.FETCH,
    "PATCH": Code.PATCH,
    "iPATCH": Code.iPATCH,
}

BlockFetcher = Callable[[int, int], Awaitable[Any]]
"""Fetches block `number` of a representation with block size 2 ** (`size_exponent` + 4)
and returns the sensor's response (an aiocoap message)."""


class BrokenTransfer(UpstreamError):
    """The representation that `head` starts could not be completed: the sensor broke a
    rule of block-wise transfers (translator/coap/blocks.py), or the transfer missed its
    deadline. `answer` is `head`'s answer without payload, with `broken` set."""

    def __init__(self, reason: str, head: Any) -> None:
        super().__init__(reason)
        self.answer = replace(to_answer(head, with_payload=False), broken=reason)


class RepresentationChanged(UpstreamError):
    """The representation kept changing during the block-wise transfer."""

    def __init__(self) -> None:
        super().__init__("the representation changed during the block-wise transfer")


def block_of(message: Any) -> Block:
    """What the block rules need of an aiocoap response."""
    block2 = message.opt.block2
    size2 = message.opt.size2
    return Block(
        code=code_text(message.code),
        number=None if block2 is None else block2.block_number,
        more=False if block2 is None else bool(block2.more),
        size_exponent=0 if block2 is None else block2.size_exponent,
        payload=bytes(message.payload),
        etag=message.opt.etag,
        size2=None if size2 is None else int(size2),
        message=message,
    )


async def complete(
    first: Any, fetch: BlockFetcher, limit: int, restarts: int = MAX_BLOCK_RESTARTS
) -> CoapAnswer:
    """The whole representation that the response `first` starts (itself when it is whole),
    its other blocks fetched with `fetch`. Raises RepresentationTooLarge past `limit`,
    BrokenTransfer when the sensor breaks a rule, RepresentationChanged when the ETag kept
    changing after `restarts` restarts, and whatever `fetch` raises."""
    assembler = BlockAssembler(limit, restarts)
    decision = assembler.start(block_of(first))
    while isinstance(decision, RequestBlock):
        block = await fetch(decision.number, decision.size_exponent)
        decision = assembler.feed(block_of(block))
    return _conclude(decision, first, limit)


def whole(first: Any, limit: int) -> CoapAnswer | None:
    """`complete` for a response that needs no other block; None when it does."""
    decision = BlockAssembler(limit).start(block_of(first))
    return None if isinstance(decision, RequestBlock) else _conclude(decision, first, limit)


def _conclude(decision: Decision, first: Any, limit: int) -> CoapAnswer:
    if isinstance(decision, Done):
        head: Any = decision.head.message
        cf = head.opt.content_format
        return CoapAnswer(
            code=code_text(head.code),
            cf=None if cf is None else int(cf),
            payload=decision.payload,
            max_age=head.opt.max_age,
            observe=first.opt.observe,
        )
    if isinstance(decision, TooLarge):
        raise RepresentationTooLarge(limit, decision.size, decision.announced,
                                     decision.head.message)
    if isinstance(decision, Broken):
        raise BrokenTransfer(f"block-wise transfer broken: {decision.reason}", first)
    assert isinstance(decision, Changed)
    raise RepresentationChanged()


async def get_block(context: Any, message: aiocoap.Message, timeout: float | None) -> Any:
    """Send one block request (a fresh token, no Observe, no aiocoap block-wise)."""
    pending = context.request(message, handle_blockwise=False)
    try:
        async with asyncio.timeout(timeout):
            return await pending.response
    finally:
        if not pending.response.done():
            pending.response.cancel()


def observed_blocks(context: Any, uri: str, timeout: float) -> BlockFetcher:
    """The later blocks of an observed resource's representation: GETs with a fresh token
    and no Observe (RFC 7959 §2.6), each within `timeout`."""

    def fetch(number: int, size_exponent: int) -> Awaitable[Any]:
        message = aiocoap.Message(
            code=Code.GET, uri=uri, block2=(number, False, size_exponent), size2=0
        )
        return get_block(context, message, timeout)

    return fetch


def repeated_blocks(context: Any, request: aiocoap.Message) -> BlockFetcher:
    """The later blocks of the answer to `request`: the request again with Block2 and a
    fresh token, without its payload (as aiocoap does; RFC 7959 §3.3), to the endpoint
    that answered."""

    def fetch(number: int, size_exponent: int) -> Awaitable[Any]:
        message = request.copy(
            payload=b"", mid=None, token=None, block1=None, observe=None,
            block2=(number, False, size_exponent),
        )
        return get_block(context, message, None)

    return fetch


def request_message(
    method: str, uri: str, payload: bytes, cf: int | None, accept: int | None,
    confirmable: bool,
) -> aiocoap.Message:
    message = aiocoap.Message(
        code=METHOD_CODES[method],
        uri=uri,
        payload=payload,
        size2=0,  # the sensor may announce a block-wise answer's size
        transport_tuning=aiocoap.Reliable() if confirmable else aiocoap.Unreliable(),
    )
    if cf is not None:
        message.opt.content_format = cf
    if accept is not None:
        message.opt.accept = accept
    return message


async def send(
    context: Any, message: aiocoap.Message, timeout: float, limit: int
) -> CoapAnswer:
    """Send `message` (in Block1 blocks when its payload needs them) and complete a
    block-wise answer, all within `timeout` (TimeoutError); UpstreamError for a failure,
    RepresentationTooLarge past `limit`."""
    pending = compat.block1_request(context, message)
    try:
        async with asyncio.timeout(timeout):
            first = await pending.response
            # Only a GET may start over when the representation changes under it.
            restarts = MAX_BLOCK_RESTARTS if message.code == Code.GET else 0
            return await complete(first, repeated_blocks(context, message), limit, restarts)
    except (TimeoutError, asyncio.CancelledError):
        # Frees the token. (A CON goes on being retransmitted below: aiocoap's UDP
        # message layer cannot cancel one.)
        pending.response.cancel()
        raise
    except (coap_error.Error, OSError) as exc:
        raise UpstreamError(describe(exc)) from exc



def unusable(first: Any, failure: BaseException) -> CoapAnswer | None:
    """What an observation reports when the representation that `first` starts could not be
    taken because of `failure`: the first block's answer without payload, saying why
    (`too_large` or `broken`), so that subscribers are told rather than left guessing. None
    when the representation kept changing: the notification of its new state is on its way.
    """
    if isinstance(failure, RepresentationChanged):
        return None
    if isinstance(failure, (RepresentationTooLarge, BrokenTransfer)):
        return failure.answer
    reason = f"block-wise transfer incomplete: {describe(failure)}"
    return replace(to_answer(first, with_payload=False), broken=reason)
