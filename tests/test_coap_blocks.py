"""Block-wise transfers (RFC 7959), without sockets.

The rules of translator/coap/blocks.py one by one on `BlockAssembler`, a property that any
sequence of blocks a sensor can send ends within `max_exchanges`, and `exchanges.complete`
(the loop that drives the assembler) fed by a stand-in sensor.
"""

from __future__ import annotations

from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from hypothesis import given, settings
from hypothesis import strategies as st

from translator.coap import exchanges
from translator.coap.answers import CoapAnswer, RepresentationTooLarge, UpstreamError
from translator.coap.blocks import (
    Block,
    BlockAssembler,
    Broken,
    Changed,
    Done,
    RequestBlock,
    TooLarge,
    max_exchanges,
)

SZX_1024 = 6


def block(number: int | None, more: bool, payload: bytes, szx: int = SZX_1024,
          etag: bytes | None = b"1", size2: int | None = None, code: str = "2.05") -> Block:
    return Block(code, number, more, szx, payload, etag, size2)


def full(number: int, szx: int = SZX_1024, etag: bytes | None = b"1") -> Block:
    return block(number, True, b"x" * (1 << (szx + 4)), szx, etag)


# --- the rules --------------------------------------------------------------------------------


def test_a_whole_answer_is_done_at_once() -> None:
    assert BlockAssembler(100).start(block(None, False, b"abc")) == Done(
        b"abc", block(None, False, b"abc"))
    assert isinstance(BlockAssembler(100).start(block(0, False, b"abc")), Done)


def test_blocks_in_order_are_assembled() -> None:
    assembler = BlockAssembler(5000)
    assert assembler.start(full(0)) == RequestBlock(1, SZX_1024)
    assert assembler.feed(full(1)) == RequestBlock(2, SZX_1024)
    done = assembler.feed(block(2, False, b"end"))
    assert isinstance(done, Done) and done.payload == b"x" * 2048 + b"end"
    assert assembler.exchanges == 2


@pytest.mark.parametrize("length", [0, 1, 1023])
def test_a_short_block_with_more_to_follow_is_broken(length: int) -> None:
    # The fault: a short block 1 with M = 1 had the same block asked for forever.
    assembler = BlockAssembler(1 << 20)
    assembler.start(full(0))
    decision = assembler.feed(block(1, True, b"y" * length))
    assert isinstance(decision, Broken)
    assert f"block 1 has {length} bytes and more to follow" in decision.reason
    short_first = BlockAssembler(1 << 20).start(block(0, True, b"y" * length))
    assert isinstance(short_first, Broken)


def test_a_block_longer_than_its_size_is_broken() -> None:
    assembler = BlockAssembler(1 << 20)
    assembler.start(full(0))
    assert isinstance(assembler.feed(block(1, False, b"y" * 1025)), Broken)


def test_the_number_must_go_up_by_one() -> None:
    for number in (0, 2, 7):
        assembler = BlockAssembler(1 << 20)
        assembler.start(full(0))
        decision = assembler.feed(full(number))
        assert isinstance(decision, Broken), number
        assert "is not the one asked for" in decision.reason


def test_the_first_block_must_be_block_0() -> None:
    decision = BlockAssembler(5000).start(full(1))
    assert decision == Broken("the first block is block 1, not 0")


def test_the_size_may_shrink_but_not_grow() -> None:
    assembler = BlockAssembler(1 << 20)
    assert assembler.start(full(0, szx=5)) == RequestBlock(1, 5)  # 512 bytes
    grown = assembler.feed(full(0, szx=6))  # 1024 bytes at 0: larger than asked
    assert isinstance(grown, Broken) and "may only shrink" in grown.reason

    shrinking = BlockAssembler(1 << 20)
    shrinking.start(full(0, szx=6))
    # Asked for block 1 of 1024 bytes, the sensor answers block 2 of 512 (same bytes).
    assert shrinking.feed(full(2, szx=5)) == RequestBlock(3, 5)
    done = shrinking.feed(block(3, False, b"z", szx=5))
    assert isinstance(done, Done) and len(done.payload) == 1024 + 512 + 1


