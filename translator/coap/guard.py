"""What the gateway's CoAP socket lets through, decided from the raw bytes: pure, no I/O.

The gateway is a CoAP *client* on a network it does not control. Anyone can send datagrams to
its socket, with any source address, and forge ICMP errors about datagrams it never sent. So
nothing reaches aiocoap unless it answers something the gateway has in flight:

    datagram                                   verdict
    -----------------------------------------  ------------------------------------------------
    not CoAP, or an empty message with bytes   MALFORMED: dropped
    to a broadcast or multicast address        NOT_UNICAST: dropped, never answered (a reply
                                               would come from that address, RFC 7252 §8)
    a request, or a CON with a code that no    REQUEST: dropped; an empty RST to a CON (the
    client expects (a client is no server)     gateway is a client, RFC 7252 §4.2), nothing to a
                                               NON, nothing remembered
    a CON ping (empty CON)                     PING: answered with an empty RST (§4.3)
    an ACK or RST whose Message ID is no CON   UNMATCHED: dropped
    in flight to that address
    a piggybacked response (ACK) whose token   ACK_MISMATCH: dropped: an ACK answers its CON by
    is not its CON's                           Message ID *and* token (§5.3.2); one that
                                               answers a NON request is taken when it echoes
                                               that request's Message ID and token
    a CON/NON response whose (address, token)  UNMATCHED: dropped (an empty RST to a CON, as
    is not an open request or observation      RFC 7641 §3.6 has a client reject a notification
                                               it does not want)
    anything else                              DELIVER: handed to aiocoap

An ICMP error is taken (handed to aiocoap, which fails what was sent to that address) only
when it quotes a request the gateway has in flight: the quoted destination address and port,
Message ID and token all match (RFC 7252 §4.2 and §4.3: errors "after appropriate vetting";
RFC 8085 §5.2). Time Exceeded and Packet Too Big say nothing about the sensor (§4.2: ignored;
the kernel already applies a new path MTU) and are never taken.

`InFlight` keeps what that needs: per (address, token) the Message ID of the last request
sent with it, until its first answer; per (address, Message ID) the token of each CON until
its ACK or RST. Entries expire after EXCHANGE_LIFETIME; each costs O(1) to add, find and
expire.
"""

from __future__ import annotations

import collections
import secrets
import socket
import struct
from collections.abc import Callable, Container, Iterable
from enum import Enum
from typing import Any, Final

__all__ = [
    "EXCHANGE_LIFETIME",
    "TOKEN_BYTES",
    "IcmpVerdict",
    "InFlight",
    "Verdict",
    "classify",
    "destination_is_unicast",
    "draw_token",
    "parse_header",
    "vet_icmp",
]

CON, NON, ACK, RST = 0, 1, 2, 3
EMPTY: Final = 0

TOKEN_BYTES: Final = 8
"""Random bytes in every token the gateway sends. RFC 7252 §5.3.1 asks for at least 32 random
bits on an unprotected connection to a remote that an off-path attacker can spoof (§11.4);
eight bytes make a blind guess hopeless and cost four more bytes per request."""

EXCHANGE_LIFETIME: Final = 247.0
"""RFC 7252 §4.8.2: how long an answer to a message may still arrive."""

MAX_IN_FLIGHT: Final = 65_536
"""Entries of each `InFlight` table at most: beyond, the oldest is forgotten (its answer
is then dropped as unmatched), so that no pattern of sends can grow it without bound."""

Remote = tuple[Any, ...]
"""An address as the table knows it: (host, port) of a socket address."""


class Verdict(Enum):
    DELIVER = "deliver"
    MALFORMED = "malformed"
    NOT_UNICAST = "not unicast"
    REQUEST = "request"
    PING = "ping"
    UNMATCHED = "unmatched"
    ACK_MISMATCH = "ack mismatch"


class IcmpVerdict(Enum):
    TAKEN = "taken"
    UNMATCHED = "unmatched"
    IGNORED_KIND = "ignored kind"
    """Time Exceeded or Packet Too Big: never a reason to give up on a sensor."""


def parse_header(data: bytes) -> tuple[int, int, int, bytes] | None:
    """(type, code, Message ID, token) of a CoAP message (RFC 7252 §3); None when it is not
    one. Only the fixed header and the token are looked at, never the options."""
    if len(data) < 4:
        return None
    first = data[0]
    token_length = first & 0x0F
    if first >> 6 != 1 or token_length > 8 or len(data) < 4 + token_length:
        return None
    return (first >> 4) & 0x03, data[1], (data[2] << 8) | data[3], bytes(data[4 : 4 + token_length])


def remote_key(sockaddr: tuple[Any, ...]) -> Remote:
    """The table's key of a socket address: host and port (a scope or flow label is no part
    of who answers)."""
    return sockaddr[0], sockaddr[1]


