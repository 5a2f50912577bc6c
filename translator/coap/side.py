"""`CoapSide`: the one aiocoap client context and everything that runs on it, as the gateway
sees it.

It owns I/O toward the sensors and nothing else. What arrives is reported through the
`ObservationListener` given at construction as plain values (`CoapAnswer`) and short
reasons, so this package knows nothing of the hub, the frames or WebSockets. The work is
done by the modules it wires: the context by `security`, the supervised observations by
`observations`, requests and block fetches by `exchanges` (see translator/coap/__init__.py).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any, Final

import aiocoap

from translator.coap import exchanges
from translator.coap.answers import CoapAnswer, RepresentationTooLarge, UpstreamError
from translator.coap.batch import RECEIVE_BUFFER, readers_of
from translator.coap.kernel_drops import kernel_drops
from translator.coap.observations import DEREGISTRATION_TIMEOUT, ObservationListener, Observations
from translator.coap.security import client_context, close_client_context
from translator.config import SupervisionConfig

__all__ = [
    "DEREGISTRATION_TIMEOUT",
    "DISCOVERY_TIMEOUT",
    "CoapAnswer",
    "CoapSide",
    "ObservationListener",
    "RepresentationTooLarge",
    "UpstreamError",
]

DISCOVERY_TIMEOUT: Final = 5.0


class CoapSide:
    """The aiocoap client context, the supervised observations and requests on it."""

    def __init__(
        self,
        listener: ObservationListener,
        supervision: SupervisionConfig | None = None,
        *,
        max_representation: int = 1_048_576,
        rng: random.Random | None = None,
        credentials: Mapping[str, Mapping[str, Any]] | None = None,
        receive_buffer: int = RECEIVE_BUFFER,
    ) -> None:
        self.max_representation = max_representation
        self.receive_buffer = receive_buffer
        """Bytes asked for the UDP socket's receive buffer (``[coap] receive_buffer``)."""
        self._credentials = dict(credentials or {})
        """aiocoap client credentials (`translator.credentials.client_credentials`)."""
        self._context: aiocoap.Context | None = None
        self.observations = Observations(
            listener,
            supervision or SupervisionConfig(),
            max_representation=max_representation,
            rng=rng or random.Random(),
            # OSCORE's transport must pick requests by their URI and wrap the address itself.
            share_addresses=not any("oscore" in item for item in self._credentials.values()),
        )

    async def start(self) -> None:
        # UDP, plus DTLS and OSCORE when credentials ask for them: the defaults would also
        # open TCP/WebSocket/TLS client transports the gateway does not use.
        self._context = await client_context(self._credentials, self.receive_buffer)
        self.observations.context = self._context

    async def shutdown(self) -> None:
        """Deregister every observation at its sensor, then close the context."""
        await self.observations.stop_all()
        if self._context is not None:
            await close_client_context(self._context)
            self._context = None

    @property
    def context(self) -> aiocoap.Context:
        if self._context is None:
            raise RuntimeError("the CoAP side is not started")
        return self._context

    @property
    def supervision(self) -> SupervisionConfig:
        return self.observations.supervision

    @property
    def dropped(self) -> dict[str, int]:
        """What the CoAP socket dropped, by kind (``coap.unmatched``, ``coap.request``,
        ``coap.icmp-unmatched``...): datagrams and ICMP errors that answered nothing in
        flight, could not be handled, or were too long (translator/coap/batch.py)."""
        counts: dict[str, int] = {}
        if self._context is not None:
            for reader in readers_of(self._context):
                for kind, count in reader.dropped.items():
                    counts[kind] = counts.get(kind, 0) + count
        return counts

    @property
    def kernel_drops(self) -> int | None:
        """Datagrams the kernel dropped at the CoAP sockets (their receive buffers were full),
        or None where the system does not say (translator/coap/kernel_drops.py)."""
        if self._context is None:
            return None
        return kernel_drops(reader.sock for reader in readers_of(self._context))

    # -- observations ------------------------------------------------------------------------

    @property
    def observed(self) -> tuple[str, ...]:
        """The URIs with a supervised observation (registered, registering or waiting)."""
        return self.observations.observed

    @property
    def busy(self) -> int:
        """Observation tasks still running, deregistrations included."""
        return self.observations.busy

    def start_observation(self, uri: str) -> None:
        """Observe `uri`, supervised, until `stop_observation` (no-op when already running)."""
        self.observations.start(uri)

    def stop_observation(self, uri: str) -> None:
        self.observations.stop(uri)

    # -- requests ----------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        uri: str,
        *,
        payload: bytes = b"",
        cf: int | None = None,
        accept: int | None = None,
        confirmable: bool = True,
        timeout: float = 10.0,
    ) -> CoapAnswer:
        """One CoAP request; raises TimeoutError or UpstreamError (RepresentationTooLarge
        for an answer larger than ``max_representation``)."""
        message = exchanges.request_message(method, uri, payload, cf, accept, confirmable)
        return await exchanges.send(self.context, message, timeout, self.max_representation)

    async def discover(self, origin: str) -> str:
        """GET `origin`/.well-known/core; returns the link-format text (UpstreamError)."""
        answer = await self.request(
            "GET", origin + "/.well-known/core", timeout=DISCOVERY_TIMEOUT
        )
        if not answer.code.startswith("2."):
            raise UpstreamError(f"/.well-known/core answered {answer.code}")
        return answer.payload.decode("utf-8", errors="replace")
