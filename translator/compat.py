"""Every private or internal aiocoap API the gateway touches, each with why; nothing else.

aiocoap is pinned to 0.4.x (pyproject.toml). Its client has no public way to read its UDP
socket, to choose the tokens it sends, to see what it has in flight, to stop a block-wise
answer after its first block, or to give up a DTLS handshake, and the gateway needs all of
them to hold its own on an untrusted network and toward hostile sensors. Each such use is a
function here. :func:`check_aiocoap` checks, when the CoAP side starts, that the installed
aiocoap has every one (`REQUIREMENTS`, the optional DTLS and OSCORE parts when installed):
one without is refused with :class:`CompatError` naming what is missing and why it is
needed, rather than leaving the gateway unguarded.

websockets' undocumented connection internals are listed here too
(`WEBSOCKETS_REQUIREMENTS`, checked by :func:`check_websockets` when the web side starts).
Their uses stay in translator/web/server.py, inlined in the fan-out's per-client loop, where
a call through this module per client would cost measurable CPU (docs/performance.md).

The uses, and why nothing public does the job:

- ``RecvmsgSelectorDatagramTransport._read_ready`` and its socket: the gateway reads the
  socket itself (batches, the guard), so aiocoap's reader is taken off the event loop.
- ``MessageInterfaceUDP6.send``: replaced, so that what the gateway sends is noted as in
  flight (ACKs and ICMP errors are checked against it) and so that a send error of a reply
  is not taken as the failure of every request to that address.
- ``Message.decode`` and ``MessageManager.dispatch_message``: what aiocoap's
  ``datagram_msg_received`` does, without its re-raise and traceback, so that a datagram it
  cannot handle is dropped and counted.
- ``MessageManager.dispatch_error``: an ICMP error that passed the guard, as aiocoap's own
  error-queue reader would report it (which asserts on packet info it does not expect).
- ``TokenManager.next_token`` / ``request`` / ``outgoing_requests``: aiocoap draws tokens
  from a 2-byte counter shared by all sensors; the gateway draws 8 random bytes, unique
  among the requests in flight to that address.
- ``TokenManager.token_interface.send_message``: a deregistration must carry the
  observation's token (RFC 7641 §3.6); aiocoap's request API always picks a fresh one.
- ``Request._stop_interest``: ends an observation whose sensor went silent (aiocoap acts on
  a cancelled observation only when its next notification arrives).
- ``BlockwiseRequest._complete_by_requesting_block2``: aiocoap sends a large request
  payload in Block1 blocks (wanted) and then assembles a block-wise answer whole, whatever
  its size and whatever the sensor sends (not wanted: translator/coap/blocks.py does it,
  bounded); `block1_request` stops after the answer's first block.
- ``MessageInterfaceTinyDTLS._connection_for_address`` / ``_pool`` and
  ``DTLSClientConnection._queue`` / ``_inject_error``: a DTLS handshake with a wrong key
  never ends in aiocoap; `watch_dtls_handshakes` gives up one that takes too long.
- ``TransportOSCORE._tasks`` / ``_wire``: a cancelled OSCORE observation goes on underneath;
  `end_oscore_observations_with_interest` ends its wire observation too.
- asyncio's ``BaseSelectorEventLoop._accept_connection`` (not aiocoap's, but private all the
  same): when accept() fails for want of descriptors, asyncio pauses the listener for a
  second, but goes on calling accept() up to `backlog` times in the same pass, reporting each
  failure with a traceback and scheduling a resume for each; at the open-files limit that
  was 300 000 tracebacks a minute. `accept_backoff` makes the first failure end the pass, so
  a pause is one failed accept(), one report (through the log limiter), one resume.
- ``FilesystemSecurityContext.lockfile`` / ``_destroy``: a context that fails to load keeps
  its directory locked, and one in use is released only by the garbage collector;
  `oscore_context_class` and `release_oscore_context` release them when the gateway says.

This module is over 500 lines because it is the one place for all of them, by design: an
upgrade of aiocoap is checked here, and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import inspect
import logging
import os
import socket
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

from aiocoap import defaults as coap_defaults
from aiocoap import error as coap_error
from aiocoap.message import Direction, Message
from aiocoap.tokenmanager import TokenManager

__all__ = [
    "REQUIREMENTS",
    "WEBSOCKETS_REQUIREMENTS",
    "AcceptGate",
    "CompatError",
    "UdpStack",
    "accept_backoff",
    "block1_request",
    "check_aiocoap",
    "check_websockets",
    "deregister",
    "dtls_interfaces",
    "end_oscore_observations_with_interest",
    "gate_accepts",
    "oscore_context_class",
    "oscore_transports",
    "release_oscore_context",
    "stop_interest",
    "udp_stacks",
    "ungate_accepts",
    "watch_dtls_handshakes",
]


log = logging.getLogger(__name__)


class CompatError(RuntimeError):
    """This aiocoap lacks an internal API that the gateway relies on."""


REQUIREMENTS: Final = (
    # (module, class, attribute, why)
    ("aiocoap.util.asyncio.recvmsg", "RecvmsgSelectorDatagramTransport", "_read_ready",
     "to read its UDP socket itself"),
    ("aiocoap.transports.udp6", "MessageInterfaceUDP6", "send",
     "to note what it sends as in flight"),
    ("aiocoap.messagemanager", "MessageManager", "dispatch_message",
     "to hand it the datagrams that passed the guard"),
    ("aiocoap.messagemanager", "MessageManager", "dispatch_error",
     "to hand it the ICMP errors that passed the guard"),
    ("aiocoap.tokenmanager", "TokenManager", "next_token", "to choose random tokens"),
    ("aiocoap.tokenmanager", "TokenManager", "request", "to choose random tokens"),
    ("aiocoap.tokenmanager", "TokenManager", "outgoing_requests",
     "to check what answers are expected"),
    ("aiocoap.protocol", "Request", "_stop_interest",
     "to end an observation whose sensor went silent"),
    ("aiocoap.protocol", "BlockwiseRequest", "_complete_by_requesting_block2",
     "to complete block-wise answers itself, bounded"),
)
"""What `check_aiocoap` checks is there, always."""

DTLS_REQUIREMENTS: Final = (
    ("aiocoap.transports.tinydtls", "MessageInterfaceTinyDTLS", "_connection_for_address",
     "to give up a DTLS handshake that does not complete (a wrong key)"),
    ("aiocoap.transports.tinydtls", "MessageInterfaceTinyDTLS", "_pool",
     "to give up a DTLS handshake that does not complete (a wrong key)"),
    ("aiocoap.transports.tinydtls", "DTLSClientConnection", "_queue",
     "to tell a DTLS handshake in progress"),
    ("aiocoap.transports.tinydtls", "DTLSClientConnection", "_inject_error",
     "to give up a DTLS handshake that does not complete (a wrong key)"),
)
"""Checked when the DTLS extra is installed."""

OSCORE_REQUIREMENTS: Final = (
    ("aiocoap.transports.oscore", "TransportOSCORE", "_tasks",
     "to end a cancelled OSCORE observation at the sensor"),
    ("aiocoap.transports.oscore", "TransportOSCORE", "_wire",
     "to end a cancelled OSCORE observation at the sensor"),
    ("aiocoap.oscore", "FilesystemSecurityContext", "lockfile",
     "to release an OSCORE context directory"),
    ("aiocoap.oscore", "FilesystemSecurityContext", "_destroy",
     "to release an OSCORE context directory"),
)
"""Checked when OSCORE's modules are installed (they are, by default)."""