class InFlight:
    """What the gateway sent and may still hear about (see the module docstring)."""

    def __init__(
        self, lifetime: float = EXCHANGE_LIFETIME, limit: int = MAX_IN_FLIGHT
    ) -> None:
        self.lifetime = lifetime
        self.limit = limit
        self._requests: dict[tuple[Remote, bytes], int] = {}
        """(remote, token) -> Message ID of the last request sent with that token."""
        self._cons: dict[tuple[Remote, int], bytes] = {}
        """(remote, Message ID) -> token of a CON awaiting its ACK or RST."""
        self._expiry: collections.deque[tuple[float, bool, Any, Any]] = collections.deque()
        """(expires at, is a CON entry, key, value) in the order sent: entries expire in
        that order, since every one lives `lifetime`."""

    def __len__(self) -> int:
        return len(self._requests) + len(self._cons)

    def sent(
        self, remote: Remote, mid: int, token: bytes, *, request: bool, confirmable: bool,
        now: float,
    ) -> None:
        """A message went out (a retransmission too: the same entries again)."""
        self.expire(now)
        until = now + self.lifetime
        if request:
            key = (remote, token)
            self._requests[key] = mid
            self._expiry.append((until, False, key, mid))
        if confirmable:
            con = (remote, mid)
            self._cons[con] = token
            self._expiry.append((until, True, con, token))
        while len(self._expiry) > 2 * self.limit:
            self._expire_first()

    def expire(self, now: float) -> None:
        expiry = self._expiry
        while expiry and expiry[0][0] <= now:
            self._expire_first()

    def _expire_first(self) -> None:
        _, con, key, value = self._expiry.popleft()
        table: dict[Any, Any] = self._cons if con else self._requests
        if table.get(key) == value:  # not since replaced by a newer send
            del table[key]

    def con_token(self, remote: Remote, mid: int) -> bytes | None:
        """The token of the CON with Message ID `mid` in flight to `remote`, if any."""
        return self._cons.get((remote, mid))

    def acknowledged(self, remote: Remote, mid: int) -> None:
        """The CON's ACK or RST arrived."""
        self._cons.pop((remote, mid), None)

    def request_mid(self, remote: Remote, token: bytes) -> int | None:
        """The Message ID of the unanswered request with `token` to `remote`, if any."""
        return self._requests.get((remote, token))

    def answered(self, remote: Remote, token: bytes) -> None:
        """A response with `token` arrived: that request is no longer waiting for one."""
        if self._requests:
            self._requests.pop((remote, token), None)


def classify(
    data: bytes,
    remote: Remote,
    unicast: bool,
    open_requests: Container[tuple[bytes, Any]],
    endpoint: Any,
    in_flight: InFlight,
) -> tuple[Verdict, tuple[int, int, int, bytes] | None]:
    """What to do with datagram `data` from `remote` (see the module docstring), and its
    parsed header. `unicast`: it was addressed to one of this host's unicast addresses.
    `open_requests` holds (token, `endpoint`) for each request or observation open to the
    sender (aiocoap's table, keyed by its address object `endpoint`)."""
    # parse_header, inlined: this runs for every datagram the gateway reads.
    size = len(data)
    if size < 4:
        return Verdict.MALFORMED, None
    first = data[0]
    token_length = first & 0x0F
    if first >> 6 != 1 or token_length > 8 or size < 4 + token_length:
        return Verdict.MALFORMED, None
    mtype, code = (first >> 4) & 0x03, data[1]
    mid, token = (data[2] << 8) | data[3], data[4 : 4 + token_length]
    header = (mtype, code, mid, token)
    if not unicast:
        return Verdict.NOT_UNICAST, header
    if code == EMPTY:
        if size != 4:
            return Verdict.MALFORMED, header  # RFC 7252 §4.1: a message format error
        if mtype == CON:
            return Verdict.PING, header
        if mtype == NON:
            return Verdict.MALFORMED, header
        return (Verdict.DELIVER if in_flight.con_token(remote, mid) is not None
                else Verdict.UNMATCHED), header
    if not 0x40 <= code < 0xC0 or mtype == RST:
        # A request (class 0), a reserved class (1, 6, 7), or an RST that is not empty.
        return (Verdict.REQUEST if code < 0x20 else Verdict.MALFORMED), header
    if mtype == ACK:
        expected = in_flight.con_token(remote, mid)
        if expected is None:
            # Some sensors piggyback the response to a NON request on an ACK (RFC 7252
            # §5.2.3 says NON): taken when it echoes that request's Message ID and token.
            if in_flight.request_mid(remote, token) == mid:
                return Verdict.DELIVER, header
            return Verdict.UNMATCHED, header
        return (Verdict.DELIVER if expected == token else Verdict.ACK_MISMATCH), header
    return (Verdict.DELIVER if (token, endpoint) in open_requests else Verdict.UNMATCHED), header