def test_bert_is_not_for_udp() -> None:
    assert isinstance(BlockAssembler(1 << 20).start(full(0, szx=7)), Broken)


def test_a_later_block_with_another_code_is_broken() -> None:
    assembler = BlockAssembler(1 << 20)
    assembler.start(full(0))
    assert assembler.feed(block(1, False, b"", code="4.04")) == Broken(
        "block 1 answered 4.04, block 0 2.05")


def test_the_total_is_bounded_by_the_limit_and_size2() -> None:
    assembler = BlockAssembler(2048)
    assembler.start(full(0))
    assembler.feed(full(1))
    assert assembler.feed(full(2)) == TooLarge(3072, False, full(0))
    first = block(0, True, b"x" * 1024, size2=10_000)
    assert BlockAssembler(4096).start(first) == TooLarge(10_000, True, first)
    assert BlockAssembler(10).start(block(None, False, b"x" * 11)) == TooLarge(
        11, False, block(None, False, b"x" * 11))


def test_another_etag_starts_over_then_gives_up() -> None:
    assembler = BlockAssembler(1 << 20, restarts=1)
    assembler.start(full(0, etag=b"1"))
    assert assembler.feed(full(1, etag=b"2")) == RequestBlock(0, SZX_1024)
    assert assembler.feed(full(0, etag=b"2")) == RequestBlock(1, SZX_1024)
    assert assembler.feed(full(1, etag=b"3")) == Changed()


def test_feeding_what_was_not_asked_for_is_a_bug() -> None:
    assembler = BlockAssembler(100)
    with pytest.raises(RuntimeError):
        assembler.feed(full(0))
    assembler.start(block(None, False, b""))
    with pytest.raises(RuntimeError):
        assembler.start(block(None, False, b""))


blocks_a_sensor_may_send = st.builds(
    Block,
    code=st.sampled_from(["2.05", "2.05", "2.05", "4.04"]),
    number=st.one_of(st.none(), st.integers(0, 70)),
    more=st.booleans(),
    size_exponent=st.integers(0, 7),
    payload=st.sampled_from([b"", b"x" * 16, b"x" * 32, b"x" * 64, b"x" * 1024, b"x" * 9]),
    etag=st.sampled_from([b"1", b"1", b"1", b"2", None]),
    size2=st.one_of(st.none(), st.integers(0, 1 << 20)),
)


@settings(max_examples=300)
@given(st.lists(blocks_a_sensor_may_send, min_size=1, max_size=400),
       st.integers(1, 4096), st.integers(0, 2))
def test_any_sensor_ends_within_the_bound(
    sent: list[Block], limit: int, restarts: int
) -> None:
    assembler = BlockAssembler(limit, restarts)
    decision = assembler.start(sent[0])
    for answer in sent[1:]:
        if not isinstance(decision, RequestBlock):
            break
        decision = assembler.feed(answer)
    assert assembler.exchanges <= max_exchanges(limit, restarts)


def test_a_sensor_repeating_the_same_full_block_ends_at_once() -> None:
    assembler = BlockAssembler(1 << 20)
    decision = assembler.start(full(0))
    for _ in range(10):
        if not isinstance(decision, RequestBlock):
            break
        decision = assembler.feed(full(0))  # always block 0, whatever is asked for
    assert isinstance(decision, Broken) and assembler.exchanges == 1


# --- exchanges.complete with a stand-in sensor ----------------------------------------------------


class Blocks:
    """A stand-in sensor: serves blocks of 1024 bytes of `data` (ETag `etag`, Size2 `size2`
    when given) and records the block numbers asked for."""

    def __init__(self, data: bytes, *, size2: int | None = None, etag: bytes = b"1") -> None:
        self.data = data
        self.size2 = size2
        self.etag = etag
        self.asked: list[int] = []

    def block(self, number: int, size_exponent: int = 6) -> Any:
        size = 1 << (size_exponent + 4)
        more = (number + 1) * size < len(self.data)
        message = aiocoap.Message(
            code=Code.CONTENT, payload=self.data[number * size:(number + 1) * size],
            block2=(number, more, size_exponent), etag=self.etag, content_format=112,
            max_age=30,
        )
        if self.size2 is not None:
            message.opt.size2 = self.size2
        return message

    async def fetch(self, number: int, size_exponent: int) -> Any:
        self.asked.append(number)
        return self.block(number, size_exponent)


