"""The CoAP socket's guard (translator/coap/guard.py), from raw bytes: no sockets."""

from __future__ import annotations

import struct
from typing import Any

import aiocoap
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

from translator.coap.guard import (
    TOKEN_BYTES,
    IcmpVerdict,
    InFlight,
    Verdict,
    classify,
    destination_is_unicast,
    draw_token,
    parse_header,
    reset_for,
    vet_icmp,
)

SENSOR = ("::ffff:127.0.0.1", 5683)
OTHER = ("::ffff:127.0.0.2", 5683)
ENDPOINT = object()
TOKEN = bytes(range(1, 9))


def message(mtype: Type, code: Code, mid: int, token: bytes = b"", **options: Any) -> bytes:
    msg = aiocoap.Message(code=code, **options)
    msg.mtype, msg.mid, msg.token = mtype, mid, token
    return bytes(msg.encode())


def judge(data: bytes, in_flight: InFlight, *, remote: Any = SENSOR, unicast: bool = True,
          open_tokens: tuple[bytes, ...] = (TOKEN,)) -> Verdict:
    requests = {(token, ENDPOINT) for token in open_tokens}
    return classify(data, remote, unicast, requests, ENDPOINT, in_flight)[0]


@pytest.fixture
def sent() -> InFlight:
    """A NON registration (MID 7) and a CON request (MID 8) in flight to the sensor."""
    table = InFlight()
    table.sent(SENSOR, 7, TOKEN, request=True, confirmable=False, now=0.0)
    table.sent(SENSOR, 8, b"con-tok1", request=True, confirmable=True, now=0.0)
    return table


def test_parse_header_reads_only_the_fixed_header_and_the_token() -> None:
    data = message(Type.NON, Code.CONTENT, 0x1234, TOKEN, uri_path=["x"], payload=b"p")
    assert parse_header(data) == (1, 0x45, 0x1234, TOKEN)
    assert parse_header(b"\x40\x01") is None  # too short
    assert parse_header(b"\x80\x01\x00\x00") is None  # version 2
    assert parse_header(b"\x49\x01\x00\x00" + bytes(9)) is None  # token length 9
    assert parse_header(b"\x48\x01\x00\x00abc") is None  # token cut


def test_responses_pass_only_on_an_open_token(sent: InFlight) -> None:
    notification = message(Type.NON, Code.CONTENT, 99, TOKEN, observe=5)
    assert judge(notification, sent) is Verdict.DELIVER
    assert judge(message(Type.CON, Code.CONTENT, 99, TOKEN), sent) is Verdict.DELIVER
    assert judge(message(Type.NON, Code.CONTENT, 99, b"guess"), sent) is Verdict.UNMATCHED
    # The same token from another address is another request (aiocoap's table is keyed by
    # both), so `open_tokens` is empty for it.
    assert judge(notification, sent, remote=OTHER, open_tokens=()) is Verdict.UNMATCHED


def test_acks_pass_only_on_message_id_and_token_of_a_con_in_flight(sent: InFlight) -> None:
    assert judge(message(Type.ACK, Code.EMPTY, 8), sent) is Verdict.DELIVER
    assert judge(message(Type.ACK, Code.EMPTY, 9), sent) is Verdict.UNMATCHED
    assert judge(message(Type.RST, Code.EMPTY, 8), sent) is Verdict.DELIVER
    assert judge(message(Type.ACK, Code.CONTENT, 8, b"con-tok1"), sent) is Verdict.DELIVER
    assert judge(message(Type.ACK, Code.CONTENT, 8, TOKEN), sent) is Verdict.ACK_MISMATCH
    # the right token on another MID: RFC 7252 §5.3.2 matches an ACK by both
    assert judge(message(Type.ACK, Code.CONTENT, 10, b"con-tok1"), sent) is Verdict.UNMATCHED
    assert judge(message(Type.ACK, Code.EMPTY, 8), sent, remote=OTHER) is Verdict.UNMATCHED
    sent.acknowledged(SENSOR, 8)
    assert judge(message(Type.ACK, Code.EMPTY, 8), sent) is Verdict.UNMATCHED  # only once
    # A sloppy sensor's ACK to the NON registration, echoing its MID and token.
    assert judge(message(Type.ACK, Code.CONTENT, 7, TOKEN), sent) is Verdict.DELIVER
    assert judge(message(Type.ACK, Code.CONTENT, 6, TOKEN), sent) is Verdict.UNMATCHED


def test_requests_pings_and_format_errors(sent: InFlight) -> None:
    assert judge(message(Type.CON, Code.GET, 1, b"t", uri_path=["x"]), sent) is Verdict.REQUEST
    assert judge(message(Type.NON, Code.POST, 1), sent) is Verdict.REQUEST
    assert judge(message(Type.CON, Code.EMPTY, 1), sent) is Verdict.PING
    assert judge(b"\x50\x00\x00\x01", sent) is Verdict.MALFORMED  # empty NON
    assert judge(message(Type.ACK, Code.EMPTY, 8) + b"x", sent) is Verdict.MALFORMED
    assert judge(b"\x70\x45\x00\x08", sent) is Verdict.MALFORMED  # an RST with a code
    assert judge(b"\x40\x25\x00\x01", sent) is Verdict.MALFORMED  # class 1: reserved
    assert judge(b"garbage", sent) is Verdict.MALFORMED