WEBSOCKETS_REQUIREMENTS: Final = (
    ("websockets.asyncio.connection", "Connection", "send_in_progress",
     "to write a shared frame to a socket only between two messages (fan-out)"),
    ("websockets.asyncio.connection", "Connection", "paused",
     "to skip a keepalive ping that would wait for a full transport"),
    ("websockets.asyncio.connection", "Connection", "write_limit_high",
     "to write directly only below websockets' own high-water mark"),
    ("websockets.asyncio.connection", "Connection", "drain",
     "to wait for room before taking the newest queued frame"),
    ("websockets.asyncio.connection", "Connection", "connection_lost_waiter",
     "to free a connection's place when its TCP connection ends"),
)
"""websockets (asyncio API) internals the web side reaches for; checked at its start."""


def _version() -> str:
    import aiocoap.meta

    return str(getattr(aiocoap.meta, "version", "?"))


def _has(cls: type, name: str) -> bool:
    """Whether instances of `cls` have `name`: a class attribute, or one that its
    ``__init__`` assigns (an instance attribute, seen in the names its code uses)."""
    if hasattr(cls, name):
        return True
    init = getattr(cls.__dict__.get("__init__"), "__code__", None)
    return init is not None and name in init.co_names


def check_aiocoap() -> None:
    """Refuse (CompatError) an aiocoap without an internal API the gateway relies on."""
    import importlib

    requirements = list(REQUIREMENTS)
    if not coap_defaults.dtls_missing_modules():
        requirements += DTLS_REQUIREMENTS
    if not coap_defaults.oscore_missing_modules():
        requirements += OSCORE_REQUIREMENTS
    for module_name, class_name, name, why in requirements:
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            raise CompatError(
                f"aiocoap {_version()} has no {module_name}.{class_name}, which the gateway "
                f"needs {why} (tested with aiocoap 0.4.17)"
            ) from None
        if not _has(cls, name):
            raise CompatError(
                f"aiocoap {_version()}: {class_name} has no {name!r}, which the gateway "
                f"needs {why} (tested with aiocoap 0.4.17)"
            )


