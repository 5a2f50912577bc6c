"""The gateway's CoAP socket: read in batches through the guard, written with what is in flight
noted. (aiocoap keeps the protocol: message types, retransmissions, tokens, observations.)

Reading. aiocoap's UDP transport reads one datagram each time the event loop finds its socket
readable, interleaved with everything else the loop does, such as writing one update to a
thousand WebSocket clients. When a sensor offers more updates than the gateway can deliver,
the difference queues in the kernel's receive buffer, every update reaches clients seconds
late, and the buffer's tail drops the newest ones (and other sensors' too).

Here each readiness event moves up to `BATCH` datagrams from the socket into a queue of our
own, which is handed to aiocoap in order. Each datagram is first judged from its header alone
(translator/coap/guard.py: O(1), no option parsed): only one that answers something in flight
is queued; the rest are dropped on read, counted and logged through the limiter
(translator/logs.py), and a CON among them gets at most an empty RST. So a flood from
anywhere costs a few microseconds per datagram and never reaches the queue:

    queue holds                      what happens
    -------------------------------  --------------------------------------------------------
    a few fresh datagrams            every one is handed on; two notifications of the same
                                     observation never go in one loop turn, so the CoAP side
                                     sees each (aiocoap's observation iterator keeps only the
                                     newest it has not handed out yet)
    more than COALESCE_ABOVE, or     the gateway is behind: a NON notification is dropped,
    one older than MAX_WAIT          unparsed, when a newer one of the same observation
                                     (remote, token) arrives behind it: clients get the newest
                                     value, with a jump in `seq`. Each arrival marks the older
                                     ones of its observation (a chain per observation, each
                                     entry marked once), so the work per datagram is O(1).
    more than MAX_PENDING            the socket is not read until the queue is half empty

Whatever aiocoap raises for a datagram (an option that is not UTF-8, say) drops that datagram
with a counted log line; reading always goes on. A datagram longer than `MAX_DATAGRAM` is
dropped (the kernel says MSG_TRUNC), never handed on cut. ICMP errors from the socket's error
queue are vetted the same way (coap_guard.vet_icmp) before aiocoap hears of them.

Writing. Every message aiocoap sends goes through `send`, which notes requests and CONs in
flight (for the guard) and keeps two kernel habits from being taken as a sensor's failure:
Linux reports an ICMP error on the socket's *next* send as well, whoever that is to, so a
failed send is tried once more; and a reply (an ACK or RST) that cannot be sent is only
logged, never taken as the failure of every request to that address, as aiocoap would.

It also gives the socket a larger receive buffer, so that a burst (hundreds of registrations
answered at once, say) is not dropped by the kernel. aiocoap's internals are reached through
translator/compat.py only.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import weakref
from collections.abc import Container
from typing import Any, Final

from aiocoap.numbers.types import Type
from aiocoap.util.socknumbers import HAS_RECVERR, MSG_ERRQUEUE

from translator import compat
from translator.coap.answers import IcmpError
from translator.coap.buffers import DropWatch, rmem_max, size_receive_buffer
from translator.coap.guard import (
    CON,
    IP_PKTINFO,
    NON,
    IcmpVerdict,
    InFlight,
    Verdict,
    classify,
    destination_is_unicast,
    draw_token,
    extended_error,
    remote_key,
    reset_for,
    vet_icmp,
)
from translator.logs import LimitedLog

log = logging.getLogger(__name__)

BATCH: Final = 64
"""Datagrams read per readiness event at most, so one busy socket cannot starve the loop."""
COALESCE_ABOVE: Final = 32
"""Queued datagrams beyond which the gateway counts as behind and keeps only the newest."""
MAX_WAIT: Final = 0.005
"""Seconds a queued datagram may wait before the gateway counts as behind: one fan-out to a
thousand clients takes 5 to 10 milliseconds, so a datagram still queued after one such loop
turn means notifications arrive faster than they go out. (At 20 ms, p99 sensor-to-client
latency at N = 1000 under 2x overload was ~40 ms higher.)"""
MAX_PENDING: Final = 4096
"""Queued datagrams beyond which reading pauses (only CON and other undroppable messages can
pile up this far, since droppable ones collapse to one per observation)."""
MAX_SENDERS: Final = 1024
"""Distinct (address, packet info) pairs remembered for sharing, at most."""
RECEIVE_BUFFER: Final = 1 << 20
"""Bytes asked for the receive buffer by default (``[coap] receive_buffer``; the kernel caps
it at net.core.rmem_max): the flood benchmark's kernel drops, see docs/performance.md."""
MAX_DATAGRAM: Final = 4096
"""The largest datagram taken (RFC 7252 §4.6: a CoAP message should fit one IP packet;
larger representations come block-wise). A longer one is dropped whole, never cut."""

