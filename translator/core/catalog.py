"""The catalogue of resources that joined by themselves: names -> URIs, without I/O.

This module owns the names of registered resources (RFC 9176 registrations at the gateway's
own directory, and endpoints read from another directory, `[discovery] rd`), and what each
change of them means for clients:

    event                                  CatalogChange
    -------------------------------------  -----------------------------------------------
    a group's entries replaced (`set`)     added / removed (with the reason) / changed
    an entry's URI changed (moved)         changed, and moves: (old URI, new URI)
    a name comes back after its removal    added, and moves (at a new address) or returns
                                           (at the same one)

A *group* is what registers together: one registration (its location) or one endpoint of a
discovered directory. A name belongs to one group at a time; a name already taken (by a
configured sensor or another group) is not catalogued again: the first one keeps it.
The URIs that names had before their removal are remembered (a bounded number) so that the
gateway can move subscriptions to the address an endpoint registers from next time.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from translator.core.directory import Change, Link, Registration
from translator.core.frames import JSONValue

REMEMBERED_MAX: Final = 10_000
"""Removed names whose last URI is kept, so that their subscriptions can resume."""


@dataclass(frozen=True, slots=True)
class Entry:
    """One catalogued resource."""

    name: str
    uri: str
    ep: str
    d: str | None = None
    rt: str | None = None
    interface: str | None = None
    cf: int | None = None
    observable: bool | None = None
    source: str = "rd"
    """``rd`` (registered here) or the URI of the directory it was read from."""

    def to_json(self) -> dict[str, JSONValue]:
        return {
            "name": self.name, "uri": self.uri, "ep": self.ep, "d": self.d, "rt": self.rt,
            "if": self.interface, "cf": self.cf, "observable": self.observable,
            "source": self.source,
        }


@dataclass(frozen=True, slots=True)
class CatalogChange:
    added: tuple[Entry, ...] = ()
    removed: tuple[tuple[Entry, str], ...] = ()
    changed: tuple[tuple[Entry, Entry], ...] = ()
    moves: tuple[tuple[str, str], ...] = ()
    """(old URI, new URI): subscriptions to the old one continue at the new one."""
    returns: tuple[str, ...] = ()
    """URIs whose names came back at the same address: their subscriptions resume."""

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)

    def __add__(self, other: CatalogChange) -> CatalogChange:
        return CatalogChange(
            self.added + other.added, self.removed + other.removed,
            self.changed + other.changed, self.moves + other.moves,
            self.returns + other.returns,
        )


def _cf(text: str | bool | None) -> int | None:
    if not isinstance(text, str):
        return None
    first = text.split()[0] if text.split() else ""
    if not (first.isascii() and first.isdigit()) or len(first) > 5 or int(first) > 0xFFFF:
        return None
    return int(first)


def _text(value: str | bool | None) -> str | None:
    return value if isinstance(value, str) else None


def link_path(uri: str) -> str:
    """The path of a URI without its leading ``/`` (and with its query, if any)."""
    rest = uri.split("://", 1)[-1]
    slash = rest.find("/")
    return rest[slash + 1:] if slash >= 0 else ""


def entries_of(
    reg: Registration, template: str, source: str = "rd"
) -> list[Entry]:
    """The catalogue entries of one registration, named by `template`."""
    return [entry_of(reg.ep, reg.d, link, template, source) for link in reg.links]


def entry_of(ep: str, d: str | None, link: Link, template: str, source: str) -> Entry:
    name = template.format(ep=ep, d=d or "", path=link_path(link.uri))
    return Entry(
        name=name, uri=link.uri, ep=ep, d=d, rt=_text(link.attr("rt")),
        interface=_text(link.attr("if")), cf=_cf(link.attr("ct")),
        observable=True if link.attr("obs") is not None else None, source=source,
    )


class Catalog:
    """Names of self-registered resources, by group; see the module docstring."""

    def __init__(self, template: str = "{ep}/{path}", reserved: Iterable[str] = ()) -> None:
        self.template = template
        self.reserved = frozenset(reserved)
        """Names the catalogue never takes (the configured sensors')."""
        self._groups: dict[str, dict[str, Entry]] = {}
        self._by_name: dict[str, Entry] = {}
        self._owner: dict[str, str] = {}
        self._by_uri: dict[str, Entry] = {}
        self._remembered: dict[str, str] = {}
        self.skipped = 0
        """Entries not catalogued because their name was taken."""

    def __len__(self) -> int:
        return len(self._by_name)

    def uri_for_name(self, name: str) -> str | None:
        entry = self._by_name.get(name)
        return entry.uri if entry is not None else None

    def entry_for_uri(self, uri: str) -> Entry | None:
        return self._by_uri.get(uri)

    @property
    def names(self) -> Mapping[str, str]:
        return {name: entry.uri for name, entry in self._by_name.items()}

    def entries(self) -> tuple[Entry, ...]:
        return tuple(self._by_name.values())

    def groups(self) -> tuple[str, ...]:
        return tuple(self._groups)

    def set(self, group: str, entries: Iterable[Entry], reason: str = "") -> CatalogChange:
        """Make `group`'s entries `entries` (none: the group is gone, for `reason`)."""
        old = self._groups.pop(group, {})
        new: dict[str, Entry] = {}
        for entry in entries:
            owner = self._owner.get(entry.name)
            if entry.name in self.reserved or (owner is not None and owner != group) \
                    or entry.name in new:
                self.skipped += 1
                continue
            new[entry.name] = entry
        added: list[Entry] = []
        removed: list[tuple[Entry, str]] = []
        changed: list[tuple[Entry, Entry]] = []
        moves: list[tuple[str, str]] = []
        returns: list[str] = []
        for name, before in old.items():
            if name not in new:
                removed.append((before, reason or "the endpoint no longer lists it"))
                self._forget(before)
        for name, after in new.items():
            previous = old.get(name)
            if previous is None:
                added.append(after)
                last = self._remembered.pop(name, None)
                if last is not None:
                    if last == after.uri:
                        returns.append(last)
                    else:
                        moves.append((last, after.uri))
            elif previous != after:
                changed.append((previous, after))
                if previous.uri != after.uri:
                    moves.append((previous.uri, after.uri))
                    self._by_uri.pop(previous.uri, None)
            self._by_name[name] = after
            self._owner[name] = group
            self._by_uri[after.uri] = after
        if new:
            self._groups[group] = new
        return CatalogChange(tuple(added), tuple(removed), tuple(changed), tuple(moves),
                             tuple(returns))

    def _forget(self, entry: Entry) -> None:
        self._by_name.pop(entry.name, None)
        self._owner.pop(entry.name, None)
        if self._by_uri.get(entry.uri) == entry:
            del self._by_uri[entry.uri]
        self._remembered[entry.name] = entry.uri
        while len(self._remembered) > REMEMBERED_MAX:
            del self._remembered[next(iter(self._remembered))]

    def apply(self, change: Change) -> CatalogChange:
        """A change of the gateway's own directory."""
        result = CatalogChange()
        for reg, reason in change.removed:
            result += self.set(reg.id, (), reason)
        for reg in change.added:
            result += self.set(reg.id, entries_of(reg, self.template))
        for _, reg in change.changed:
            result += self.set(reg.id, entries_of(reg, self.template))
        return result

    def replace_source(
        self, source: str, groups: Mapping[str, list[Entry]], reason: str
    ) -> CatalogChange:
        """What a read of directory `source` found: its groups (keys ``source#ep``)
        replace the ones read from it before; the missing ones are removed for `reason`."""
        result = CatalogChange()
        prefix = source + "#"
        for group in [g for g in self._groups if g.startswith(prefix)]:
            if group not in groups:
                result += self.set(group, (), reason)
        for group, entries in groups.items():
            result += self.set(group, entries)
        return result