def check_websockets() -> None:
    """Refuse (CompatError) a websockets without an internal the web side relies on."""
    import importlib

    import websockets

    version = getattr(websockets, "__version__", "?")
    for module_name, class_name, name, why in WEBSOCKETS_REQUIREMENTS:
        cls = getattr(importlib.import_module(module_name), class_name, None)
        if cls is None or not _has(cls, name):
            raise CompatError(
                f"websockets {version}: {class_name} has no {name!r}, which the gateway "
                f"needs {why} (tested with websockets 15 to 17)"
            )


def _need(obj: Any, name: str, why: str) -> Any:
    value = getattr(obj, name, None)
    if value is None:
        raise CompatError(
            f"aiocoap {_version()}: {type(obj).__name__} has no "
            f"{name!r}, which the gateway needs {why} (tested with aiocoap 0.4.17)"
        )
    return value


@dataclass
class UdpStack:
    """aiocoap's objects around one plain UDP socket of a client context."""

    interface: Any
    """MessageInterfaceUDP6: the socket's protocol."""
    messages: Any
    """MessageManager: message types, Message IDs, retransmissions."""
    tokens: Any
    """TokenManager: tokens and the requests in flight."""
    transport: Any
    sock: socket.socket

    def release_reading(self, loop: Any) -> None:
        """Take aiocoap's reader off the socket: the caller reads it (and aiocoap's
        ``transport.close()`` later removes whichever reader is on it)."""
        loop.remove_reader(self.sock.fileno())

    def take_sending(self, send: Callable[[Any], None]) -> None:
        """Send every message of this socket with `send(message)` instead of aiocoap's."""
        self.interface.send = send

    def endpoint(self, address: Any, pktinfo: bytes | None) -> Any:
        """aiocoap's address object of a sender (compared by address and port)."""
        return _endpoint_class()(address, self.interface, pktinfo=pktinfo)

    def deliver(self, data: bytes, remote: Any) -> None:
        """Hand one datagram from `remote` to aiocoap. Raises what decoding or dispatching
        raises (the caller drops it and counts)."""
        message = Message.decode(data, remote)
        message.direction = Direction.INCOMING
        self.messages.dispatch_message(message)

    def fail(self, exc: OSError, remote: Any) -> None:
        """Fail what aiocoap has in flight to `remote` with `exc` (an ICMP error that quotes
        a request in flight, or a request that could not be sent)."""
        self.messages.dispatch_error(exc, remote)

    def open_requests(self) -> dict[Any, Any] | None:
        """aiocoap's requests and observations in flight: (token, remote) -> request;
        None once the context shuts down."""
        requests: dict[Any, Any] | None = self.tokens.outgoing_requests
        return requests