KERNEL_DROPS: Final = "coap.kernel-drops"
"""The log kind of datagrams the kernel dropped (a full receive buffer)."""

_IPPROTO_IP: Final = socket.IPPROTO_IP
_IPPROTO_IPV6: Final = socket.IPPROTO_IPV6
_IPV6_PKTINFO: Final = socket.IPV6_PKTINFO
_IPV6_RECVERR: Final = 25
_IP_RECVERR: Final = 11
_MSG_TRUNC: Final = socket.MSG_TRUNC

_readers: weakref.WeakKeyDictionary[Any, list[_BatchReader]] = weakref.WeakKeyDictionary()


def batch_reads(
    context: Any, *, batch: int = BATCH, receive_buffer: int = RECEIVE_BUFFER
) -> list[_BatchReader]:
    """Read and write every plain UDP socket of an aiocoap client `context` here (see the
    module docstring), and give every token manager random tokens; returns the readers.
    Raises compat.CompatError when this aiocoap does not have what that needs."""
    readers = []
    for stack in compat.udp_stacks(context):
        sock = stack.sock
        granted = size_receive_buffer(sock, receive_buffer)
        log.info("CoAP socket: receive buffer %d bytes (asked for %d; [coap] receive_buffer, "
                 "capped by net.core.rmem_max = %s)", granted, receive_buffer, rmem_max())
        try:
            # Tells a datagram to a broadcast address from one to ours (coap_guard).
            sock.setsockopt(_IPPROTO_IP, IP_PKTINFO, 1)
        except OSError as exc:
            log.warning("no IP_PKTINFO on the CoAP socket (%s): only multicast and "
                        "255.255.255.255 are recognized as not addressed to the gateway", exc)
        reader = _BatchReader(stack, sock, MAX_DATAGRAM, batch)
        reader.install()
        readers.append(reader)
    for manager in compat.token_managers(context):
        compat.choose_tokens(manager, draw_token)
    if not readers:
        log.warning("no aiocoap UDP transport found to read; keeping aiocoap's")
    _readers[context] = readers
    return readers


def readers_of(context: Any) -> list[_BatchReader]:
    """The readers `batch_reads` installed on `context`."""
    return _readers.get(context, [])


class _Sender:
    """One (address, packet info) pair seen on the socket: what the guard and aiocoap need
    of it, worked out once and shared by all its datagrams (aiocoap keeps every
    observation's first response, and each holds its sender's address)."""

    __slots__ = ("address", "endpoint", "remote", "reply_ancdata", "unicast")

    def __init__(self, address: Any, ancdata: list[Any], stack: Any) -> None:
        pktinfo = next((value for level, kind, value in ancdata
                        if level == _IPPROTO_IPV6 and kind == _IPV6_PKTINFO), None)
        self.address = address
        self.remote = remote_key(address)
        self.unicast = destination_is_unicast(ancdata)
        self.endpoint = stack.endpoint(address, pktinfo)
        """aiocoap's address object, for the token lookup and for its messages."""
        self.reply_ancdata = [] if pktinfo is None else [(_IPPROTO_IPV6, _IPV6_PKTINFO, pktinfo)]
        """A reply goes out from the address the datagram came to."""


