"""Resources that join by themselves, wired: the gateway's own Resource Directory, the
reading of another directory (`[discovery] rd`), the catalogue they fill, and the clients
that watch it.

The decisions are pure and live elsewhere: the registration table in
`translator.core.directory`, names and what a change means for subscriptions in
`translator.core.catalog`, subscriptions in the hub. This module turns a catalogue change
into hub commands (withdraw a removed resource, move a subscription to the address an
endpoint registered from, resume one at the same address) and `catalog` frames for the
watchers, and runs the two I/O loops (the directory's server and the directory reader).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Protocol

from translator.coap.answers import UpstreamError
from translator.coap.directory import DirectoryServer, DirectorySite
from translator.config import GatewayConfig
from translator.core import frames
from translator.core.catalog import Catalog, CatalogChange, Entry, entry_of
from translator.core.codecs import parse_link_format
from translator.core.directory import Change, Directory, DirectoryRules, read_lookups
from translator.core.frames import FrameId, JSONValue
from translator.core.hub import Command, Hub

if TYPE_CHECKING:
    from translator.coap.side import CoapSide

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT: Final = 10.0
"""Seconds a read of another directory's lookup interface may take."""
DEFAULT_LOOKUPS: Final = {"core.rd-lookup-ep": "/rd-lookup/ep",
                          "core.rd-lookup-res": "/rd-lookup/res"}
"""Where the lookup interfaces are when the directory's /.well-known/core does not say
(RFC 9176 §4.3 leaves the paths to the directory: aiocoap's are /endpoint-lookup/...)."""


class Sink(Protocol):
    """Where watchers' frames go (a Connection)."""

    def send(self, text: str) -> Any: ...


@dataclass(slots=True)
class Watcher:
    frame_id: FrameId
    allowed: Callable[[str], bool]
    """Whether the watcher's token may reach a URI (registered entries passed the
    directory's rules in place of the policy; a removed one is judged the same way)."""