def test_nothing_addressed_to_broadcast_or_multicast_passes(sent: InFlight) -> None:
    for data in (message(Type.CON, Code.GET, 1), message(Type.CON, Code.EMPTY, 2),
                 message(Type.NON, Code.CONTENT, 3, TOKEN)):
        assert judge(data, sent, unicast=False) is Verdict.NOT_UNICAST


def ip_pktinfo(spec_dst: bytes, addr: bytes) -> tuple[int, int, bytes]:
    return (0, 8, struct.pack("=i", 1) + spec_dst + addr)


def ipv6_pktinfo(address: bytes) -> tuple[int, int, bytes]:
    return (41, 50, address + struct.pack("=I", 1))


def test_destination_is_unicast() -> None:
    local, broadcast = bytes([127, 0, 0, 1]), bytes([127, 255, 255, 255])
    mapped = bytes(10) + b"\xff\xff"
    assert destination_is_unicast([ipv6_pktinfo(mapped + local), ip_pktinfo(local, local)])
    # Linux answers for a subnet's broadcast address with another reply address.
    assert not destination_is_unicast([ipv6_pktinfo(mapped + broadcast),
                                       ip_pktinfo(local, broadcast)])
    # Without IP_PKTINFO: multicast and the limited broadcast by address.
    assert not destination_is_unicast([ipv6_pktinfo(mapped + bytes([224, 0, 1, 187]))])
    assert not destination_is_unicast([ipv6_pktinfo(mapped + b"\xff\xff\xff\xff")])
    assert not destination_is_unicast([ipv6_pktinfo(b"\xff\x02" + bytes(13) + b"\xfd")])
    assert destination_is_unicast([ipv6_pktinfo(bytes(15) + b"\x01")])
    assert destination_is_unicast([])


def test_an_icmp_error_is_taken_only_when_it_quotes_a_request_in_flight(sent: InFlight) -> None:
    registration = message(Type.NON, Code.GET, 7, TOKEN, observe=0)
    icmp, icmp6 = 2, 3
    assert vet_icmp(icmp, 3, 3, registration, SENSOR, sent) is IcmpVerdict.TAKEN
    assert vet_icmp(icmp, 3, 3, registration[:4 + 8], SENSOR, sent) is IcmpVerdict.TAKEN
    assert vet_icmp(icmp6, 1, 4, registration, SENSOR, sent) is IcmpVerdict.TAKEN
    for other in (
        message(Type.NON, Code.GET, 6, TOKEN),  # another MID
        message(Type.NON, Code.GET, 7, b"other"),  # another token
        message(Type.NON, Code.CONTENT, 7, TOKEN),  # not a request
        registration[:6],  # the token cut
    ):
        assert vet_icmp(icmp, 3, 3, other, SENSOR, sent) is IcmpVerdict.UNMATCHED
    assert vet_icmp(icmp, 3, 3, registration, OTHER, sent) is IcmpVerdict.UNMATCHED
    # Time Exceeded and Packet Too Big, even about a request in flight.
    assert vet_icmp(icmp, 11, 0, registration, SENSOR, sent) is IcmpVerdict.IGNORED_KIND
    assert vet_icmp(icmp, 3, 4, registration, SENSOR, sent) is IcmpVerdict.IGNORED_KIND
    assert vet_icmp(icmp6, 3, 0, registration, SENSOR, sent) is IcmpVerdict.IGNORED_KIND
    assert vet_icmp(icmp6, 2, 0, registration, SENSOR, sent) is IcmpVerdict.IGNORED_KIND
    # Once answered, the request is no longer in flight.
    sent.answered(SENSOR, TOKEN)
    assert vet_icmp(icmp, 3, 3, registration, SENSOR, sent) is IcmpVerdict.UNMATCHED


def test_in_flight_entries_expire_and_stay_bounded() -> None:
    table = InFlight(lifetime=10.0, limit=4)
    table.sent(SENSOR, 1, b"a", request=True, confirmable=True, now=0.0)
    table.sent(SENSOR, 2, b"a", request=True, confirmable=False, now=5.0)  # same token, new MID
    assert table.request_mid(SENSOR, b"a") == 2 and table.con_token(SENSOR, 1) == b"a"
    table.expire(10.0)  # the first send's entries expire; the newer MID stays
    assert table.con_token(SENSOR, 1) is None and table.request_mid(SENSOR, b"a") == 2
    table.expire(15.0)
    assert len(table) == 0
    for number in range(100):
        table.sent(SENSOR, number, bytes([number]), request=True, confirmable=True, now=20.0)
    assert len(table) <= 2 * 4


def test_tokens_are_random_eight_bytes_and_not_one_in_flight() -> None:
    tokens = {draw_token(lambda token: False) for _ in range(1000)}
    assert len(tokens) == 1000 and {len(t) for t in tokens} == {TOKEN_BYTES}
    taken = {draw_token(lambda token: False)}
    drawn = []

    def is_taken(token: bytes) -> bool:
        drawn.append(token)
        return len(drawn) < 3  # the first two are "in flight"

    assert draw_token(is_taken) == drawn[2] and len(drawn) == 3
    assert taken


def test_reset_for_is_an_empty_rst() -> None:
    assert reset_for(0x1234) == b"\x70\x00\x12\x34"
    assert parse_header(reset_for(7)) == (3, 0, 7, b"")