def reset_for(mid: int) -> bytes:
    """An empty RST with Message ID `mid` (4 bytes)."""
    return bytes((0x70, 0, mid >> 8, mid & 0xFF))


def draw_token(taken: Callable[[bytes], bool]) -> bytes:
    """`TOKEN_BYTES` random bytes from `secrets`, not one for which `taken` is true (a token
    of a request still in flight to the same remote)."""
    while True:
        token = secrets.token_bytes(TOKEN_BYTES)
        if not taken(token):
            return token


# --- where a datagram was addressed to ------------------------------------------------------

IP_PKTINFO: Final = getattr(socket, "IP_PKTINFO", 8)
"""Linux's value (Python < 3.14 does not name it)."""
_IPPROTO_IP: Final = socket.IPPROTO_IP
_IPPROTO_IPV6: Final = socket.IPPROTO_IPV6
_IPV6_PKTINFO: Final = socket.IPV6_PKTINFO
_V4_MAPPED: Final = bytes(10) + b"\xff\xff"


def destination_is_unicast(ancdata: Iterable[tuple[int, int, bytes]]) -> bool:
    """Whether a datagram with this packet info was addressed to a unicast address.

    For IPv4, Linux's IP_PKTINFO says it exactly: `ipi_spec_dst` (the local address a reply
    would come from) equals `ipi_addr` (the header's destination) only for a datagram to a
    local unicast address; a broadcast (255.255.255.255 or a subnet's, such as
    127.255.255.255) or multicast one differs. Without it, multicast and 255.255.255.255
    are recognized by the address in IPV6_PKTINFO."""
    pktinfo6: bytes | None = None
    for level, kind, value in ancdata:
        if level == _IPPROTO_IP and kind == IP_PKTINFO and len(value) >= 12:
            return value[4:8] == value[8:12]
        if level == _IPPROTO_IPV6 and kind == _IPV6_PKTINFO and len(value) >= 16:
            pktinfo6 = value
    if pktinfo6 is None:
        return True  # nothing to judge by: the socket was not asked for packet info
    if pktinfo6[0] == 0xFF:
        return False  # IPv6 multicast
    if pktinfo6[:12] == _V4_MAPPED:
        first = pktinfo6[12]
        return not (224 <= first <= 239 or pktinfo6[12:16] == b"\xff\xff\xff\xff")
    return True


# --- ICMP errors ----------------------------------------------------------------------------

SO_EE_ORIGIN_LOCAL: Final = 1
SO_EE_ORIGIN_ICMP: Final = 2
SO_EE_ORIGIN_ICMP6: Final = 3

_EXTENDED_ERR: Final = struct.Struct("=IBBBBII")
"""struct sock_extended_err: errno, origin, type, code, pad, info, data."""


def extended_error(value: bytes) -> tuple[int, int, int, int] | None:
    """(errno, origin, ICMP type, ICMP code) of a RECVERR control message's data."""
    if len(value) < _EXTENDED_ERR.size:
        return None
    errno_value, origin, icmp_type, icmp_code, _, _, _ = _EXTENDED_ERR.unpack_from(value)
    return errno_value, origin, icmp_type, icmp_code


def ignored_icmp_kind(origin: int, icmp_type: int, icmp_code: int) -> bool:
    """Time Exceeded (ICMP 11, ICMPv6 3) and Packet Too Big (ICMP 3 code 4, ICMPv6 2)."""
    if origin == SO_EE_ORIGIN_ICMP:
        return icmp_type == 11 or (icmp_type == 3 and icmp_code == 4)
    if origin == SO_EE_ORIGIN_ICMP6:
        return icmp_type in (2, 3)
    return False


def vet_icmp(
    origin: int, icmp_type: int, icmp_code: int, quoted: bytes, remote: Remote,
    in_flight: InFlight,
) -> IcmpVerdict:
    """Whether an ICMP error about a datagram to `remote` that quotes `quoted` (its UDP
    payload, as much as the ICMP message carried) may be taken as the sensor's answer."""
    if ignored_icmp_kind(origin, icmp_type, icmp_code):
        return IcmpVerdict.IGNORED_KIND
    header = parse_header(quoted)
    if header is None:
        return IcmpVerdict.UNMATCHED
    _, code, mid, token = header
    if not 0 < code < 0x20:  # only a request of ours can be in flight
        return IcmpVerdict.UNMATCHED
    if in_flight.request_mid(remote, token) != mid:
        return IcmpVerdict.UNMATCHED
    return IcmpVerdict.TAKEN