async def test_blocks_up_to_the_limit_are_taken_whole() -> None:
    sensor = Blocks(bytes(range(250)) * 12)  # 3000 bytes: blocks 0, 1, 2
    answer = await exchanges.complete(sensor.block(0), sensor.fetch, 3000)
    assert answer.payload == sensor.data
    assert (answer.code, answer.cf, answer.max_age, answer.too_large) == ("2.05", 112, 30, None)
    assert sensor.asked == [1, 2]


async def test_fetching_stops_at_the_first_block_past_the_limit() -> None:
    sensor = Blocks(b"x" * 10_000)
    with pytest.raises(RepresentationTooLarge) as raised:
        await exchanges.complete(sensor.block(0), sensor.fetch, 2048)
    assert sensor.asked == [1, 2]  # 2048 bytes are within the limit, 3072 are not
    assert raised.value.size == 3072
    assert str(raised.value) == (
        "representation larger than max_upstream_bytes (2048 bytes): "
        "3072 bytes received before stopping"
    )
    # What an observation reports instead: the first block's code, cf and Max-Age, no payload.
    assert raised.value.answer == CoapAnswer(
        code="2.05", cf=112, payload=b"", max_age=30, observe=None, too_large=3072
    )


@pytest.mark.parametrize("announced_in", [0, 1])
async def test_a_size2_beyond_the_limit_stops_the_fetch_at_once(announced_in: int) -> None:
    sensor = Blocks(b"x" * 10_000)
    first = sensor.block(0)
    if announced_in == 0:
        first.opt.size2 = 10_000
    else:
        sensor.size2 = 10_000  # only the blocks fetched later announce it
    with pytest.raises(RepresentationTooLarge) as raised:
        await exchanges.complete(first, sensor.fetch, 4096)
    assert sensor.asked == [1][:announced_in]
    assert raised.value.size == 10_000 and "10000 bytes announced in Size2" in str(raised.value)


async def test_a_size2_within_the_limit_or_on_the_last_block_is_no_reason_to_stop() -> None:
    sensor = Blocks(b"x" * 3000, size2=3000)
    answer = await exchanges.complete(sensor.block(0), sensor.fetch, 3000)
    assert len(answer.payload) == 3000
    whole = Blocks(b"y" * 100, size2=1_000_000).block(0)  # whole: Size2 says nothing more
    answer = await exchanges.complete(whole, Blocks(b"").fetch, 3000)
    assert answer.payload == b"y" * 100


async def test_a_first_block_that_is_not_block_0_is_an_upstream_error() -> None:
    sensor = Blocks(b"x" * 3000)
    with pytest.raises(UpstreamError, match="block 1, not 0"):
        await exchanges.complete(sensor.block(1), sensor.fetch, 5000)
    assert sensor.asked == []


async def test_a_changed_etag_starts_over_only_when_restarts_are_allowed() -> None:
    sensor = Blocks(b"a" * 3000, etag=b"1")
    first = sensor.block(0)
    sensor.data, sensor.etag = b"b" * 3000, b"2"  # changes after the first block
    with pytest.raises(exchanges.RepresentationChanged):
        await exchanges.complete(first, sensor.fetch, 5000, restarts=0)
    assert sensor.asked == [1]
    sensor.asked.clear()
    answer = await exchanges.complete(first, sensor.fetch, 5000)
    assert answer.payload == b"b" * 3000
    assert sensor.asked == [1, 0, 1, 2]


async def test_a_broken_transfer_is_reported_with_the_first_blocks_answer() -> None:
    sensor = Blocks(b"a" * 3000)

    async def short(number: int, size_exponent: int) -> Any:
        message = sensor.block(number, size_exponent)
        message.payload = message.payload[:10]
        return message

    with pytest.raises(exchanges.BrokenTransfer) as raised:
        await exchanges.complete(sensor.block(0), short, 5000)
    assert raised.value.answer.code == "2.05" and raised.value.answer.payload == b""
    assert "block 1 has 10 bytes and more to follow" in (raised.value.answer.broken or "")
