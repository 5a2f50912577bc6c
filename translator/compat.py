"""Every private or internal aiocoap API the gateway touches, each with why; nothing else.

aiocoap is pinned to 0.4.x (pyproject.toml). Its client has no public way to read its UDP
socket, to choose the tokens it sends, or to see what it has in flight, and the gateway
needs all three to hold its own on an untrusted network (translator/coap_guard.py,
translator/udp_batch.py). Each such use is a function or method here, and
:func:`udp_stacks` checks, when the CoAP side starts, that this aiocoap has every one of
them: an aiocoap without one is refused with :class:`CompatError` naming what is missing,
rather than leaving the gateway unguarded.

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
- ``ClientRequest._stop_interest``: ends an observation whose sensor went silent (aiocoap
  acts on a cancelled observation only when its next notification arrives).
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiocoap.message import Direction, Message
from aiocoap.tokenmanager import TokenManager

__all__ = [
    "CompatError",
    "UdpStack",
    "deregister",
    "stop_interest",
    "udp_stacks",
]


class CompatError(RuntimeError):
    """This aiocoap lacks an internal API that the gateway relies on."""


def _need(obj: Any, name: str, why: str) -> Any:
    value = getattr(obj, name, None)
    if value is None:
        import aiocoap.meta

        raise CompatError(
            f"aiocoap {getattr(aiocoap.meta, 'version', '?')}: {type(obj).__name__} has no "
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
    notification before acting on a cancellation."""
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
