"""The gateway's Resource Directory endpoint (RFC 9176) on its own aiocoap server context.

This module owns the CoAP face of the directory: the server contexts bound to `[coap]
listen`, the routing of requests to the pure table (`translator.core.directory`), the
conversion of its answers and `DirectoryError`s into CoAP responses, block-wise transfers
(bounded: a registration larger than `max_payload` is refused at its first block, and only
sources within `allow_from` get as far as block assembly), simple registration (RFC 9176
§5.1: the directory reads the registrant's /.well-known/core), and the expiry timer.
Every change of the table is reported to the `DirectoryListener` (the gateway), which puts
it into the catalogue.

    /.well-known/core        GET   the directory's own links (rt=core.rd*), with filters
    /.well-known/rd          POST  simple registration
    /rd                      POST  registration
    /rd/N                    POST  update, DELETE removal, GET its links
    /rd-lookup/ep            GET   endpoint lookup
    /rd-lookup/res           GET   resource lookup
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import aiocoap
from aiocoap import error as coap_error
from aiocoap import interfaces
from aiocoap.blockwise import Block1Spool, Block2Cache
from aiocoap.numbers.codes import Code

from translator import compat
from translator.config import parse_listen
from translator.core.directory import (
    LINK_FORMAT,
    Change,
    Directory,
    DirectoryError,
    endpoints_link_format,
    matches_all,
    parse_query,
    registration_link_format,
    resources_link_format,
)
from translator.logs import LimitedLog

log = logging.getLogger(__name__)
refusals = LimitedLog(log)

RETRY_AFTER: Final = 60
"""Max-Age of a 5.03 (the table is full): when a registrant may try again (RFC 9176 §5.3
asks registrants to honour it; aiocoap's client does)."""
SIMPLE_FETCH_TIMEOUT: Final = 5.0

WELL_KNOWN_LINKS: Final = (
    ("rd", {"rt": "core.rd", "ct": "40"}),
    ("rd-lookup/ep", {"rt": "core.rd-lookup-ep", "ct": "40"}),
    ("rd-lookup/res", {"rt": "core.rd-lookup-res", "ct": "40"}),
)
"""What /.well-known/core lists (RFC 9176 §4.3: rt=core.rd, core.rd-lookup-*)."""

_CODES: Final[dict[str, Code]] = {
    "2.01": aiocoap.CREATED, "2.02": aiocoap.DELETED, "2.04": aiocoap.CHANGED,
    "2.05": aiocoap.CONTENT, "4.00": aiocoap.BAD_REQUEST, "4.03": aiocoap.FORBIDDEN,
    "4.04": aiocoap.NOT_FOUND, "4.05": aiocoap.METHOD_NOT_ALLOWED,
    "4.13": aiocoap.REQUEST_ENTITY_TOO_LARGE, "4.15": aiocoap.UNSUPPORTED_CONTENT_FORMAT,
    "5.03": aiocoap.SERVICE_UNAVAILABLE,
}


@dataclass(frozen=True, slots=True)
class _Call:
    """One request, as the handlers need it."""

    path: str
    query: dict[str, str]
    source: tuple[str, int]
    now: float
    payload: bytes
    cf: int | None


Handler = Callable[[_Call], Awaitable[aiocoap.Message]]


class DirectoryListener(Protocol):
    def directory_changed(self, change: Change) -> None:
        """The table changed: registrations added, removed (why) or changed."""


def source_of(request: Any) -> tuple[str, int]:
    """The request's source address, IPv4-mapped addresses as IPv4 (udp6 reports them so)."""
    host, port = request.remote.sockaddr[:2]
    address = ipaddress.ip_address(str(host).partition("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return str(address), int(port)


def _answer(code: str, payload: str | bytes = b"", *, cf: int | None = None) -> aiocoap.Message:
    data = payload.encode() if isinstance(payload, str) else payload
    message = aiocoap.Message(code=_CODES[code], payload=data)
    if cf is not None:
        message.opt.content_format = cf
    if code == "5.03":
        message.opt.max_age = RETRY_AFTER
    return message


class DirectorySite(interfaces.Resource):  # type: ignore[misc]  # aiocoap is untyped
    """Every path of the directory in one resource: the routes are few and fixed."""

    def __init__(
        self,
        directory: Directory,
        listener: DirectoryListener,
        fetch_links: Callable[[str], Awaitable[str]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.directory = directory
        self.listener = listener
        self.fetch_links = fetch_links
        """GET of a registrant's /.well-known/core for simple registration: the gateway's
        CoAP client, so that the same guard and timeouts apply."""
        self.clock = clock
        self._spool = Block1Spool()
        self._cache = Block2Cache()
        self.refused: dict[str, int] = {}
        """Refusals by CoAP code, for the operator."""
        self._routes: dict[str, dict[str, Handler]] = {
            ".well-known/core": {"GET": self._core},
            ".well-known/rd": {"POST": self._simple_registration},
            "rd": {"POST": self._register},
            "rd-lookup/ep": {"GET": self._lookup_endpoints},
            "rd-lookup/res": {"GET": self._lookup_resources},
        }
        self._registration: dict[str, Handler] = {
            "POST": self._update, "DELETE": self._remove, "GET": self._read,
        }

    async def needs_blockwise_assembly(self, request: Any) -> bool:
        return True

    async def render_to_pipe(self, pipe: Any) -> None:
        """Admission before assembly: a source outside `allow_from`, or a transfer that
        would exceed `max_payload`, is refused at its first block (aiocoap's own spool would
        buffer any number of blocks from anyone)."""
        request = pipe.request
        try:
            host, _ = source_of(request)
            if not self.directory.rules.admits_source(host):
                raise DirectoryError("4.03", f"requests from {host} are not allowed")
            block1 = request.opt.block1
            limit = self.directory.rules.max_payload
            if block1 is not None and block1.start + len(request.payload) > limit:
                raise DirectoryError("4.13", f"payload larger than {limit} bytes")
            if request.opt.size1 is not None and request.opt.size1 > limit:
                raise DirectoryError("4.13", f"payload larger than {limit} bytes")
            try:
                whole = self._spool.feed_and_take(request)
                response = await self._cache.extract_or_insert(
                    whole, lambda: self.render(whole)
                )
                response.opt.block1 = whole.opt.block1
            except coap_error.RenderableError as exc:
                response = exc.to_message()
        except DirectoryError as exc:
            response = self._refusal(exc)
            if exc.code == "4.13":
                response.opt.size1 = self.directory.rules.max_payload
        pipe.add_response(response, is_last=True)

    def _refusal(self, exc: DirectoryError) -> aiocoap.Message:
        self.refused[exc.code] = self.refused.get(exc.code, 0) + 1
        refusals.write(exc.code, logging.INFO, "directory refused a request: %s %s",
                       exc.code, exc.message)
        return _answer(exc.code, exc.message)

    async def render(self, request: Any) -> aiocoap.Message:
        try:
            return await self._route(request)
        except DirectoryError as exc:
            return self._refusal(exc)

    async def _route(self, request: Any) -> aiocoap.Message:
        path = "/".join(request.opt.uri_path)
        method = str(request.code)
        call = _Call(path, parse_query(request.opt.uri_query), source_of(request), self.clock(),
                     request.payload, _cf(request))
        # The registration resources (rd/N) share one table; every other path has its own.
        methods = self._registration if path.startswith("rd/") else self._routes.get(path)
        if methods is None:
            raise DirectoryError("4.04", f"nothing at /{path}")
        handler = methods.get(method)
        if handler is None:
            raise DirectoryError("4.05", f"{method} is not allowed on /{path}")
        return await handler(call)

    async def _register(self, call: _Call) -> aiocoap.Message:
        reg, change = self.directory.register(
            call.query, call.payload, call.source, call.now, content_format=call.cf
        )
        self._changed(change)
        response = _answer("2.01")
        response.opt.location_path = tuple(reg.id.split("/"))
        return response

    async def _update(self, call: _Call) -> aiocoap.Message:
        _, change = self.directory.update(
            call.path, call.query, call.source, call.now, payload=call.payload
        )
        self._changed(change)
        return _answer("2.04")

    async def _remove(self, call: _Call) -> aiocoap.Message:
        self._changed(self.directory.remove(call.path, call.source))
        return _answer("2.02")

    async def _read(self, call: _Call) -> aiocoap.Message:
        found = self.directory.get(call.path)
        if found is None:
            raise DirectoryError("4.04", f"no registration at /{call.path}")
        return _answer("2.05", registration_link_format(found), cf=LINK_FORMAT)

    async def _lookup_endpoints(self, call: _Call) -> aiocoap.Message:
        found = self.directory.lookup_endpoints(call.query)
        return _answer("2.05", endpoints_link_format(found), cf=LINK_FORMAT)

    async def _lookup_resources(self, call: _Call) -> aiocoap.Message:
        found = self.directory.lookup_resources(call.query)
        return _answer("2.05", resources_link_format(found), cf=LINK_FORMAT)

    async def _core(self, call: _Call) -> aiocoap.Message:
        return self._well_known(call.query)

    async def _simple_registration(self, call: _Call) -> aiocoap.Message:
        return await self._simple(call.query, call.source, call.now, call.payload)

    def _well_known(self, query: dict[str, str]) -> aiocoap.Message:
        links = [
            f"</{href}>" + "".join(f";{k}={v}" for k, v in attrs.items())
            for href, attrs in WELL_KNOWN_LINKS
            if matches_all(query, {**attrs, "href": "/" + href})
        ]
        return _answer("2.05", ",".join(links), cf=LINK_FORMAT)

    async def _simple(
        self, query: dict[str, str], source: tuple[str, int], now: float, payload: bytes
    ) -> aiocoap.Message:
        """RFC 9176 §5.1: an empty POST; the directory reads the registrant's links."""
        if "base" in query:
            raise DirectoryError("4.00", "simple registration takes no 'base'")
        if payload:
            raise DirectoryError("4.00", "simple registration carries no payload")
        # The checks that need no links first, so that a refused registrant costs no GET.
        if "ep" not in query:
            raise DirectoryError("4.00", "'ep' (the endpoint name) is required")
        if not self.directory.rules.admits_endpoint(query["ep"]):
            raise DirectoryError("4.03", f"endpoint name {query['ep']!r} is not allowed here")
        host, port = source
        origin = f"coap://[{host}]:{port}" if ":" in host else f"coap://{host}:{port}"
        try:
            async with asyncio.timeout(SIMPLE_FETCH_TIMEOUT):
                text = await self.fetch_links(origin)
        except Exception as exc:  # timeouts, network errors, the fetcher's UpstreamError
            raise DirectoryError("4.00", f"could not read {origin}/.well-known/core: {exc}") \
                from None
        _, change = self.directory.register(query, text.encode(), source, self.clock())
        self._changed(change)
        return _answer("2.04")

    def _changed(self, change: Change) -> None:
        if change:
            self.listener.directory_changed(change)

    def expire(self) -> None:
        self._changed(self.directory.expire(self.clock()))


def _cf(request: Any) -> int | None:
    cf = request.opt.content_format
    return None if cf is None else int(cf)


class DirectoryServer:
    """The server contexts at `[coap] listen` and the expiry timer."""

    def __init__(self, site: DirectorySite, listen: tuple[str, ...]) -> None:
        self.site = site
        self.listen = listen
        self._contexts: list[Any] = []
        self.addresses: list[tuple[str, int]] = []
        """What each listen address bound to (the OS's port for port 0)."""
        self._expiry: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()

    async def start(self) -> None:
        try:
            for text in self.listen:
                host, port = parse_listen(text)
                # udp6 alone: the default transports would also open TCP and WebSocket
                # servers on fixed ports on every interface.
                context = await aiocoap.Context.create_server_context(
                    self.site, bind=(host, port), transports=["udp6"],
                    loggername=f"{__name__}.coap",
                )
                self._contexts.append(context)
                self.addresses.append((host, _bound_port(context)))
        except BaseException:
            await self.stop()
            raise
        self._expiry = asyncio.create_task(self._expire_loop(), name="rd-expiry")
        log.info("resource directory listening on %s",
                 ", ".join(f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in self.addresses))

    def reschedule(self) -> None:
        """A registration changed: the next expiry may be earlier than the timer's."""
        self._wake.set()

    async def _expire_loop(self) -> None:
        while True:
            self._wake.clear()
            self.site.expire()
            due = self.site.directory.next_expiry()
            delay = 3600.0 if due is None else max(0.0, due - self.site.clock())
            try:
                async with asyncio.timeout(min(delay, 3600.0)):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def stop(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            await asyncio.gather(self._expiry, return_exceptions=True)
            self._expiry = None
        contexts, self._contexts = self._contexts, []
        for context in contexts:
            await context.shutdown()


def _bound_port(context: Any) -> int:
    """The local port of a server context's UDP socket (the OS's choice for port 0)."""
    for stack in compat.udp_stacks(context):
        port = stack.sock.getsockname()[1]
        if isinstance(port, int):
            return port
    raise compat.CompatError("aiocoap's server context has no UDP socket")
