"""The operator's endpoints on an address of their own (``[metrics] listen``).

A scraper on another network than the WebSocket clients reaches ``GET /metrics`` here, in
plain HTTP/1.1, one request per connection. ``/healthz`` and ``/readyz`` are answered too
(they reveal nothing, and a probe may live on the scraper's network); every other path is
404. What the answers say is decided exactly as on the WebSocket port (`web.front`: the
request head is read and parsed by the same code, `Operations.metrics` checks the token, the
same `Host` check stops DNS rebinding), so the two ports cannot drift apart.

No thread and no task: an asyncio protocol per connection reads the head, answers at once
(the exposition is built synchronously, from counters), and closes. A connection has
`CONNECTION_TIMEOUT` seconds from accept to the end of the answer before it is dropped, and
at most `MAX_CONNECTIONS` are open at once (a scraper needs one): one that does not send
its head, or does not read the answer, holds nothing for long.
"""

from __future__ import annotations

import asyncio
import email.utils
import http
import logging
from dataclasses import replace
from typing import Final

from translator.web.front import (
    OPERATIONS_PATHS,
    Answer,
    HeadReader,
    HostNames,
    HttpError,
    Operations,
    RequestHead,
    error_answer,
    operations_answer,
    parse_head,
)

__all__ = ["CONNECTION_TIMEOUT", "MAX_CONNECTIONS", "MetricsPort", "host_names"]

log = logging.getLogger(__name__)

CONNECTION_TIMEOUT: Final = 10.0
"""Seconds a connection may take, from accept until its answer is written."""
MAX_CONNECTIONS: Final = 64
"""Connections open at once; more are closed at accept."""
SERVER_HEADER: Final = "coap-ws-gateway"


def host_names(listen_host: str, server_names: tuple[str, ...]) -> HostNames:
    """The names a request's `Host` may carry here: ``localhost``, the listen address when
    it is a name, and ``[server] server_names`` (IP literals are always accepted)."""
    names = {"localhost", *(name.lower().rstrip(".") for name in server_names)}
    names.add(listen_host.lower().rstrip("."))
    return HostNames(frozenset(names))


def answer(head: RequestHead, hosts: HostNames, operations: Operations) -> Answer:
    """The answer to one request on the metrics port."""
    values = head.get_all("Host")
    found = hosts.refusal(values[0] if len(values) == 1 else None)
    if found is None:
        if head.path in OPERATIONS_PATHS:
            found = operations_answer(head, operations)
        else:
            found = error_answer(
                http.HTTPStatus.NOT_FOUND, f"no such path; metrics are at {OPERATIONS_PATHS[2]}"
            )
    return replace(found, body=b"") if head.method == "HEAD" else found


def serialize(answer: Answer) -> bytes:
    """The answer's bytes: status line, headers (with Date and Server), body."""
    status = answer.status
    lines = [f"HTTP/1.1 {status.value} {status.phrase}",
             f"Date: {email.utils.formatdate(usegmt=True)}",
             f"Server: {SERVER_HEADER}"]
    lines += [f"{name}: {value}" for name, value in answer.headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + answer.body


class MetricsPort:
    """The listener: `await start()`, then `await stop()`."""

    def __init__(self, host: str, port: int, hosts: HostNames, operations: Operations) -> None:
        self.host = host
        self.port = port
        self.hosts = hosts
        self.operations = operations
        self._server: asyncio.Server | None = None
        self._open: set[_Exchange] = set()

    async def start(self) -> None:
        """Listen (raises OSError when the address cannot be bound)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Exchange(self), self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for exchange in list(self._open):
            exchange.abort()
        await self._server.wait_closed()
        self._server = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"


class _Exchange(asyncio.Protocol):
    """One connection: its request head, then the answer."""

    def __init__(self, port: MetricsPort) -> None:
        self.port = port
        self.reader: HeadReader | None = HeadReader()
        self.transport: asyncio.Transport | None = None
        self.deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if len(self.port._open) >= MAX_CONNECTIONS:
            log.warning("metrics port: more than %d connections, closing one", MAX_CONNECTIONS)
            transport.abort()
            return
        self.port._open.add(self)
        self.deadline = asyncio.get_running_loop().call_later(CONNECTION_TIMEOUT, self.abort)

    def data_received(self, data: bytes) -> None:
        reader, transport = self.reader, self.transport
        if reader is None or transport is None:
            return  # answered: what follows is not read
        try:
            found = reader.feed(data)
            if found is None:
                return
            result = answer(parse_head(found[0]), self.port.hosts, self.port.operations)
        except HttpError as error:
            result = error_answer(error.status, error.message)
        self.reader = None
        transport.write(serialize(result))
        transport.close()  # once the answer is written

    def eof_received(self) -> bool:
        return False  # the answer (if any) is written, then the transport closes

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
        self.port._open.discard(self)