class _Queued:
    """A datagram that passed the guard, until it is handed to aiocoap."""

    __slots__ = ("data", "done", "droppable", "key", "older", "read_at", "sender")

    def __init__(
        self, data: bytes, sender: _Sender, read_at: float, key: tuple[Any, bytes] | None,
        droppable: bool,
    ) -> None:
        self.data = data
        self.sender = sender
        self.read_at = read_at
        self.key = key
        """(address, token) of a response: at most one per key is handed on per turn."""
        self.droppable = droppable
        """A NON 2.xx response: an observe notification that a newer one makes moot. A CON
        must be acknowledged, and an error response ends something: neither is dropped."""
        self.older: _Queued | None = None
        """The previous queued notification of the same observation, not yet handed on."""
        self.done = False
        """Handed on, or made moot by a newer one."""


class _BatchReader:
    """The socket reader, the queue between it and aiocoap, and the sender (see the module
    docstring). `stack` is aiocoap's side of the socket (compat.UdpStack)."""

    def __init__(self, stack: Any, sock: socket.socket, max_size: int, batch: int) -> None:
        self.stack = stack
        self.sock = sock
        self.max_size = max_size
        self.batch = batch
        self.pending: collections.deque[_Queued] = collections.deque()
        self.live = 0
        """Queued datagrams not yet handed on nor moot."""
        self.latest: dict[tuple[Any, bytes], _Queued] = {}
        """The newest queued notification of each observation (a droppable one)."""
        self.senders: dict[tuple[Any, ...], _Sender] = {}
        self.in_flight = InFlight()
        self.log = LimitedLog(log)
        """Every line about what someone outside sent goes through the limiter."""
        self.scheduled = False
        self.reading = False
        self.loop = asyncio.get_running_loop()
        self.drops = DropWatch(sock)
        """Datagrams the kernel dropped because the receive buffer was full."""

    def install(self) -> None:
        self.stack.release_reading(self.loop)
        self.stack.take_sending(self.send)
        self._resume()

    @property
    def dropped(self) -> dict[str, int]:
        """How many datagrams and ICMP errors were dropped, by kind (the kernel's drops
        are counted by the kernel: `drops`)."""
        return {kind: count for kind, count in self.log.limiter.totals.items()
                if kind != KERNEL_DROPS}

    def _resume(self) -> None:
        if not self.reading and self.sock.fileno() != -1:
            self.reading = True
            self.loop.add_reader(self.sock.fileno(), self._readable)

    def _pause(self) -> None:
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.sock.fileno())

    def _readable(self) -> None:
        self._read()
        if not self.scheduled:
            # Hand on now, in this loop turn, as aiocoap's own reader would: a turn can be a
            # whole fan-out long, and waiting for the next one delays every notification by it.
            self._hand_on(read=False)

    # -- reading -------------------------------------------------------------------------

    def _read(self) -> None:
        """Move what the socket holds, past the guard, into the queue."""
        sock = self.sock
        if HAS_RECVERR:
            self._read_errors()
        now = self.loop.time()
        for _ in range(self.batch):
            try:
                data, ancdata, flags, address = sock.recvmsg(self.max_size, 1024)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                # Linux reports an ICMP error once more on the next read (the error queue
                # has it, with what it quotes): nothing was lost, read on.
                self.log.write("coap.socket-error", logging.DEBUG,
                               "CoAP socket: %s (the error queue has it)", exc)
                continue
            if flags & _MSG_TRUNC:
                self.log.write("coap.truncated", logging.WARNING,
                               "datagram from %s longer than %d bytes: dropped",
                               _where(address), self.max_size)
                continue
            self._take(data, ancdata, address, now)
        if self.live > MAX_PENDING:
            self._pause()
        dropped = self.drops.new_drops(now)
        if dropped:
            self.log.write(KERNEL_DROPS, logging.WARNING,
                           "the CoAP socket's receive buffer was full: the kernel dropped %d "
                           "datagrams (buffer %d bytes; see [coap] receive_buffer)", dropped,
                           self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))

    def _take(self, data: bytes, ancdata: list[Any], address: Any, now: float) -> None:
        key = (address, *ancdata)
        sender = self.senders.get(key)
        if sender is None:
            if len(self.senders) >= MAX_SENDERS:
                self.senders.clear()  # bounded, whatever the sources
            sender = self.senders[key] = _Sender(address, ancdata, self.stack)
        requests: Container[Any] = self.stack.open_requests() or ()
        verdict, header = classify(
            data, sender.remote, sender.unicast, requests, sender.endpoint, self.in_flight
        )
        if verdict is not Verdict.DELIVER:
            self._refuse(verdict, header, sender)
            return
        assert header is not None
        mtype, code, mid, token = header
        if code == 0 or mtype == 2:  # an ACK or RST: its CON is answered
            self.in_flight.acknowledged(sender.remote, mid)
        if not code:
            self._queue(_Queued(data, sender, now, None, False))
            return
        self.in_flight.answered(sender.remote, token)
        self._queue(_Queued(data, sender, now, (address, token), mtype == NON and code >> 5 == 2))

    def _queue(self, entry: _Queued) -> None:
        pending = self.pending
        if entry.droppable:
            key = entry.key
            older = self.latest.get(key)  # type: ignore[arg-type]
            self.latest[key] = entry  # type: ignore[index]
            if older is not None and not older.done:
                behind = self.live > COALESCE_ABOVE or (
                    entry.read_at - pending[0].read_at > MAX_WAIT
                )
                if behind:
                    # Each entry is marked once, so a chain costs O(1) per datagram.
                    while older is not None and not older.done:
                        older.done = True
                        self.live -= 1
                        chained, older.older = older.older, None
                        older = chained
                else:
                    entry.older = older
        pending.append(entry)
        self.live += 1

    def _refuse(
        self, verdict: Verdict, header: tuple[int, int, int, bytes] | None, sender: _Sender
    ) -> None:
        """Drop a datagram the guard did not let through; an empty RST where CoAP asks for
        one and the datagram came to a unicast address of ours."""
        self.log.write(f"coap.{verdict.value.replace(' ', '-')}", logging.INFO,
                       "datagram from %s (%s): %s, dropped", _where(sender.address),
                       _describe(header), verdict.value)
        if header is None or not sender.unicast or header[0] != CON:
            return
        if verdict in (Verdict.PING, Verdict.REQUEST, Verdict.UNMATCHED, Verdict.MALFORMED):
            self._reply(reset_for(header[2]), sender)

    def _reply(self, data: bytes, sender: _Sender) -> None:
        try:
            self.sock.sendmsg((data,), sender.reply_ancdata, 0, sender.address)
        except OSError as exc:
            self.log.write("coap.reply-not-sent", logging.INFO, "RST to %s not sent: %s",
                           _where(sender.address), exc)

    def _read_errors(self) -> None:
        """Take the ICMP errors the socket has queued; hand on only those that quote a
        request in flight (coap_guard.vet_icmp)."""
        for _ in range(self.batch):
            try:
                data, ancdata, _, address = self.sock.recvmsg(
                    self.max_size, 1024, MSG_ERRQUEUE
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.log.write("coap.socket-error", logging.INFO,
                               "CoAP socket error queue: %s", exc)
                return
            self._icmp(data, ancdata, address)

    def _icmp(self, quoted: bytes, ancdata: list[Any], address: Any) -> None:
        error = None
        for level, kind, value in ancdata:
            if (level, kind) in ((_IPPROTO_IPV6, _IPV6_RECVERR), (_IPPROTO_IP, _IP_RECVERR)):
                error = extended_error(value)
        if error is None:
            self.log.write("coap.icmp-unreadable", logging.INFO,
                           "an error about %s without its details: ignored", _where(address))
            return
        errno_value, origin, icmp_type, icmp_code = error
        verdict = vet_icmp(origin, icmp_type, icmp_code, quoted, remote_key(address),
                           self.in_flight)
        if verdict is not IcmpVerdict.TAKEN:
            self.log.write(f"coap.icmp-{verdict.value.replace(' ', '-')}", logging.INFO,
                           "ICMP error (%s, type %d code %d) about %s (%s): %s, ignored",
                           os.strerror(errno_value), icmp_type, icmp_code, _where(address),
                           _describe_bytes(quoted), verdict.value)
            return
        log.info("ICMP error about a request to %s: %s", _where(address),
                 os.strerror(errno_value))
        exc = IcmpError(errno_value, f"{os.strerror(errno_value)} (ICMP error)")
        try:
            self.stack.fail(exc, self.stack.endpoint(address, None))
        except Exception as failure:
            self.log.write("coap.unhandled", logging.WARNING,
                           "aiocoap could not take an ICMP error about %s: %s",
                           _where(address), _describe_exception(failure))

    # -- handing on ----------------------------------------------------------------------

    def _schedule(self) -> None:
        if self.live and not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self._hand_on)

    def _hand_on(self, read: bool = True) -> None:
        """Hand queued datagrams to aiocoap, at most one per observation per loop turn, so
        that the CoAP side takes each notification before the next one of its kind.

        With `read`, the socket is read first: this turn began with the callbacks queued in
        the one before (a fan-out, often), so what arrived meanwhile is still in the socket,
        and a queued notification that a newer one already supersedes must not go out."""
        self.scheduled = False
        pending, handed = self.pending, set()
        if self.sock.fileno() == -1:
            pending.clear()  # the transport was closed meanwhile
            self.latest.clear()
            self.live = 0
            return
        if read and self.reading:
            self._read()
        while pending:
            entry = pending[0]
            if entry.done:
                pending.popleft()
                continue
            key = entry.key
            if key is not None:
                if key in handed:
                    break
                handed.add(key)
            pending.popleft()
            entry.done = True
            entry.older = None
            self.live -= 1
            if entry.droppable and self.latest.get(key) is entry:  # type: ignore[arg-type]
                del self.latest[key]  # type: ignore[arg-type]
            self._deliver(entry)
        if self.live <= MAX_PENDING // 2:
            self._resume()
        self._schedule()

    def _deliver(self, entry: _Queued) -> None:
        try:
            self.stack.deliver(entry.data, entry.sender.endpoint)
        except Exception as exc:  # whatever it is, this datagram only: reading goes on
            self.log.write("coap.unhandled", logging.WARNING,
                           "datagram from %s (%s) could not be handled: %s; dropped",
                           _where(entry.sender.address), _describe_bytes(entry.data),
                           _describe_exception(exc))

    # -- writing -------------------------------------------------------------------------

    def send(self, message: Any) -> None:
        """Send one of aiocoap's messages (it calls this for every message of the socket)."""
        remote = message.remote
        data = message.encode()
        request = message.code.is_request()
        confirmable = message.mtype is Type.CON
        if request or confirmable:
            self.in_flight.sent(remote_key(remote.sockaddr), message.mid, message.token,
                                request=request, confirmable=confirmable,
                                now=self.loop.time())
        ancdata = [] if remote.pktinfo is None else [(_IPPROTO_IPV6, _IPV6_PKTINFO,
                                                       remote.pktinfo)]
        failure: OSError | None = None
        for _ in range(2):
            try:
                self.sock.sendmsg((data,), ancdata, 0, remote.sockaddr)
                return
            except (BlockingIOError, InterruptedError) as exc:
                failure = exc  # the send buffer is full: like a datagram lost on the way
                break
            except OSError as exc:
                # Possibly not this send's error: Linux reports an ICMP error (about any
                # datagram, or forged) on the next send too, and that send did not go out.
                failure = exc
        if request and not isinstance(failure, BlockingIOError):
            self.stack.fail(failure, remote)
        else:
            self.log.write("coap.send-error", logging.INFO, "%s to %s not sent: %s",
                           "request" if request else "reply", _where(remote.sockaddr), failure)


def _where(address: Any) -> str:
    host, port = address[0], address[1]
    if isinstance(host, str) and host.startswith("::ffff:"):
        host = host[7:]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def _describe(header: tuple[int, int, int, bytes] | None) -> str:
    if header is None:
        return "not CoAP"
    mtype, code, mid, token = header
    kind = ("CON", "NON", "ACK", "RST")[mtype]
    return f"{kind} {code >> 5}.{code & 0x1F:02d} MID {mid} token {token.hex() or '-'}"


def _describe_bytes(data: bytes) -> str:
    from translator.coap.guard import parse_header

    return _describe(parse_header(data))


def _describe_exception(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text.splitlines()[0][:200]}"
