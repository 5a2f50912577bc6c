"""The CoAP side: the one aiocoap client context, upstream observations and forwarded requests.

It owns I/O toward the sensors and nothing else. Each upstream observation is one named task
iterating aiocoap's observation with `async for`; what arrives is reported through the
`ObservationListener` given at construction as plain values (`CoapAnswer`), so this module
knows nothing of the hub, the frames or WebSockets. Stopping an observation deregisters it
at the sensor (a GET with Observe = 1 and the observation's token, RFC 7641 §3.6) so that a
sensor notifying with NON stops at once rather than talking to a gateway that ignores it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Final, Protocol

import aiocoap
from aiocoap import error as coap_error
from aiocoap.numbers.codes import Code
from aiocoap.tokenmanager import TokenManager

log = logging.getLogger(__name__)

REGISTRATION_TIMEOUT: Final = 10.0
"""A registration (the first GET with Observe = 0) unanswered for this long has failed."""
DEREGISTRATION_TIMEOUT: Final = 2.0
"""How long a stop waits for the sensor to confirm the deregistration before dropping it."""
DISCOVERY_TIMEOUT: Final = 5.0

_METHOD_CODES: Final = {
    "GET": Code.GET,
    "POST": Code.POST,
    "PUT": Code.PUT,
    "DELETE": Code.DELETE,
    "FETCH": Code.FETCH,
    "PATCH": Code.PATCH,
    "iPATCH": Code.iPATCH,
}


@dataclass(frozen=True, slots=True)
class CoapAnswer:
    """One CoAP response or notification, as plain values."""

    code: str
    cf: int | None
    payload: bytes
    max_age: int | None
    observe: int | None


class UpstreamError(Exception):
    """A request's sensor is unreachable or reset it (protocol error `upstream_error`)."""


class ObservationListener(Protocol):
    def answer(self, uri: str, answer: CoapAnswer) -> None:
        """A response or notification arrived on the observation of `uri`."""

    def failed(self, uri: str, reason: str) -> None:
        """The observation of `uri` got no answer or ended without one; it is not running."""


def _code_text(code: Any) -> str:
    return str(code.dotted)  # "2.05"


def to_answer(message: aiocoap.Message) -> CoapAnswer:
    cf = message.opt.content_format
    return CoapAnswer(
        code=_code_text(message.code),
        cf=None if cf is None else int(cf),
        payload=bytes(message.payload),
        max_age=message.opt.max_age,
        observe=message.opt.observe,
    )


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]


