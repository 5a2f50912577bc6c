"""Protected sensors: the ``[[credentials]]`` configuration as aiocoap's client credentials.

This module only translates. :func:`client_credentials` turns the validated entries into the
dictionary that aiocoap's ``CredentialsMap.load_from_dict`` takes (the same structure as
aiocoap's own JSON credential files), and :func:`transports_for` says which aiocoap client
transports that needs. Loading it into a context, which opens OSCORE context directories, is
:mod:`translator.coap.security`'s business; nothing here does I/O.

The two kinds, one per entry, keyed by the entry's normalized ``match`` pattern::

    {"coaps://192.0.2.7:5684/*": {"dtls": {"psk": {"hex": "…"},
                                           "client-identity": {"hex": "…"}}},
     "coap://192.0.2.8:5683/*": {"oscore": {"basedir": "/etc/…/kitchen"}}}

The keys are the normalized origin patterns of :class:`~translator.config.CredentialConfig`;
the entry for a request is chosen by its origin alone (scheme, host, port), by
:mod:`translator.coap.security`, not by aiocoap's whole-URI matching.
"""

from collections.abc import Mapping, Sequence
from typing import Any

from translator.config import CredentialConfig

__all__ = ["client_credentials", "transports_for"]


def client_credentials(entries: Sequence[CredentialConfig]) -> dict[str, dict[str, Any]]:
    """The aiocoap credentials dictionary for `entries`, in their order."""
    result: dict[str, dict[str, Any]] = {}
    for entry in entries:
        if entry.kind == "oscore":
            result[entry.match] = {"oscore": {"basedir": entry.oscore_context}}
        else:
            assert entry.dtls_identity is not None
            result[entry.match] = {
                "dtls": {
                    "psk": {"hex": entry.psk.hex()},
                    "client-identity": {"hex": entry.dtls_identity.encode().hex()},
                }
            }
    return result


def transports_for(credentials: Mapping[str, Mapping[str, Any]]) -> list[str]:
    """The aiocoap client transports a context with `credentials` needs.

    Always ``udp6``; ``tinydtls`` when there is a DTLS key (``coaps://``); ``oscore`` when
    there is an OSCORE context, first, because aiocoap offers a request to its transports in
    order and the OSCORE one must see it before plain UDP does (it then hands the protected
    message on to UDP itself).
    """
    kinds = {kind for item in credentials.values() for kind in item}
    transports = ["udp6"]
    if "oscore" in kinds:
        transports.insert(0, "oscore")
    if "dtls" in kinds:
        transports.append("tinydtls")
    return transports