def udp_stacks(context: Any) -> list[UdpStack]:
    """The plain UDP sockets of an aiocoap client `context` (DTLS and OSCORE ride on their
    own transports); CompatError when this aiocoap does not look as expected."""
    from aiocoap.transports.udp6 import MessageInterfaceUDP6

    stacks = []
    for manager in _need(context, "request_interfaces", "to find its UDP socket"):
        if not isinstance(manager, TokenManager):
            continue
        messages = _need(manager, "token_interface", "to find its UDP socket")
        interface = getattr(messages, "message_interface", None)
        if not isinstance(interface, MessageInterfaceUDP6):
            continue
        transport = _need(interface, "transport", "to read its UDP socket")
        _need(transport, "_read_ready", "to read its UDP socket itself")
        for name in ("dispatch_message", "dispatch_error"):
            _need(messages, name, "to hand it what passed the guard")
        _need(manager, "next_token", "to choose random tokens")
        if not isinstance(getattr(manager, "outgoing_requests", None), dict):
            raise CompatError("aiocoap's TokenManager has no 'outgoing_requests' table, which "
                              "the gateway needs to check what answers are expected")
        sock = transport.get_extra_info("socket")
        if not isinstance(sock, socket.socket) or sock.type != socket.SOCK_DGRAM:
            raise CompatError("aiocoap's UDP transport does not expose its socket")
        stacks.append(UdpStack(interface, messages, manager, transport, sock))
    return stacks


def token_managers(context: Any) -> list[Any]:
    return [m for m in getattr(context, "request_interfaces", ()) if isinstance(m, TokenManager)]


def choose_tokens(manager: Any, draw: Callable[[Callable[[bytes], bool]], bytes]) -> None:
    """Have `manager` (a TokenManager) take each request's token from `draw(taken)`, where
    `taken(token)` says whether a request with that token to the same remote is in flight.

    aiocoap assigns the token inside ``TokenManager.request`` by calling ``next_token()``,
    which knows nothing of the remote; the wrapper notes the remote for it."""
    original_request = _need(manager, "request", "to choose random tokens")
    _need(manager, "next_token", "to choose random tokens")
    remote_of_request: list[Any] = [None]

    def taken(token: bytes) -> bool:
        requests = manager.outgoing_requests
        return requests is not None and (token, remote_of_request[0]) in requests

    def next_token() -> bytes:
        return draw(taken)

    def request(pipe: Any) -> None:
        remote_of_request[0] = getattr(getattr(pipe, "request", None), "remote", None)
        try:
            original_request(pipe)
        finally:
            remote_of_request[0] = None

    manager.next_token = next_token
    manager.request = request


def stop_interest(request: Any) -> None:
    """End aiocoap's client request `request` for good (its token freed), whatever its
    state; for an observation whose sensor is silent, aiocoap would wait for the next
    notification before acting on a cancellation. (A block-wise request has none: it
    ends with its response future.)"""
    stop = getattr(request, "_stop_interest", None)
    if callable(stop):
        stop()