class _Observation:
    """The bookkeeping of one upstream observation (its task and its aiocoap request)."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.task: asyncio.Task[None] | None = None
        self.first: aiocoap.Message | None = None
        self.stopping = False


class CoapSide:
    """The aiocoap client context and everything that runs on it."""

    def __init__(self, listener: ObservationListener) -> None:
        self._listener = listener
        self._context: aiocoap.Context | None = None
        self._observations: dict[str, _Observation] = {}
        self._stopping: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        # Only UDP: the defaults would also open TCP/WebSocket/TLS client transports the
        # gateway does not use.
        self._context = await aiocoap.Context.create_client_context(transports=["udp6"])

    async def shutdown(self) -> None:
        """Deregister every observation at its sensor, then close the context."""
        for uri in list(self._observations):
            self.stop_observation(uri)
        if self._stopping:
            await asyncio.wait(self._stopping, timeout=DEREGISTRATION_TIMEOUT + 1)
        if self._context is not None:
            await self._context.shutdown()
            self._context = None

    @property
    def context(self) -> aiocoap.Context:
        if self._context is None:
            raise RuntimeError("the CoAP side is not started")
        return self._context

    @property
    def observed(self) -> tuple[str, ...]:
        return tuple(self._observations)

    # -- observations ------------------------------------------------------------------------

    def start_observation(self, uri: str) -> None:
        """Start observing `uri` unless an observation of it is already running."""
        current = self._observations.get(uri)
        if current is not None and not current.stopping:
            return
        observation = _Observation(uri)
        self._observations[uri] = observation
        observation.task = asyncio.create_task(
            self._observe(observation), name=f"observe {uri}"
        )

    def stop_observation(self, uri: str) -> None:
        observation = self._observations.pop(uri, None)
        if observation is None or observation.stopping:
            return
        observation.stopping = True
        task = asyncio.create_task(self._stop(observation), name=f"deregister {uri}")
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    async def _observe(self, observation: _Observation) -> None:
        uri = observation.uri
        listener = self._listener
        request = self.context.request(aiocoap.Message(code=Code.GET, uri=uri, observe=0))
        try:
            try:
                async with asyncio.timeout(REGISTRATION_TIMEOUT):
                    first = await request.response
            except TimeoutError:
                listener.failed(uri, f"no answer within {REGISTRATION_TIMEOUT:g} s")
                return
            observation.first = first
            listener.answer(uri, to_answer(first))
            if request.observation is None or first.opt.observe is None:
                return  # not observable: the one answer is all there is
            async for notification in request.observation:
                if observation.stopping:
                    return  # the answer to our own deregistration, not an update
                listener.answer(uri, to_answer(notification))
            if not observation.stopping:
                listener.failed(uri, "the sensor ended the observation")
        except asyncio.CancelledError:
            raise
        except coap_error.Error as exc:
            if not observation.stopping:
                listener.failed(uri, _describe(exc))
        except Exception as exc:  # a bug here must not kill the gateway; say it loudly
            log.exception("observation of %s failed", uri)
            if not observation.stopping:
                listener.failed(uri, _describe(exc))
        finally:
            # Without this aiocoap would keep the token and go on acknowledging
            # notifications of an observation nobody reads.
            if request.observation is not None and not request.observation.cancelled:
                request.observation.cancel()
            if self._observations.get(uri) is observation:
                del self._observations[uri]

    async def _stop(self, observation: _Observation) -> None:
        task = observation.task
        if task is None or task.done():
            return
        if observation.first is not None and observation.first.opt.observe is not None:
            self._send_deregistration(observation.first)
            # The sensor's answer to the deregistration ends aiocoap's observation, and
            # with it the task.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(task), DEREGISTRATION_TIMEOUT)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _send_deregistration(self, first: aiocoap.Message) -> None:
        """Send GET with Observe = 1 under the observation's own token (RFC 7641 §3.6).

        aiocoap's public request API always picks a fresh token, so this goes one layer
        down, to the token manager's message layer, which matches the sensor's answer
        to the still-open observation.
        """
        request = getattr(first, "request", None)
        if request is None or request.remote is None:
            return
        key = (request.token, request.remote)
        for interface in self.context.request_interfaces:
            if isinstance(interface, TokenManager) and key in interface.outgoing_requests:
                message = request.copy(observe=1, mid=None)
                message.token = request.token
                message.remote = request.remote
                try:
                    interface.token_interface.send_message(message, lambda: None)
                except Exception:  # the fallback (cancel) still happens in _stop
                    log.debug("deregistration of %s not sent", request.remote, exc_info=True)
                return

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
        """One CoAP request; raises TimeoutError or UpstreamError."""
        message = aiocoap.Message(
            code=_METHOD_CODES[method],
            uri=uri,
            payload=payload,
            transport_tuning=aiocoap.Reliable if confirmable else aiocoap.Unreliable,
        )
        if cf is not None:
            message.opt.content_format = cf
        if accept is not None:
            message.opt.accept = accept
        return await self._send(message, timeout)

    async def _send(self, message: aiocoap.Message, timeout: float) -> CoapAnswer:
        pending = self.context.request(message)
        try:
            async with asyncio.timeout(timeout):
                response = await pending.response
        except TimeoutError:
            pending.response.cancel()  # stops aiocoap's retransmissions
            raise
        except coap_error.Error as exc:
            raise UpstreamError(_describe(exc)) from exc
        except OSError as exc:
            raise UpstreamError(_describe(exc)) from exc
        return to_answer(response)

    async def discover(self, origin: str) -> str:
        """GET `origin`/.well-known/core; returns the link-format text (UpstreamError)."""
        answer = await self.request(
            "GET", origin + "/.well-known/core", timeout=DISCOVERY_TIMEOUT
        )
        if not answer.code.startswith("2."):
            raise UpstreamError(f"/.well-known/core answered {answer.code}")
        return answer.payload.decode("utf-8", errors="replace")