class Registry:
    """The self-registered part of the catalogue; see the module docstring."""

    def __init__(
        self,
        config: GatewayConfig,
        hub: Hub[Any],
        coap: CoapSide,
        execute: Callable[[list[Command[Any]]], None],
        spawn: Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]],
    ) -> None:
        self.config = config
        self.hub = hub
        self.coap = coap
        self._execute = execute
        self._spawn = spawn
        self.catalog = Catalog(config.rd.name_template, reserved=hub.sensor_uris)
        hub.registered_cf = self._registered_cf
        self.watchers: dict[Sink, Watcher] = {}
        self.server: DirectoryServer | None = None
        self.directory: Directory | None = None
        rd = config.rd
        if config.coap.listen:
            self.directory = Directory(DirectoryRules(
                allow_from=rd.allow_from, endpoints=rd.endpoints,
                max_registrations=rd.max_registrations, max_links=rd.max_links,
                max_payload=rd.max_payload, min_lifetime=rd.min_lifetime,
            ))
            self.server = DirectoryServer(
                DirectorySite(self.directory, self, coap.discover), config.coap.listen
            )
        self.reads = 0
        """Reads of `[discovery] rd` that succeeded."""

    async def start(self) -> None:
        if self.server is not None:
            await self.server.start()
        if self.config.discovery.rd is not None:
            self._spawn(self._read_loop(self.config.discovery.rd), "rd-discovery")

    async def stop(self) -> None:
        if self.server is not None:
            await self.server.stop()

    # -- names -------------------------------------------------------------------------------

    def uri_for_name(self, name: str) -> str | None:
        return self.catalog.uri_for_name(name)

    def _registered_cf(self, uri: str) -> int | None:
        entry = self.catalog.entry_for_uri(uri)
        return entry.cf if entry is not None else None

    def catalogued(self, uri: str) -> bool:
        """Whether `uri` is a resource the catalogue holds (checked when it joined)."""
        return self.catalog.entry_for_uri(uri) is not None

    # -- changes -----------------------------------------------------------------------------

    def directory_changed(self, change: Change) -> None:
        """DirectoryListener: the gateway's own directory changed."""
        self.publish(self.catalog.apply(change))
        if self.server is not None:
            self.server.reschedule()

    def publish(self, change: CatalogChange) -> None:
        """Carry a catalogue change out: the hub's subscriptions, then the watchers."""
        commands: list[Command[Any]] = []
        for entry, reason in change.removed:
            if not self.catalogued(entry.uri):  # (another name may still reach it)
                commands.extend(self.hub.withdraw(entry.uri, reason))
        for old, new in change.moves:
            commands.extend(self.hub.move(old, new))
        for uri in change.returns:
            commands.extend(self.hub.restore(uri))
        self._execute(commands)
        for entry in change.added:
            log.info("catalogue: %s joined at %s", entry.name, entry.uri)
        for entry, reason in change.removed:
            log.info("catalogue: %s left (%s)", entry.name, reason)
        if not change:
            return
        for sink, watcher in list(self.watchers.items()):
            frame = frames.Catalog(
                watcher.frame_id, False,
                added=tuple(e.to_json() for e in change.added if watcher.allowed(e.uri)),
                removed=tuple(
                    {**e.to_json(), "reason": reason}
                    for e, reason in change.removed if watcher.allowed(e.uri)
                ),
                changed=tuple(new.to_json() for _, new in change.changed
                              if watcher.allowed(new.uri)),
            )
            if frame.added or frame.removed or frame.changed:
                sink.send(frame.serialize())

    # -- watchers ----------------------------------------------------------------------------

    def watch(
        self, sink: Sink, frame_id: FrameId, allowed: Callable[[str], bool],
        configured: Iterable[dict[str, JSONValue]],
    ) -> None:
        """Send `sink` the catalogue (`configured` entries, and the registered ones that
        `allowed` lets it reach), then each change, until `forget`. A second watch starts
        again."""
        self.watchers[sink] = Watcher(frame_id, allowed)
        entries = [*configured, *(e.to_json() for e in self.catalog.entries() if allowed(e.uri))]
        sink.send(frames.Catalog(frame_id, True, added=tuple(entries)).serialize())

    def forget(self, sink: Sink) -> None:
        self.watchers.pop(sink, None)

    # -- list --------------------------------------------------------------------------------

    def annotate(self, entries: list[dict[str, JSONValue]],
                 allowed: Callable[[str], bool]) -> list[dict[str, JSONValue]]:
        """`list` entries with the catalogue's: name, `ep` and link attributes for the
        resources the hub knows, and an entry for each registered one it does not."""
        seen = set()
        for item in entries:
            uri = item.get("uri")
            entry = self.catalog.entry_for_uri(uri) if isinstance(uri, str) else None
            if entry is not None:
                seen.add(entry.uri)
                _fill(item, entry)
        for entry in self.catalog.entries():
            if entry.uri not in seen and allowed(entry.uri):
                item = {"uri": entry.uri, "name": None, "observable": None, "cf": None,
                        "rt": None, "if": None}
                _fill(item, entry)
                entries.append(item)
        return entries

    # -- reading another directory -----------------------------------------------------------

    async def _read_loop(self, rd: str) -> None:
        refresh = self.config.discovery.refresh
        while True:
            try:
                await self.read_directory(rd)
            except (TimeoutError, UpstreamError, ValueError, OSError) as exc:
                log.warning("reading the resource directory %s failed: %s", rd, exc)
            except Exception:  # the refresh goes on whatever one read ran into
                log.exception("reading the resource directory %s failed", rd)
            await asyncio.sleep(refresh)  # a period, not a wait for an event

    async def read_directory(self, rd: str) -> CatalogChange:
        """Read `rd`'s lookup interfaces once and replace what it contributed before."""
        paths = dict(DEFAULT_LOOKUPS)
        try:
            text = await self._get(rd + "/.well-known/core?rt=core.rd-lookup-*")
            for link in parse_link_format(text):
                rt, href = link.get("rt"), link.get("href")
                if isinstance(rt, str) and isinstance(href, str) and href.startswith("/"):
                    for kind in rt.split():
                        if kind in paths:
                            paths[kind] = href
        except (UpstreamError, ValueError) as exc:
            log.info("%s/.well-known/core: %s; trying the usual lookup paths", rd, exc)
        endpoints = await self._get(rd + paths["core.rd-lookup-ep"])
        resources = await self._get(rd + paths["core.rd-lookup-res"])
        found, skipped = read_lookups(endpoints, resources)
        if skipped:
            log.info("reading %s: skipped %d entries (not unicast IP literals, or outside "
                     "their endpoint's base)", rd, skipped)
        template = self.config.rd.name_template
        groups = {
            f"{rd}#{item.ep}#{item.d or ''}": [
                entry_of(item.ep, item.d, link, template, rd) for link in item.links
            ]
            for item in found
        }
        change = self.catalog.replace_source(rd, groups, f"no longer registered at {rd}")
        self.publish(change)
        self.reads += 1
        return change

    async def _get(self, uri: str) -> str:
        answer = await self.coap.request("GET", uri, accept=40, timeout=LOOKUP_TIMEOUT)
        if not answer.code.startswith("2."):
            raise UpstreamError(f"{uri} answered {answer.code}")
        return answer.payload.decode("utf-8", errors="replace")


def _fill(item: dict[str, JSONValue], entry: Entry) -> None:
    item["name"] = item.get("name") or entry.name
    item["ep"] = entry.ep
    for key, value in (("rt", entry.rt), ("if", entry.interface), ("cf", entry.cf),
                       ("observable", entry.observable)):
        if item.get(key) is None:
            item[key] = value
