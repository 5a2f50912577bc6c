"""The address of each sensor, resolved once and shared by every registration there.

aiocoap would resolve the address for each request, in a thread of the default executor (a
burst of registrations starts a pool of threads, ~1 MiB), and keep a copy of it with each
(~270 bytes per observation). Here one registration at a time resolves it, with aiocoap's own
`find_remote_and_interface`, and the others wait for that and share the result, for as long
as a registration uses it (a weak reference). Only ``coap://`` URIs with an IP literal are
shared: a host name is resolved by aiocoap for every registration, so that a change of its
address is followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import weakref
from typing import Any

from translator.core.uris import UriError, parse_coap_uri

__all__ = ["SharedAddresses"]


class SharedAddresses:
    """Sensor origin -> the address aiocoap resolved for a registration there."""

    def __init__(self) -> None:
        self._remotes: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
        self._resolving: dict[str, asyncio.Future[Any]] = {}
        """Origin -> the resolution of its address in progress."""

    def __len__(self) -> int:
        return len(self._remotes)

    async def address(self, context: Any, uri: str, message: Any) -> None:
        """Address `message` (a request of `context` for `uri`) to its sensor, shared when
        `uri` has an IP literal; raises what aiocoap's resolution raises."""
        origin = _origin(uri)
        if origin is None:
            return  # aiocoap resolves it with the request
        known = self._remotes.get(origin)
        resolving = self._resolving.get(origin)
        if known is None and resolving is not None:
            await asyncio.wait([resolving])  # its failure is its own: then resolve here
            known = self._remotes.get(origin)
        if known is not None:
            message.remote = known
            return
        resolution = asyncio.ensure_future(context.find_remote_and_interface(message))
        self._resolving[origin] = resolution
        try:
            await resolution  # aiocoap sets `message.remote` to the address it found
        finally:
            if self._resolving.get(origin) is resolution:
                del self._resolving[origin]
        # (An address that cannot be referenced weakly, of some other transport, is not
        # shared: the next registration resolves its own.)
        with contextlib.suppress(TypeError):
            self._remotes[origin] = message.remote


def _origin(uri: str) -> str | None:
    """The key for `uri`: its origin when it is ``coap://`` with an IP literal, else None."""
    try:
        parsed = parse_coap_uri(uri)
    except UriError:
        return None
    return parsed.origin if parsed.scheme == "coap" and parsed.is_ip_literal else None