def deregister(context: Any, request: Any, message: Any) -> bool:
    """Send `message` (a GET with Observe = 1) with the token of the registration `request`
    (RFC 7641 §3.6), on the token manager that holds the observation, else on the one whose
    socket the sensor's address belongs to; True when it was handed to one."""
    key = (request.token, request.remote)
    managers = token_managers(context)
    holding = [m for m in managers if key in (m.outgoing_requests or {})] or [
        m for m in managers
        if getattr(m.token_interface, "message_interface", None)
        is getattr(request.remote, "interface", object())
    ]
    for manager in holding:
        manager.token_interface.send_message(message, lambda: None)
        return True
    return False


def _endpoint_class() -> Any:
    from aiocoap.transports.udp6 import UDP6EndpointAddress

    return UDP6EndpointAddress


# -- block-wise requests -------------------------------------------------------------------------


@functools.cache
def _block1_request_class() -> type[Any]:
    from aiocoap.protocol import BlockwiseRequest

    class Block1Request(BlockwiseRequest):  # type: ignore[misc]  # aiocoap is untyped
        """aiocoap's block-wise client request, for its Block1 half only: it stops after
        the first block of the answer, which the caller completes, bounded."""

        @classmethod
        async def _complete_by_requesting_block2(
            cls, protocol: Any, request_to_repeat: Any, initial_response: Any, log: Any
        ) -> Any:
            return initial_response

    return Block1Request


def block1_request(context: Any, message: Any) -> Any:
    """Send `message` with aiocoap's client request, in Block1 blocks when its payload needs
    them (RFC 7959 §2.5); the request's `response` is the answer's first block."""
    return _block1_request_class()(context, message)


# -- DTLS -------------------------------------------------------------------------------------


def dtls_interfaces(context: Any) -> list[Any]:
    """The DTLS message interfaces of an aiocoap client `context`."""
    from aiocoap.transports.tinydtls import MessageInterfaceTinyDTLS

    found = []
    for request_interface in context.request_interfaces:
        message_manager = getattr(request_interface, "token_interface", None)
        interface = getattr(message_manager, "message_interface", None)
        if isinstance(interface, MessageInterfaceTinyDTLS):
            found.append(interface)
    return found


def watch_dtls_handshakes(
    interface: Any, timeout: float, failure: Callable[[str], BaseException]
) -> None:
    """Give up each new DTLS connection of `interface` whose handshake has not completed
    within `timeout`: what waits on it fails with `failure(where)`, and the next request
    starts a fresh handshake (aiocoap would wait for it forever)."""
    connection_for_address = _need(interface, "_connection_for_address",
                                   "to give up a DTLS handshake that does not complete")
    pool = _need(interface, "_pool", "to give up a DTLS handshake that does not complete")
    watched: weakref.WeakSet[Any] = weakref.WeakSet()

    def connection(host: str, port: int, psk_id: bytes, psk: bytes) -> Any:
        conn = connection_for_address(host, port, psk_id, psk)
        if conn not in watched:
            watched.add(conn)
            asyncio.get_running_loop().call_later(
                timeout, _check_handshake, weakref.ref(conn), pool, failure
            )
        return conn

    interface._connection_for_address = connection


def _check_handshake(
    ref: weakref.ref[Any], pool: Any, failure: Callable[[str], BaseException]
) -> None:
    conn = ref()
    # aiocoap keeps the messages sent during the handshake in `_queue` and sets it to None
    # once the handshake is done; a connection that failed is no longer in the pool.
    if conn is None or getattr(conn, "_queue", None) is None:
        return
    if conn not in list(pool.values()):
        return
    where = str(getattr(conn, "hostinfo", "?"))
    try:
        conn._inject_error(failure(where))  # fails what waits on it, drops it from the pool
    except Exception:
        log.warning("could not abandon the DTLS handshake with %s", where, exc_info=True)


# -- OSCORE -----------------------------------------------------------------------------------


def oscore_transports(context: Any) -> list[Any]:
    """The OSCORE transports of an aiocoap client `context` (none without OSCORE)."""
    if coap_defaults.oscore_missing_modules():
        return []
    from aiocoap.transports.oscore import TransportOSCORE

    return [i for i in context.request_interfaces if isinstance(i, TransportOSCORE)]


