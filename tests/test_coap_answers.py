"""Failures in words a user can act on (translator/coap/answers.py `describe`), without
sockets: what aiocoap raises, as it raises it, and what the gateway says instead of
"Network error: NetworkError"."""

from __future__ import annotations

import errno

import pytest
from aiocoap import error as coap_error

from translator.coap.answers import IcmpError, describe
from translator.coap.security import DtlsHandshakeFailed


def network_error(cause: OSError) -> coap_error.NetworkError:
    """What aiocoap's token manager makes of an OSError (tokenmanager.dispatch_error)."""
    exc = coap_error.NetworkError(str(cause))
    exc.__cause__ = cause
    return exc


@pytest.mark.parametrize(
    ("cause", "said"),
    [
        (IcmpError(errno.ECONNREFUSED, "x"),
         "port unreachable: nothing listens on that UDP port (ICMP error)"),
        (IcmpError(errno.EHOSTUNREACH, "x"), "host unreachable (ICMP error)"),
        (OSError(errno.ENETUNREACH, "x"), "no route to the network"),
        (OSError(errno.EACCES, "x"),
         "the operating system refused to send (a firewall, or a broadcast address)"),
        (OSError(errno.EIO, "x"), "input/output error"),
    ],
)
def test_a_network_error_says_what_failed(cause: OSError, said: str) -> None:
    assert str(network_error(cause)) == "Network error: NetworkError"  # aiocoap's text
    assert describe(network_error(cause)) == said
    assert describe(cause) == said


def test_reset_retransmissions_and_the_rest() -> None:
    assert describe(coap_error.MessageError()) == (
        "the sensor reset the exchange (RST): it does not know the request")
    assert describe(coap_error.ConRetransmitsExceeded("Retransmissions exceeded")) == (
        "no answer: every retransmission of the confirmable request went unanswered")
    assert describe(coap_error.NetworkError()) == "network error (NetworkError)"
    assert describe(coap_error.ResolutionError("no such host")) == (
        "Name resolution error: no such host")
    assert describe(DtlsHandshakeFailed("DTLS handshake with h not completed")) == (
        "DTLS handshake with h not completed")
