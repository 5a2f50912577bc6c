"""The Resource Directory's registration table (RFC 9176), without I/O.

This module owns what a registration is, which registrations are accepted, and what the
lookup interfaces answer. It is fed events and returns what changed, in the style of
python-websockets' `protocol.py`: the aiocoap resource site (`translator/coap/directory.py`)
only turns CoAP requests into these calls and their results (or `DirectoryError`) into CoAP
responses.

    event                                   result
    --------------------------------------  ------------------------------------------------
    register(query, payload, source, now)   (registration, Change: added, or changed when the
                                            endpoint was registered already: same location)
    update(id, query, source, now)          Change: changed (lifetime renewed, maybe a new
                                            base when the base was the source address)
    remove(id, source)                      Change: removed ("removed by the endpoint")
    expire(now)                             Change: removed ("lifetime expired")
    bad input at any step                   DirectoryError(code, message); nothing changed

Unlike aiocoap's directory (which accepts anything from anyone) a registration must pass
`DirectoryRules`: the source address within `allow_from`, an endpoint name matching one of
`endpoints`, a base that is a unicast IP literal (never multicast, broadcast or unspecified:
the policy's rule, `translator.core.policy.special_address_kind`), every link at the base's
origin, and the bounds on registrations, links and payload size. Each refusal has its CoAP
code: 4.00 malformed, 4.03 not allowed, 4.04 unknown registration, 4.13 too large, 4.15 not
link-format, 5.03 the table is full.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final, TypeVar

from translator.core.codecs import parse_link_format
from translator.core.policy import special_address_kind
from translator.core.uris import UriError, parse_coap_uri

DEFAULT_LIFETIME: Final = 90_000
"""RFC 9176 §5.3: `lt` when the registrant gives none (25 hours)."""
MAX_LIFETIME: Final = 2**32 - 1
"""RFC 9176 §5.3: `lt` is at most 2^32 - 1 seconds."""
MAX_NAME_BYTES: Final = 63
"""RFC 9176 §5.3: `ep` and `d` are at most 63 bytes."""
LINK_FORMAT: Final = 40
"""The content-format of application/link-format."""

REGISTRATION_PARAMETERS: Final = frozenset({"ep", "d", "lt", "base", "et"})
"""The query parameters of a registration this directory knows; others are endpoint
attributes (RFC 9176 §9.3 `extra-attrs`), kept and returned by endpoint lookup."""
UPDATE_PARAMETERS: Final = frozenset({"lt", "base"})
LOOKUP_PAGING: Final = frozenset({"page", "count"})
_T = TypeVar("_T")
_CONTROL: Final = re.compile(r"[\x00-\x1f\x7f]")


class DirectoryError(Exception):
    """A refused request: `code` is the CoAP response code, `message` its diagnostic."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Link:
    """One registered link: its target as registered and resolved, and its attributes."""

    href: str
    uri: str
    """The target resolved against the registration's base, normalized."""
    attrs: tuple[tuple[str, str | bool], ...] = ()

    def attr(self, name: str) -> str | bool | None:
        return next((value for key, value in self.attrs if key == name), None)


@dataclass(frozen=True, slots=True)
class Registration:
    """One endpoint's registration (RFC 9176 §5.3): immutable, replaced on each change."""

    id: str
    """The registration resource's path below the directory, e.g. ``"rd/7"``."""
    ep: str
    d: str | None
    base: str
    """``coap://host:port``, normalized."""
    base_given: bool
    """The registrant named its base; else it is the source address and follows it."""
    lt: int
    expires: float
    links: tuple[Link, ...]
    source: str
    """The address the last registration or update came from."""
    et: str | None = None
    extra: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> tuple[str, str | None]:
        return (self.ep, self.d)

    def with_base(self, base: str) -> Registration:
        """The same registration at another base: the links move with it."""
        return replace(self, base=base, links=tuple(
            replace(link, uri=_resolve(base, link.href)) for link in self.links
        ))