def end_oscore_observations_with_interest(transport: Any) -> None:
    """Let a cancelled OSCORE observation end at the sensor.

    aiocoap's OSCORE transport runs each request as a task that follows the protected
    ("wire") observation and decrypts its notifications into the gateway's request; when the
    gateway cancels the latter, the wire observation goes on for good: the sensor keeps
    notifying, and every notification is logged as arriving after the end. So each wire
    request is noted with the task that made it, and when the gateway loses interest in the
    OSCORE request, its wire observation is ended as well: the task stops following it, and
    aiocoap answers the sensor's next notifications with RST, which ends the observation
    there (RFC 7641 §3.6). What the task still reports afterwards is dropped quietly.
    """
    original_request = _need(transport, "request", "to end cancelled OSCORE observations")
    tasks = _need(transport, "_tasks", "to end cancelled OSCORE observations")
    wire = _need(transport, "_wire", "to end cancelled OSCORE observations")
    if not isinstance(tasks, set):
        raise CompatError(f"aiocoap {_version()}: TransportOSCORE._tasks is no set")
    wire_requests: dict[asyncio.Task[Any], list[Any]] = {}
    transport._wire = _WireRecorder(wire, wire_requests)

    def request(pipe: Any) -> None:
        before = set(tasks)
        original_request(pipe)
        for task in tasks - before:  # the one task that carries this request
            made: list[Any] = []
            wire_requests[task] = made
            task.add_done_callback(lambda done: wire_requests.pop(done, None))
            _end_with_interest(pipe, made)

    transport.request = request


class _WireRecorder:
    """The context as the OSCORE transport's wire, noting each wire request by its task."""

    def __init__(self, context: Any, wire_requests: dict[asyncio.Task[Any], list[Any]]) -> None:
        self._context = context
        self._wire_requests = wire_requests

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)

    def request(self, message: Any, *args: Any, **kwargs: Any) -> Any:
        wire_request = self._context.request(message, *args, **kwargs)
        made = self._wire_requests.get(asyncio.current_task())  # type: ignore[arg-type]
        if made is not None:
            made.append(wire_request)
        return wire_request


def _end_with_interest(pipe: Any, wire_requests: list[Any]) -> None:
    ended = False
    add_response, add_exception = pipe.add_response, pipe.add_exception

    def end() -> None:
        nonlocal ended
        ended = True
        for wire_request in wire_requests:
            observation = getattr(wire_request, "observation", None)
            if observation is not None and not observation.cancelled:
                observation.error(coap_error.ObservationCancelled())

    def response(*args: Any, **kwargs: Any) -> None:
        if not ended:
            add_response(*args, **kwargs)

    def exception(*args: Any, **kwargs: Any) -> None:
        if not ended:
            add_exception(*args, **kwargs)

    pipe.add_response, pipe.add_exception = response, exception
    pipe.on_interest_end(end)


@functools.cache
def oscore_context_class() -> type[Any]:
    """aiocoap's FilesystemSecurityContext, made safe to fail.

    aiocoap takes the directory's lock before it reads the context; when reading fails
    (a missing key, invalid JSON) the half-built object keeps the lock, and its ``__del__``
    later raises AttributeError from wherever the garbage collector happens to run. Here a
    failed load releases the lock at once and leaves nothing for ``__del__`` to do.
    """
    from aiocoap.oscore import FilesystemSecurityContext

    class SecurityContext(FilesystemSecurityContext):  # type: ignore[misc]
        def __init__(self, basedir: str) -> None:
            try:
                super().__init__(basedir)
            except BaseException:
                lock, self.lockfile = getattr(self, "lockfile", None), None
                if lock is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(lock.lock_file)
                    lock.release()
                raise

    return SecurityContext