@dataclass(frozen=True, slots=True)
class Change:
    """What an event changed: registrations added, removed (with the reason), or replaced
    (before, after)."""

    added: tuple[Registration, ...] = ()
    removed: tuple[tuple[Registration, str], ...] = ()
    changed: tuple[tuple[Registration, Registration], ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


@dataclass(frozen=True)
class DirectoryRules:
    """Who may register what (the `[rd]` section, compiled)."""

    allow_from: tuple[str, ...] = ()
    """Address prefixes (``10.0.0.0/8``, ``::1``) registrations may come from; none: none."""
    endpoints: tuple[str, ...] = ("*",)
    """Endpoint-name patterns (``*`` and ``?`` wildcards, ``[...]`` sets) a registration's
    ``ep`` must match."""
    max_registrations: int = 1000
    max_links: int = 64
    max_payload: int = 4096
    """Bytes of link-format a registration may carry (after block-wise reassembly)."""
    min_lifetime: int = 60
    """A shorter `lt` is raised to this (RFC 9176 lets the directory choose): a registrant
    cannot make the directory churn faster than once a minute."""
    _networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        networks = []
        for prefix in self.allow_from:
            try:
                networks.append(ipaddress.ip_network(prefix, strict=False))
            except ValueError:
                raise ValueError(f"{prefix!r} is not an address prefix") from None
        object.__setattr__(self, "_networks", tuple(networks))

    def admits_source(self, address: str) -> bool:
        try:
            parsed = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            return False
        if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
            parsed = parsed.ipv4_mapped
        return any(parsed.version == net.version and parsed in net for net in self._networks)

    def admits_endpoint(self, ep: str) -> bool:
        return any(fnmatch.fnmatchcase(ep, pattern) for pattern in self.endpoints)


def parse_query(parts: Iterable[str]) -> dict[str, str]:
    """URI-Query options (``name=value`` each; ``name`` alone is an empty value) as a
    dict; an empty or repeated name is 4.00."""
    query: dict[str, str] = {}
    for part in parts:
        name, _, value = part.partition("=")
        if not name:
            raise DirectoryError("4.00", f"query parameter {part!r} has no name")
        if name in query:
            raise DirectoryError("4.00", f"query parameter {name!r} given twice")
        query[name] = value
    return query


def _name(query: Mapping[str, str], key: str, required: bool) -> str | None:
    value = query.get(key)
    if value is None:
        if required:
            raise DirectoryError("4.00", f"'{key}' (the endpoint name) is required")
        return None
    if not value or len(value.encode()) > MAX_NAME_BYTES or _CONTROL.search(value):
        raise DirectoryError(
            "4.00", f"'{key}' must be 1 to {MAX_NAME_BYTES} bytes without control characters"
        )
    return value


def _lifetime(text: str | None, rules: DirectoryRules) -> int:
    if text is None:
        return DEFAULT_LIFETIME
    valid = text.isascii() and text.isdigit() and len(text) <= 10
    if not valid or not 1 <= int(text) <= MAX_LIFETIME:
        raise DirectoryError("4.00", f"'lt' must be an integer in 1..{MAX_LIFETIME}, got {text!r}")
    return max(int(text), rules.min_lifetime)


def source_base(host: str, port: int) -> str:
    """The base an endpoint gets when it names none: the request's source address."""
    address = host.partition("%")[0]
    return f"coap://[{address}]:{port}" if ":" in address else f"coap://{address}:{port}"


def _base(text: str) -> str:
    """A registrant's `base`: ``coap://`` or ``coaps://`` and a unicast IP literal, nothing
    after the authority. Names are refused (4.03): the gateway would have to resolve them,
    and a name can point anywhere later."""
    try:
        uri = parse_coap_uri(text)
    except UriError as exc:
        raise DirectoryError("4.00", f"'base' is not a CoAP URI: {exc}") from None
    if uri.path not in ("", "/") or uri.query:
        raise DirectoryError("4.00", "'base' must be scheme://host:port, without path or query")
    if not uri.is_ip_literal:
        raise DirectoryError("4.03", f"'base' must be an IP address literal, got {uri.host!r}")
    kind = special_address_kind(uri.host)
    if kind is not None:
        raise DirectoryError("4.03", f"'base' is a {kind} address: not allowed")
    return uri.origin


def _resolve(base: str, href: str) -> str:
    if "://" in href:
        return str(parse_coap_uri(href))
    return str(parse_coap_uri(base + (href if href.startswith("/") else "/" + href)))


def parse_links(payload: bytes, base: str, rules: DirectoryRules) -> tuple[Link, ...]:
    """A registration's link-format payload, every link resolved at `base`."""
    if len(payload) > rules.max_payload:
        raise DirectoryError("4.13", f"payload larger than {rules.max_payload} bytes")
    try:
        parsed = parse_link_format(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise DirectoryError("4.00", f"payload is not link-format: {exc}") from None
    if len(parsed) > rules.max_links:
        raise DirectoryError("4.13", f"more than {rules.max_links} links in one registration")
    links = []
    for entry in parsed:
        href = entry.pop("href")
        assert isinstance(href, str)
        if "anchor" in entry:
            raise DirectoryError("4.00", f"<{href}>: 'anchor' is not supported")
        try:
            uri = _resolve(base, href)
        except UriError as exc:
            raise DirectoryError("4.00", f"<{href}> is not a CoAP URI reference: {exc}") from None
        if parse_coap_uri(uri).origin != base:
            raise DirectoryError("4.03", f"<{href}> is outside the endpoint's base {base}")
        attrs = tuple((k, v) for k, v in entry.items() if isinstance(v, str | bool))
        links.append(Link(href=href, uri=uri, attrs=attrs))
    return tuple(links)


class Directory:
    """The registrations, keyed by (ep, d) and by location; see the module docstring."""

    def __init__(self, rules: DirectoryRules, prefix: str = "rd") -> None:
        self.rules = rules
        self.prefix = prefix
        self._by_id: dict[str, Registration] = {}
        self._by_key: dict[tuple[str, str | None], str] = {}
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._by_id)

    def registrations(self) -> tuple[Registration, ...]:
        return tuple(self._by_id.values())

    def get(self, reg_id: str) -> Registration | None:
        return self._by_id.get(reg_id)

    def _admit(self, source: str) -> None:
        if not self.rules.admits_source(source):
            raise DirectoryError("4.03", f"registrations from {source} are not allowed")

    def register(
        self,
        query: Mapping[str, str],
        payload: bytes,
        source: tuple[str, int],
        now: float,
        *,
        content_format: int | None = LINK_FORMAT,
    ) -> tuple[Registration, Change]:
        """A registration (RFC 9176 §5.3). The same (ep, d) again replaces the earlier one
        at the same location (a `changed`); a new one is `added`."""
        host, port = source
        self._admit(host)
        if content_format not in (LINK_FORMAT, None) or (content_format is None and payload):
            raise DirectoryError("4.15", "the payload must be application/link-format (40)")
        ep = _name(query, "ep", required=True)
        assert ep is not None
        d = _name(query, "d", required=False)
        if not self.rules.admits_endpoint(ep):
            raise DirectoryError("4.03", f"endpoint name {ep!r} is not allowed here")
        lt = _lifetime(query.get("lt"), self.rules)
        given = query.get("base")
        base = _base(given) if given is not None else source_base(host, port)
        links = parse_links(payload, base, self.rules)
        et = query.get("et")
        extra = tuple(
            (k, v) for k, v in query.items() if k not in REGISTRATION_PARAMETERS
        )
        for key, value in extra:
            if len(key) > MAX_NAME_BYTES or len(value) > 255 or _CONTROL.search(key + value):
                raise DirectoryError("4.00", f"endpoint attribute {key!r} is too long or malformed")
        previous_id = self._by_key.get((ep, d))
        if previous_id is None and len(self._by_id) >= self.rules.max_registrations:
            raise DirectoryError(
                "5.03", f"the directory holds its maximum of {self.rules.max_registrations} "
                "registrations"
            )
        reg_id = previous_id or f"{self.prefix}/{next(self._ids)}"
        registration = Registration(
            id=reg_id, ep=ep, d=d, base=base, base_given=given is not None, lt=lt,
            expires=now + lt, links=links, source=f"{host}:{port}", et=et, extra=extra,
        )
        previous = self._by_id.get(reg_id)
        self._by_id[reg_id] = registration
        self._by_key[(ep, d)] = reg_id
        if previous is None:
            return registration, Change(added=(registration,))
        return registration, Change(changed=((previous, registration),))

    def update(
        self, reg_id: str, query: Mapping[str, str], source: tuple[str, int], now: float,
        *, payload: bytes = b"",
    ) -> tuple[Registration, Change]:
        """A registration update (RFC 9176 §5.3.1): renew the lifetime, take a new `lt` or
        `base`; without `base`, a registration whose base was its source address follows the
        update's source (the endpoint moved)."""
        host, port = source
        self._admit(host)
        old = self._by_id.get(reg_id)
        if old is None:
            raise DirectoryError("4.04", f"no registration at /{reg_id}")
        if payload:
            raise DirectoryError("4.00", "an update carries no payload (register again instead)")
        unknown = sorted(set(query) - UPDATE_PARAMETERS)
        if unknown:
            raise DirectoryError("4.00", f"an update takes only lt and base, not {unknown}")
        lt = _lifetime(query["lt"], self.rules) if "lt" in query else old.lt
        new = old
        if "base" in query:
            new = new.with_base(_base(query["base"]))
            new = replace(new, base_given=True)
            # Links must still be at the base's origin: they are relative, so they are.
        elif not old.base_given:
            moved = source_base(host, port)
            if moved != old.base:
                new = new.with_base(moved)
        new = replace(new, lt=lt, expires=now + lt, source=f"{host}:{port}")
        self._by_id[reg_id] = new
        moved_links = new.links != old.links or new.base != old.base
        return new, Change(changed=((old, new),)) if moved_links else Change()

    def remove(self, reg_id: str, source: tuple[str, int]) -> Change:
        """A removal (RFC 9176 §5.3.2), by DELETE of the registration resource."""
        self._admit(source[0])
        old = self._by_id.get(reg_id)
        if old is None:
            raise DirectoryError("4.04", f"no registration at /{reg_id}")
        self._drop(old)
        return Change(removed=((old, "the endpoint removed its registration"),))

    def expire(self, now: float) -> Change:
        """Every registration whose lifetime has passed at `now`, removed."""
        gone = [reg for reg in self._by_id.values() if reg.expires <= now]
        for reg in gone:
            self._drop(reg)
        return Change(removed=tuple(
            (reg, f"the registration of {reg.ep!r} expired (lifetime {reg.lt} s)") for reg in gone
        ))

    def next_expiry(self) -> float | None:
        return min((reg.expires for reg in self._by_id.values()), default=None)

    def _drop(self, reg: Registration) -> None:
        del self._by_id[reg.id]
        self._by_key.pop(reg.key, None)

    # -- lookup (RFC 9176 §6) ---------------------------------------------------------------

    def lookup_endpoints(self, query: Mapping[str, str]) -> list[Registration]:
        """Endpoint lookup: registrations whose parameters match every filter."""
        filters = {k: v for k, v in query.items() if k not in LOOKUP_PAGING}
        found = [reg for reg in self._by_id.values() if matches_all(filters, _reg_attrs(reg))]
        return _page(found, query)

    def lookup_resources(self, query: Mapping[str, str]) -> list[tuple[Registration, Link]]:
        """Resource lookup: links whose attributes, or whose registration's parameters,
        match every filter (a filter on `href` matches the resolved URI)."""
        filters = {k: v for k, v in query.items() if k not in LOOKUP_PAGING}
        found = []
        for reg in self._by_id.values():
            ep_attrs = _reg_attrs(reg)
            for link in reg.links:
                attrs = {**ep_attrs, **dict(_link_attrs(link)), "href": link.uri}
                if matches_all(filters, attrs):
                    found.append((reg, link))
        return _page(found, query)


def _reg_attrs(reg: Registration) -> dict[str, str | bool]:
    attrs: dict[str, str | bool] = {"ep": reg.ep, "base": reg.base, "lt": str(reg.lt)}
    if reg.d is not None:
        attrs["d"] = reg.d
    if reg.et is not None:
        attrs["et"] = reg.et
    attrs.update(reg.extra)
    return attrs


def _link_attrs(link: Link) -> Iterable[tuple[str, str | bool]]:
    return link.attrs


def matches_all(filters: Mapping[str, str], attrs: Mapping[str, str | bool]) -> bool:
    """RFC 9176 §6.1: a filter ``name=value`` matches an attribute of that name whose value
    (or one of its space-separated values) equals `value`, or starts with it when `value`
    ends with ``*``; ``name`` alone (empty value) matches the attribute's presence."""
    for name, wanted in filters.items():
        value = attrs.get(name)
        if value is None:
            return False
        if value is True or value is False:
            if wanted not in ("", "*"):
                return False
            continue
        if wanted == "":
            continue
        words = [value, *value.split()]
        if wanted.endswith("*"):
            if not any(word.startswith(wanted[:-1]) for word in words):
                return False
        elif wanted not in words:
            return False
    return True


def _page(found: list[_T], query: Mapping[str, str]) -> list[_T]:
    count = _count(query.get("count"))
    page = _count(query.get("page"))
    if count is None:
        if page is not None:
            raise DirectoryError("4.00", "'page' needs 'count'")
        return found
    start = (page or 0) * count
    return found[start:start + count]


def _count(text: str | None) -> int | None:
    if text is None:
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise DirectoryError("4.00", f"'page' and 'count' are non-negative integers, not {text!r}")
    return int(text)


# -- link-format out ------------------------------------------------------------------------


def _attr_text(name: str, value: str | bool) -> str:
    if value is True:
        return f";{name}"
    assert isinstance(value, str)
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return f';{name}="{escaped}"'


def endpoints_link_format(found: Sequence[Registration]) -> str:
    """Endpoint-lookup results: one link per registration resource (RFC 9176 §6.3)."""
    return ",".join(
        f"</{reg.id}>" + "".join(_attr_text(k, v) for k, v in _reg_attrs(reg).items())
        for reg in found
    )


def resources_link_format(found: Sequence[tuple[Registration, Link]]) -> str:
    """Resource-lookup results: absolute targets, with the endpoint's base as anchor."""
    return ",".join(
        f"<{link.uri}>;anchor=\"{reg.base}\"" + "".join(_attr_text(k, v) for k, v in link.attrs)
        for reg, link in found
    )


def registration_link_format(reg: Registration) -> str:
    """GET of a registration resource: its links as registered."""
    return ",".join(
        f"<{link.href}>" + "".join(_attr_text(k, v) for k, v in link.attrs) for link in reg.links
    )


# -- reading another directory ([discovery] rd) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class FoundEndpoint:
    """An endpoint read from another directory's lookup interfaces."""

    ep: str
    d: str | None
    base: str
    links: tuple[Link, ...]


def read_lookups(endpoints_text: str, resources_text: str) -> tuple[list[FoundEndpoint], int]:
    """Another directory's endpoint-lookup and resource-lookup answers (link-format) ->
    its endpoints with their links, and how many entries were skipped. The same rules as
    for registrations here: a base must be a unicast IP literal and each link at its base's
    origin; anything else is skipped (the directory is the operator's, its registrants may
    not be). Raises ValueError for malformed link-format."""
    skipped = 0
    endpoints: dict[str, tuple[str, str | None]] = {}
    for entry in parse_link_format(endpoints_text):
        ep, d, base = entry.get("ep"), entry.get("d"), entry.get("base")
        if not isinstance(ep, str) or not isinstance(base, str):
            skipped += 1
            continue
        try:
            origin = _base(base)
            _name({"ep": ep}, "ep", required=True)
        except DirectoryError:
            skipped += 1
            continue
        endpoints.setdefault(origin, (ep, d if isinstance(d, str) else None))
    links: dict[str, list[Link]] = {origin: [] for origin in endpoints}
    for entry in parse_link_format(resources_text):
        href = entry.pop("href")
        assert isinstance(href, str)
        anchor = entry.pop("anchor", None)
        try:
            uri = parse_coap_uri(href)
            origin = _base(anchor) if isinstance(anchor, str) else uri.origin
        except (UriError, DirectoryError):
            skipped += 1
            continue
        if uri.origin != origin or origin not in links:
            skipped += 1
            continue
        attrs = tuple((k, v) for k, v in entry.items() if isinstance(v, str | bool))
        links[origin].append(Link(href=uri.path or "/", uri=str(uri), attrs=attrs))
    return [
        FoundEndpoint(ep=ep, d=d, base=origin, links=tuple(links[origin]))
        for origin, (ep, d) in endpoints.items()
    ], skipped