def release_oscore_context(item: Any) -> None:
    """Write back an OSCORE context's sequence numbers and free its directory lock now (not
    when the garbage collector gets to it); nothing for other credentials."""
    destroy = getattr(item, "_destroy", None)
    if callable(destroy) and getattr(item, "lockfile", None) is not None:
        destroy()


ACCEPT_EXHAUSTED: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
"""The accept() failures on which asyncio pauses the listener (asyncio/selector_events.py)."""
ACCEPT_PARAMETERS: Final = ("self", "protocol_factory", "sock")
"""The first parameters of ``BaseSelectorEventLoop._accept_connection`` (3.11 to 3.13)."""


class AcceptGate(Protocol):
    def no_room(self) -> str | None:
        """Why no connection may be accepted now (None: one may)."""

    def accepted(self) -> None:
        """One was: it holds a descriptor from now on."""


_accept_gates: dict[int, AcceptGate] = {}
"""Listening sockets (by descriptor) whose accepting waits for room (`gate_accepts`)."""


def gate_accepts(fd: int, gate: AcceptGate) -> None:
    """Before each accept() on listening socket `fd`, ask `gate.no_room()`: a reason pauses
    accepting as a failed accept() would (`accept_backoff`), so that the process stops
    taking connections before it runs out of descriptors, not after. `gate.accepted()` is
    told of each connection as accept() returns it: asyncio creates its protocol a loop
    turn or two later, after the rest of the pass (up to `backlog` connections)."""
    _accept_gates[fd] = gate


def ungate_accepts(fd: int) -> None:
    _accept_gates.pop(fd, None)


class _AcceptOnce:
    """A listening socket as asyncio's accept pass sees it: once an accept() has failed for
    want of resources (or its gate said there is no room), the rest of the pass finds
    nothing to accept (BlockingIOError ends it). Everything else is the socket's."""

    __slots__ = ("exhausted", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.exhausted = False

    def accept(self) -> tuple[socket.socket, Any]:
        if self.exhausted:
            raise BlockingIOError(errno.EAGAIN, "accepting paused")
        gate = _accept_gates.get(self.sock.fileno())
        why = gate.no_room() if gate is not None else None
        if why is not None:
            # asyncio's own pause: reader removed, retried in a second, reported once.
            self.exhausted = True
            raise OSError(errno.EMFILE, why)
        try:
            connection = self.sock.accept()
        except OSError as exc:
            if exc.errno in ACCEPT_EXHAUSTED:
                self.exhausted = True
            raise
        if gate is not None:
            gate.accepted()
        return connection

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def accept_backoff(loop: asyncio.AbstractEventLoop) -> bool:
    """Make one failed accept() end asyncio's accept pass on `loop` (see the module
    docstring); asyncio then pauses that listener for a second, once. True when installed;
    False for an event loop that is not asyncio's selector loop (uvloop: its own accept).
    Raises CompatError when a selector loop lacks the method this wraps."""
    from asyncio import selector_events

    if not isinstance(loop, selector_events.BaseSelectorEventLoop):
        return False
    original = getattr(type(loop), "_accept_connection", None)
    if original is None or tuple(inspect.signature(original).parameters)[:3] != ACCEPT_PARAMETERS:
        raise CompatError(
            "asyncio: BaseSelectorEventLoop has no _accept_connection(protocol_factory, sock, "
            "...), which the gateway wraps so that accepting at the open-files limit pauses "
            "instead of logging a traceback per attempt (tested with Python 3.11 to 3.13)"
        )
    if getattr(loop, "_accept_connection", None).__name__ == "accept_once":  # type: ignore[union-attr]
        return True

    def accept_once(protocol_factory: Any, sock: Any, *args: Any, **kwargs: Any) -> Any:
        # asyncio hands the socket it was given to its resume timer: unwrap it each time.
        real = sock.sock if isinstance(sock, _AcceptOnce) else sock
        return original(loop, protocol_factory, _AcceptOnce(real), *args, **kwargs)

    loop._accept_connection = accept_once  # type: ignore[attr-defined]
    return True
