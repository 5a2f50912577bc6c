"""Gateway configuration: the section dataclasses, TOML loading and command-line overrides.

This module owns what a valid configuration is. Each TOML section is a frozen dataclass whose
fields carry their type, default and constraints; one generic, table-driven loader walks those
fields, so a new section (say ``[supervision]``) is a new dataclass and a new field on
:class:`GatewayConfig`, with no parsing code of its own.

Validation lives in the dataclasses themselves (``__post_init__``), not in the loader, so a
configuration built in code, loaded from a file or changed by a flag obeys the same rules.
Every error is a :class:`ConfigError` naming the offending key, e.g.
``config key 'server.port': must be an integer in 0..65535, got 70000``.
"""

import dataclasses
import difflib
import functools
import ipaddress
import math
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from translator.core.policy import PatternError, Policy, UriPattern, compile_pattern
from translator.core.uris import DEFAULT_PORTS, UriError, host_name_problem, parse_coap_uri

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

__all__ = [
    "LOG_LEVELS",
    "AuthConfig",
    "CoapConfig",
    "ConfigError",
    "CredentialConfig",
    "DiscoveryConfig",
    "GatewayConfig",
    "HistoryConfig",
    "LimitsConfig",
    "MetricsConfig",
    "PolicyConfig",
    "RdConfig",
    "SensorConfig",
    "ServerConfig",
    "SupervisionConfig",
    "TokenConfig",
    "apply_overrides",
    "config_from_mapping",
    "load_config",
    "policy_for",
]

LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("text", "json")


class ConfigError(Exception):
    """A configuration value (from a file, a mapping or a flag) that cannot be used."""

    key: str
    """Where the problem is: a dotted path like ``sensors[2].uri``, a flag like ``--sensor``,
    or ``<file>`` when the file itself could not be read or parsed."""
    message: str
    """What is wrong with it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(key, message)
        self.key = key
        self.message = message

    def __str__(self) -> str:
        return f"config key '{self.key}': {self.message}"


# --- field constraints -------------------------------------------------------------------


@dataclass(frozen=True)
class _Rule:
    """Constraints on one field beyond its type, read by the generic checker."""

    minimum: float | None = None
    maximum: float | None = None
    above: float | None = None
    """An exclusive minimum: the value must be greater (``above=0``: 0 makes no sense)."""
    zero: str | None = None
    """What 0 means, where it means something (``"disables"``): said in error messages."""
    choices: tuple[str, ...] = ()
    nonempty: bool = False


_NO_RULE: Final = _Rule()
_T = TypeVar("_T")


def _setting(
    default: _T,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    above: float | None = None,
    zero: str | None = None,
    choices: tuple[str, ...] = (),
    nonempty: bool = False,
) -> _T:
    """A field with a default and constraints (kept in the field's metadata).

    Every number has a range: a ``maximum``, and either ``above`` (an exclusive minimum) or
    a ``minimum``; a minimum of 0 on a field where 0 means something names it (``zero``).
    """
    rule = _Rule(minimum=minimum, maximum=maximum, above=above, zero=zero, choices=choices,
                 nonempty=nonempty)
    return field(default=default, metadata={"rule": rule})


DAY: Final = 86_400.0
"""The longest duration any setting in seconds may have."""
HOUR: Final = 3_600.0
MILLION: Final = 1_000_000
GIB: Final = 1 << 30


def _required(*, nonempty: bool = False) -> Any:
    """A field without a default: the key must be present."""
    return field(metadata={"rule": _Rule(nonempty=nonempty)})


# --- the sections --------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerConfig:
    """``[server]``: where the WebSocket side listens and how long observations outlive use."""

    host: str = _setting("127.0.0.1", nonempty=True)
    """Address to listen on. Loopback by default: exposing the gateway is a deliberate act."""
    port: int = _setting(8765, minimum=0, maximum=65535, zero="lets the OS pick")
    """TCP port to listen on; 0 lets the OS pick one (useful in tests)."""
    linger: float = _setting(5.0, minimum=0, maximum=DAY, zero="cancels at once")
    """Seconds an unwatched observation lingers before it is cancelled, so a client that
    reconnects quickly does not cost a new CoAP observe; 0 cancels at once."""
    allowed_origins: tuple[str, ...] | None = _setting(None)
    """Origins (``https://app.example``) whose browsers may open a WebSocket besides the
    gateway's own (its page keeps working); a handshake with another Origin gets HTTP 403.
    A handshake without Origin (not from a browser) is always allowed."""
    server_names: tuple[str, ...] = _setting(())
    """Host names the gateway is reached by (``gateway.example``), besides ``localhost`` and
    its listen address: a request whose ``Host`` names anything else gets HTTP 421, which
    stops DNS rebinding. IP literals are always accepted."""
    tls_cert: str | None = _setting(None)
    """PEM certificate (chain) file: with ``tls_key``, serve ``wss://``."""
    tls_key: str | None = _setting(None)
    """PEM private key file for ``tls_cert``."""
    backlog: int = _setting(1024, minimum=1, maximum=65535)
    """Connections the kernel queues for the gateway to accept (``listen()``'s backlog; the
    kernel caps it at ``net.core.somaxconn``): room for a burst of clients arriving while the
    event loop is busy. Past it, new connections wait for the kernel's SYN retries."""
    compression: str = _setting("off", choices=("off", "deflate"))
    """``deflate``: permessage-deflate (RFC 7692) for clients that offer it; the others get
    plain frames. A compressed connection is written on its own, not with the bytes shared
    by a fan-out: see docs/performance.md for what it costs in CPU and saves in bytes."""
    deflate_context_takeover: bool = _setting(True)
    """Compress each frame against the previous ones (small repeated frames shrink most)."""
    deflate_window_bits: int = _setting(12, minimum=9, maximum=15)
    """zlib window per compressed connection: 2**bits bytes each way (more: better ratio
    on large frames, more memory per connection)."""
    deflate_memory_level: int = _setting(5, minimum=1, maximum=9)
    """zlib memory level of each connection's compressor: 2**(level + 9) bytes."""

    def __post_init__(self) -> None:
        _check_fields(self)
        for index, name in enumerate(self.server_names):
            problem = host_name_problem(name.lower().rstrip("."))
            if problem is not None:
                raise ConfigError(f"server_names[{index}]", problem)
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError("tls_key" if self.tls_key is None else "tls_cert",
                              "tls_cert and tls_key go together")


@dataclass(frozen=True)
class SensorConfig:
    """One ``[[sensors]]`` entry: a named CoAP resource the gateway serves."""

    name: str = _required(nonempty=True)
    """The name clients use; unique; must not contain ``://`` so it cannot be taken for a URI."""
    uri: str = _required()
    """The resource's CoAP URI, stored normalized (see :mod:`translator.core.uris`)."""
    observe: bool = _setting(False)
    """Observe the resource from startup and keep observing it, even with no subscriber."""

    def __post_init__(self) -> None:
        _check_fields(self)
        if "://" in self.name:
            raise ConfigError("name", f"must not contain '://', got {self.name!r}")
        try:
            normalized = str(parse_coap_uri(self.uri))
        except UriError as error:
            raise ConfigError("uri", str(error)) from None
        object.__setattr__(self, "uri", normalized)


@dataclass(frozen=True)
class PolicyConfig:
    """``[policy]``: which CoAP destinations clients may reach besides the sensors."""

    allow: tuple[str, ...] = _setting(())
    """Allow patterns (``*`` and ``?`` wildcards; see :mod:`translator.core.policy`). Empty means
    deny everything but the configured sensors; ``["*"]`` is development mode."""

    def __post_init__(self) -> None:
        _check_fields(self)
        for index, pattern in enumerate(self.allow):
            try:
                compile_pattern(pattern)
            except PatternError as error:
                raise ConfigError(f"allow[{index}]", str(error)) from None


@dataclass(frozen=True)
class LimitsConfig:
    """``[limits]``: per-connection resource bounds, so one client cannot exhaust the gateway."""

    max_frame_bytes: int = _setting(65536, minimum=1, maximum=64 << 20)
    """Largest WebSocket frame accepted from a client."""
    max_subscriptions: int = _setting(256, minimum=1, maximum=MILLION)
    """Most subscriptions one connection may hold at once."""
    max_inflight: int = _setting(32, minimum=1, maximum=MILLION)
    """Most CoAP requests one connection may have outstanding at once."""
    max_queue: int = _setting(1024, minimum=1, maximum=MILLION)
    """Frames queued for a connection before it is closed as a slow consumer."""
    max_lag: float = _setting(30.0, above=0, maximum=DAY)
    """Seconds a connection may stay behind (frames queued, none written) before it is
    closed as a slow consumer."""
    max_pending_bytes: int = _setting(1_048_576, minimum=1, maximum=GIB)
    """Bytes queued for a connection before it is closed as a slow consumer."""
    max_inflight_bytes: int = _setting(1024, minimum=0, maximum=GIB, zero="turns the bound off")
    """Unsent bytes the kernel may hold toward a connection (TCP_NOTSENT_LOWAT) before its
    frames wait in the gateway's queue, where a newer notify replaces an older one: bounds
    how old the values a slow client receives can get. 0: no bound (the kernel then holds
    megabytes, delivered in order however old)."""
    ping_interval: float = _setting(20.0, minimum=0, maximum=DAY, zero="disables pings")
    """Seconds between WebSocket keepalive pings; 0 disables them."""
    ping_timeout: float = _setting(20.0, minimum=0, maximum=DAY, zero="waits forever")
    """Seconds without a pong before a connection is considered dead; 0 waits forever."""
    rate: float = _setting(50.0, minimum=0, maximum=MILLION, zero="means no limit")
    """Frames per second per connection, in request-sized units (token bucket refill rate;
    each frame type has its cost, see :data:`translator.gateway.FRAME_COSTS`); 0 = no
    limit."""
    burst: int = _setting(100, minimum=1, maximum=MILLION)
    """Token bucket size for ``rate``."""
    max_connections: int = _setting(10_000, minimum=1, maximum=MILLION)
    """Open WebSocket connections in all; more get HTTP 503 at the handshake. The open-files
    limit may allow fewer (translator/budget.py): then the lower number is enforced, and
    the start-up log says so."""
    max_connections_per_ip: int = _setting(256, minimum=1, maximum=MILLION)
    """Open WebSocket connections from one client address; more get HTTP 503."""
    handshake_timeout: float = _setting(10.0, above=0, maximum=HOUR)
    """Seconds a client has to complete the WebSocket opening handshake (more than 0: a
    handshake without a deadline would let idle sockets pile up)."""
    max_upstream_bytes: int = _setting(1_048_576, minimum=1, maximum=GIB)
    """Largest representation taken from a sensor (all blocks together)."""
    max_idle_bytes: int = _setting(16 << 20, minimum=0, maximum=GIB, zero="keeps none")
    """Memory for resources nobody watches any more, cached values included: kept so that a
    client that comes back finds the same ``sub`` and ``seq``; past it the oldest are
    forgotten (at most 10 000 of them in any case)."""
    max_observations: int = _setting(1000, minimum=1, maximum=MILLION)
    """Upstream observations the gateway keeps at once, lingering ones and pinned sensors
    included; a subscription that needs one more ends the oldest lingering one, or gets
    ``limit``."""
    min_pmax: float = _setting(1.0, above=0, maximum=DAY)
    """Shortest ``cond.pmax`` a subscription may ask for (seconds): a repeat every pmax per
    subscription is a frame the gateway makes up, so a client cannot turn it into a frame
    generator."""

    def __post_init__(self) -> None:
        _check_fields(self)


@dataclass(frozen=True)
class SupervisionConfig:
    """``[supervision]``: how upstream observations are kept alive."""

    grace: float | None = _setting(None, minimum=0, maximum=DAY, zero="renews at Max-Age")
    """Seconds past Max-Age without a notification before an observation is stale and
    re-registered. Unset: 10 % of Max-Age, at least 2 s and at most 10 s (a sensor that
    notifies at its Max-Age is late by the network's jitter now and then)."""
    backoff_min: float = _setting(1.0, above=0, maximum=DAY)
    """First delay before re-registering a failed observation (doubles each failure)."""
    backoff_max: float = _setting(60.0, above=0, maximum=DAY)
    """Longest delay between re-registration attempts."""
    poll_min: float = _setting(5.0, above=0, maximum=DAY)
    """Shortest interval for polling a resource that does not support Observe."""
    registration_timeout: float = _setting(10.0, above=0, maximum=HOUR)
    """Seconds a registration may stay unanswered before it counts as failed."""
    client_error_backoff: float = _setting(60.0, above=0, maximum=DAY)
    """First delay before registering again after the sensor answered with a client error
    (4.xx: the resource is gone, or not for the gateway); doubles with each such answer up
    to an hour (or this value, when larger)."""
    transfer_timeout: float = _setting(60.0, above=0, maximum=HOUR)
    """Seconds the block-wise representation of a notification or poll answer may take to
    arrive whole (RFC 7959); past it, subscribers get a notify with ``decode_error``."""

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.backoff_max < self.backoff_min:
            raise ConfigError("backoff_max", "must be at least backoff_min")


@dataclass(frozen=True)
class HistoryConfig:
    """``[history]``: the recent notify frames kept so that a client can resume after a
    reconnect (``subscribe`` with ``since``)."""

    size: int = _setting(32, minimum=0, maximum=1000, zero="turns history off")
    """Notify frames kept per resource (the newest)."""
    max_bytes: int = _setting(16 << 20, minimum=0, maximum=GIB, zero="turns history off")
    """Memory for all resources' history together; past it the oldest frames go first."""

    def __post_init__(self) -> None:
        _check_fields(self)


def parse_listen(text: str) -> tuple[str, int]:
    """``"[::]:5683"``, ``"127.0.0.1:0"`` -> (host, port); ValueError for anything else."""
    import ipaddress

    host, colon, port_text = text.rpartition(":")
    if not colon or not (port_text.isascii() and port_text.isdigit()) or len(port_text) > 5:
        raise ValueError(f"expected HOST:PORT (an IPv6 address in brackets), got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 address needs brackets: {text!r}")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{host!r} is not an IP address") from None
    if int(port_text) > 65535:
        raise ValueError(f"port {port_text} is out of range")
    return host, int(port_text)


@dataclass(frozen=True)
class CoapConfig:
    """``[coap]``: the gateway's CoAP socket toward the sensors, and its own CoAP server
    endpoint (for the Resource Directory)."""

    receive_buffer: int = _setting(1 << 20, minimum=0, maximum=GIB, zero="keeps the kernel's")
    """Bytes asked for the UDP socket's receive buffer (``SO_RCVBUF``), where datagrams wait
    while the gateway is busy; a full buffer drops what arrives. Linux doubles the value
    and caps it at ``net.core.rmem_max``; the effective size is logged at start. 0 keeps
    the kernel's default (``net.core.rmem_default``)."""

    listen: tuple[str, ...] = _setting(())
    """``HOST:PORT`` addresses (``[::]:5683``; port 0 lets the OS pick); empty: no CoAP
    server, no directory."""

    def __post_init__(self) -> None:
        _check_fields(self)
        for index, text in enumerate(self.listen):
            try:
                parse_listen(text)
            except ValueError as error:
                raise ConfigError(f"listen[{index}]", str(error)) from None


NAME_FIELDS: Final = ("ep", "d", "path")
"""The placeholders of ``[rd] name_template``."""


@dataclass(frozen=True)
class RdConfig:
    """``[rd]``: who may register at the gateway's Resource Directory, and how much."""

    allow_from: tuple[str, ...] = _setting(())
    """Address prefixes registrations may come from (``10.0.0.0/8``, ``::1``). Required
    when ``[coap] listen`` is set: a directory open to anyone is a way in."""
    endpoints: tuple[str, ...] = _setting(("*",))
    """Endpoint-name patterns (``*``, ``?``, ``[...]``) a registration's ``ep`` must match."""
    name_template: str = _setting("{ep}/{path}", nonempty=True)
    """The catalogue name of a registered resource: ``{ep}``, ``{d}`` and ``{path}`` (the
    link's path without its leading ``/``)."""
    max_registrations: int = _setting(1000, minimum=1, maximum=MILLION)
    max_links: int = _setting(64, minimum=1, maximum=10_000)
    """Links per registration."""
    max_payload: int = _setting(4096, minimum=64, maximum=1 << 20)
    """Bytes of link-format per registration."""
    min_lifetime: int = _setting(60, minimum=1, maximum=DAY)
    """A registration's ``lt`` is raised to at least this many seconds."""

    def __post_init__(self) -> None:
        import ipaddress
        import string

        _check_fields(self)
        for index, prefix in enumerate(self.allow_from):
            try:
                ipaddress.ip_network(prefix, strict=False)
            except ValueError:
                raise ConfigError(
                    f"allow_from[{index}]", f"{prefix!r} is not an address prefix"
                ) from None
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(self.name_template)
                      if name is not None]
        except ValueError as error:
            raise ConfigError("name_template", str(error)) from None
        unknown = [name for name in fields if name not in NAME_FIELDS]
        if unknown or "ep" not in fields:
            raise ConfigError(
                "name_template",
                f"must contain {{ep}} and no placeholders but {{ep}}, {{d}}, {{path}}; "
                f"got {self.name_template!r}",
            )


@dataclass(frozen=True)
class DiscoveryConfig:
    """``[discovery]``: an existing Resource Directory whose endpoints join the catalogue."""

    rd: str | None = _setting(None)
    """``coap://host:port`` of the directory (its /rd-lookup/res is read)."""
    refresh: float = _setting(300.0, above=0, maximum=DAY)
    """Seconds between reads of the directory."""

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.rd is not None:
            try:
                uri = parse_coap_uri(self.rd)
            except UriError as error:
                raise ConfigError("rd", str(error)) from None
            if uri.scheme != "coap":
                raise ConfigError("rd", "only coap:// directories can be read")


CLUSTER_NAME_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
)
"""What a cluster's name and a node's name may contain: they become parts of NATS subjects
and of JetStream bucket and key names, where dots, wildcards and spaces mean something."""


@dataclass(frozen=True)
class ClusterConfig:
    """``[cluster]``: several gateways as one, over NATS (docs/cluster.md). Without ``nats``
    the gateway is a single process and nothing of the cluster is imported."""

    nats: tuple[str, ...] = _setting(())
    """NATS server URLs (``nats://host:4222``, ``tls://…``); empty: no cluster."""
    node: str = _setting("")
    """This node's name, unique in the cluster; empty: the host name and the process id."""
    name: str = _setting("coapws", nonempty=True)
    """The cluster's name: the prefix of its subjects, buckets and stream, so that several
    clusters can share one NATS."""
    credentials: str | None = _setting(None)
    """A NATS credentials file (``.creds``: a user JWT and its NKey seed)."""
    tls_ca: str | None = _setting(None)
    """PEM CA bundle that signs the NATS servers' certificates (``tls://`` URLs)."""
    tls_cert: str | None = _setting(None)
    """PEM client certificate, for NATS servers that verify clients."""
    tls_key: str | None = _setting(None)
    """PEM private key of ``tls_cert``."""
    lease_ttl: float = _setting(6.0, minimum=1.0, maximum=HOUR)
    """Seconds an owner's lease on a resource lasts without renewal (it renews it three
    times per TTL): how long a dead owner's resources wait for a new one."""
    interest_ttl: float = _setting(6.0, minimum=1.0, maximum=HOUR)
    """Seconds a node's interest in a resource lasts without renewal."""

    def __post_init__(self) -> None:
        _check_fields(self)
        for key, value in (("node", self.node), ("name", self.name)):
            if value and not set(value) <= CLUSTER_NAME_CHARS:
                raise ConfigError(key, f"{value!r}: only letters, digits, '_' and '-'")
        for url in self.nats:
            scheme, sep, rest = url.partition("://")
            if not sep or scheme not in ("nats", "tls") or not rest:
                raise ConfigError("nats", f"{url!r} is not a nats:// or tls:// URL")
        if (self.tls_cert is None) != (self.tls_key is None):  # the missing one is named
            raise ConfigError("tls_key" if self.tls_key is None else "tls_cert",
                              "tls_cert and tls_key go together")

    @property
    def enabled(self) -> bool:
        return bool(self.nats)


DTLS_PSK_MAX_BYTES: Final = 16
"""Longest DTLS pre-shared key the gateway's DTLS stack (tinydtls, through DTLSSocket) takes.
Its buffer is this size and a longer key would overrun it, so the limit is checked here."""
DTLS_IDENTITY_MAX_BYTES: Final = 32
"""Longest PSK identity tinydtls sends."""


@dataclass(frozen=True)
class CredentialConfig:
    """One ``[[credentials]]`` entry: how the gateway proves itself to the CoAP servers whose
    URIs match a pattern, and protects what it exchanges with them.

    Each entry is one kind: DTLS with a pre-shared key (``dtls_identity`` with ``dtls_psk`` or
    ``dtls_psk_hex``) for ``coaps://`` URIs, or an OSCORE security context
    (``oscore_context``, RFC 8613) for ``coap://`` URIs. An entry is chosen by the request's
    origin (scheme, host, port) alone, never by its path or query, which a client writes; and
    no two entries may match the same origin, so that the choice is never ambiguous. See
    :mod:`translator.credentials`.
    """

    match: str = _required(nonempty=True)
    """The servers this entry is for, as an origin pattern: ``coaps://192.0.2.7``,
    ``coaps://*.sensors.example``, ``coaps://10.0.0.*:*``. The scheme is written out; host
    and port take the wildcards of allow patterns, within their own component (see
    :mod:`translator.core.policy`); without a port, the scheme's default port. A trailing ``/*``
    is accepted and means the same; any other path is an error. Stored normalized, as
    ``scheme://host:port/*``."""
    dtls_identity: str | None = _setting(None)
    """DTLS: the PSK identity the gateway presents (text; sent in the clear; at most 32 bytes
    of UTF-8)."""
    dtls_psk: str | None = _setting(None)
    """DTLS: the pre-shared key as text (its UTF-8 bytes, at most 16)."""
    dtls_psk_hex: str | None = _setting(None)
    """DTLS: the pre-shared key as hex digits (at most 16 bytes), instead of ``dtls_psk``."""
    oscore_context: str | None = _setting(None)
    """OSCORE: directory of a security context in aiocoap's format (``settings.json`` and/or
    ``secret.json`` with ``sender-id``, ``recipient-id``, ``secret``, optional ``salt``,
    ``algorithm``, ...). The gateway locks it and writes its sequence numbers there
    (``sequence.json``), so it must be writable and used by one process only."""

    def __post_init__(self) -> None:
        _check_fields(self)
        object.__setattr__(self, "match", _normalize_match(self.match))
        dtls = (self.dtls_identity, self.dtls_psk, self.dtls_psk_hex)
        if self.oscore_context is not None:
            if any(value is not None for value in dtls):
                raise ConfigError(
                    "oscore_context", "an entry is either OSCORE or DTLS: remove the dtls_* keys"
                )
            if not self.oscore_context:
                raise ConfigError("oscore_context", "must be a directory, got ''")
            if not self.match.startswith("coap://"):
                raise ConfigError(
                    "match", f"OSCORE credentials are for coap:// URIs, got {self.match!r}"
                )
            return
        if all(value is None for value in dtls):
            raise ConfigError(
                "match",
                "no credentials: give dtls_identity and dtls_psk (or dtls_psk_hex) for DTLS, "
                "or oscore_context for OSCORE",
            )
        if not self.match.startswith("coaps://"):
            raise ConfigError(
                "match", f"DTLS credentials are for coaps:// URIs, got {self.match!r}"
            )
        if self.dtls_identity is None:
            raise ConfigError("dtls_identity", "required with dtls_psk / dtls_psk_hex")
        identity = self.dtls_identity.encode()
        if not 0 < len(identity) <= DTLS_IDENTITY_MAX_BYTES:
            raise ConfigError(
                "dtls_identity",
                f"must be 1 to {DTLS_IDENTITY_MAX_BYTES} bytes, got {len(identity)}",
            )
        if (self.dtls_psk is None) == (self.dtls_psk_hex is None):
            raise ConfigError("dtls_psk", "give exactly one of dtls_psk and dtls_psk_hex")
        key = "dtls_psk" if self.dtls_psk is not None else "dtls_psk_hex"
        if not 0 < len(self.psk) <= DTLS_PSK_MAX_BYTES:
            raise ConfigError(key, f"must be 1 to {DTLS_PSK_MAX_BYTES} bytes, "
                                   f"got {len(self.psk)}")

    @property
    def kind(self) -> str:
        """``"dtls"`` or ``"oscore"``."""
        return "oscore" if self.oscore_context is not None else "dtls"

    @property
    def psk(self) -> bytes:
        """The DTLS pre-shared key as bytes (empty for an OSCORE entry)."""
        if self.dtls_psk is not None:
            return self.dtls_psk.encode()
        if self.dtls_psk_hex is None:
            return b""
        try:
            return bytes.fromhex(self.dtls_psk_hex.replace(":", "").replace(" ", ""))
        except ValueError:
            raise ConfigError("dtls_psk_hex", "must be hex digits (pairs, optionally "
                                              "separated by ':' or spaces)") from None

    def matches(self, uri: str) -> bool:
        """Whether this entry applies to `uri`: whether its origin matches."""
        target = parse_coap_uri(uri)
        return credential_pattern(self.match).matches_origin(target.scheme, target.host,
                                                             target.port)

    def __repr__(self) -> str:  # keep keys out of tracebacks and logs
        what = (f"oscore_context={self.oscore_context!r}" if self.kind == "oscore"
                else f"dtls_identity={self.dtls_identity!r}, dtls_psk=<hidden>")
        return f"CredentialConfig(match={self.match!r}, {what})"


def _normalize_match(pattern: str) -> str:
    """The canonical spelling of a credentials origin pattern: ``scheme://host:port/*``."""
    scheme, separator, rest = pattern.partition("://")
    if not separator or scheme.lower() not in ("coap", "coaps"):
        raise ConfigError("match", f"must start with coap:// or coaps://, got {pattern!r}")
    authority, slash, path = rest.partition("/")
    if slash and path not in ("", "*"):
        raise ConfigError(
            "match",
            f"{pattern!r}: credentials are chosen by the origin alone (scheme://host:port); "
            "remove the path",
        )
    try:
        compiled = compile_pattern(f"{scheme.lower()}://{authority}/*")
    except PatternError as error:
        raise ConfigError("match", str(error)) from None
    assert compiled.host is not None
    host = compiled.host.glob
    if compiled.host.kind == "ipv6" or ":" in host:
        host = f"[{host}]"
    port = compiled.port or str(DEFAULT_PORTS[scheme.lower()])
    return f"{scheme.lower()}://{host}:{port}/*"


@functools.cache
def credential_pattern(match: str) -> UriPattern:
    """The compiled origin pattern of a normalized ``[[credentials]] match``."""
    return compile_pattern(match)


AUTH_MODES: Final = ("auto", "none")
SCOPES: Final = ("read", "write", "metrics")
"""`read`: subscribe, list, GET; `write`: the other methods; `metrics`: GET /metrics."""


@dataclass(frozen=True)
class TokenConfig:
    """One ``[[auth.tokens]]`` entry: a bearer token and what it may do."""

    token: str = _required(nonempty=True)
    """The secret a client presents (``Authorization: Bearer …`` or ``?access_token=``)."""
    name: str = _setting("token", nonempty=True)
    """A label for logs (the token itself is never logged)."""
    scopes: tuple[str, ...] = _setting(("read",))
    """``read`` (subscribe, list, GET) and/or ``write`` (the other methods)."""
    allow: tuple[str, ...] = _setting(())
    """Patterns or sensor names narrowing what this token reaches; empty = the global policy."""

    def __post_init__(self) -> None:
        _check_fields(self)
        for index, scope in enumerate(self.scopes):
            if scope not in SCOPES:
                raise ConfigError(f"scopes[{index}]", f"must be one of {SCOPES}, got {scope!r}")

    def __repr__(self) -> str:  # keep secrets out of tracebacks and logs
        return f"TokenConfig(name={self.name!r}, scopes={self.scopes!r}, token=<hidden>)"


@dataclass(frozen=True)
class AuthConfig:
    """``[auth]``: who may connect."""

    mode: str = _setting("auto", choices=AUTH_MODES)
    """``auto``: authentication is on when tokens exist; with none, only loopback serving is
    allowed. ``none``: no authentication, on any address (say so deliberately)."""
    token_file: str | None = _setting(None)
    """File with one token per line, optionally followed by its scopes (default ``read``)."""
    tokens: tuple[TokenConfig, ...] = _setting(())
    """``[[auth.tokens]]`` entries."""

    def __post_init__(self) -> None:
        _check_fields(self)

@dataclass(frozen=True)
class MetricsConfig:
    """``[metrics]``: where else ``GET /metrics`` is served, besides the WebSocket port."""

    listen: str | None = _setting(None, nonempty=True)
    """``HOST:PORT`` (``127.0.0.1:9464``, ``[::1]:9464``; port 0 lets the OS pick) of a
    plain-HTTP listener for a scraper on another network. Protected like the WebSocket
    port: with tokens configured, only a token with the ``metrics`` scope reads them."""

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.listen is not None:
            listen_address(self.listen, "listen")

    @property
    def address(self) -> tuple[str, int] | None:
        """The listen address as (host, port), or None when not set."""
        return None if self.listen is None else listen_address(self.listen, "listen")


def listen_address(text: str, key: str) -> tuple[str, int]:
    """``HOST:PORT`` as (host, port): an IPv4 address or host name, or an IPv6 address in
    brackets. Raises ConfigError naming `key`."""
    example = "HOST:PORT, e.g. 127.0.0.1:9464 or [::1]:9464"
    host, colon, port_text = text.rpartition(":")
    if not colon or not host or not port_text.isascii() or not port_text.isdigit():
        raise ConfigError(key, f"must be {example}, got {_show(text)}")
    port = int(port_text)
    if port > 65535:
        raise ConfigError(key, f"port must be in 0..65535, got {port}")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ConfigError(key, f"{_show(host)} is not an IPv6 address") from None
        return host[1:-1], port
    if ":" in host:
        raise ConfigError(key, f"an IPv6 address goes in brackets: {example}")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        problem = host_name_problem(host.lower().rstrip("."))
        if problem is not None:
            raise ConfigError(key, problem) from None
    return host, port


@dataclass(frozen=True)
class GatewayConfig:
    """The whole configuration: one field per top-level TOML key."""

    server: ServerConfig = field(default_factory=ServerConfig)
    """``[server]``."""
    sensors: tuple[SensorConfig, ...] = _setting(())
    """``[[sensors]]``, in file order."""
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    """``[policy]``."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """``[limits]``."""
    coap: CoapConfig = field(default_factory=CoapConfig)
    """``[coap]``."""
    supervision: SupervisionConfig = field(default_factory=SupervisionConfig)
    """``[supervision]``."""
    history: HistoryConfig = field(default_factory=HistoryConfig)
    """``[history]``."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """``[cluster]``."""
    auth: AuthConfig = field(default_factory=AuthConfig)
    """``[auth]``."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """``[metrics]``."""
    credentials: tuple[CredentialConfig, ...] = _setting(())
    """``[[credentials]]``: DTLS keys and OSCORE contexts for protected sensors."""
    rd: RdConfig = field(default_factory=RdConfig)
    """``[rd]``."""
    discovery: DiscoveryConfig = field(default_factory=DiscoveryConfig)
    """``[discovery]``."""
    log_level: str = _setting("info", choices=LOG_LEVELS)
    """Logging threshold."""
    log_format: str = _setting("text", choices=LOG_FORMATS)
    """``text`` (one readable line per record) or ``json`` (one JSON object per line, with
    the connection and the resource as fields where a record names them)."""

    def __post_init__(self) -> None:
        _check_fields(self)
        first_index: dict[str, int] = {}
        for index, sensor in enumerate(self.sensors):
            if sensor.name in first_index:
                raise ConfigError(
                    f"sensors[{index}].name",
                    f"duplicate sensor name {sensor.name!r} "
                    f"(already used by sensors[{first_index[sensor.name]}])",
                )
            first_index[sensor.name] = index
        for index, entry in enumerate(self.credentials):
            for earlier_index, earlier in enumerate(self.credentials[:index]):
                if credential_pattern(entry.match).overlaps_origin(
                    credential_pattern(earlier.match)
                ):
                    raise ConfigError(
                        f"credentials[{index}].match",
                        f"{entry.match!r} overlaps {earlier.match!r} (credentials"
                        f"[{earlier_index}]): some origin matches both, so which credentials "
                        "apply would be ambiguous; make the patterns disjoint",
                    )
        if self.coap.listen and not self.rd.allow_from:
            raise ConfigError(
                "rd.allow_from",
                "[coap] listen enables the Resource Directory: name the address prefixes "
                "registrations may come from (e.g. allow_from = [\"fd00::/8\"])",
            )
        for index, sensor in enumerate(self.sensors):
            if sensor.uri.startswith("coaps://") and not any(
                entry.kind == "dtls" and entry.matches(sensor.uri) for entry in self.credentials
            ):
                raise ConfigError(
                    f"sensors[{index}].uri",
                    f"{sensor.uri} needs DTLS credentials: add a [[credentials]] entry whose "
                    "match covers it, with dtls_identity and dtls_psk",
                )


# --- public entry points -----------------------------------------------------------------


def load_config(path: str | Path) -> GatewayConfig:
    """Read and validate a TOML configuration file."""
    try:
        with open(path, "rb") as file:
            data = tomllib.load(file)
    except OSError as error:
        reason = error.strerror or str(error)
        raise ConfigError("<file>", f"cannot read {str(path)!r}: {reason}") from None
    except UnicodeDecodeError as error:
        raise ConfigError("<file>", f"{str(path)!r} is not UTF-8: {error.reason}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError("<file>", f"{str(path)!r} is not valid TOML: {error}") from None
    return config_from_mapping(data)


def config_from_mapping(data: Mapping[str, Any]) -> GatewayConfig:
    """Validate an already-parsed configuration (e.g. the result of ``tomllib.load``)."""
    return _build(GatewayConfig, data, "")


def apply_overrides(
    config: GatewayConfig,
    *,
    host: str | None = None,
    port: int | None = None,
    sensors: Sequence[str] = (),
    allow: Sequence[str] = (),
    linger: float | None = None,
    log_level: str | None = None,
    log_format: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    no_auth: bool = False,
    metrics_listen: str | None = None,
    nats: Sequence[str] = (),
    node: str | None = None,
    nats_files: Mapping[str, str | None] | None = None,
) -> GatewayConfig:
    """Apply command-line flags on top of a configuration.

    ``sensors`` are ``NAME=URI`` strings, appended; one whose name is already configured
    replaces that sensor in place. ``allow`` patterns are appended. ``nats_files`` maps
    ``[cluster]`` file settings (``credentials``, ``tls_ca``, ``tls_cert``, ``tls_key``) to
    paths; None leaves one as configured. Errors name the flag.
    """
    if isinstance(sensors, str) or isinstance(allow, str):
        # A bare string would be iterated character by character.
        raise TypeError("sensors and allow must be sequences of strings, not a string")

    server = config.server
    if host is not None:
        server = _replace(server, "--host", host=host)
    if port is not None:
        server = _replace(server, "--port", port=port)
    if linger is not None:
        server = _replace(server, "--linger", linger=linger)
    if tls_cert is not None or tls_key is not None:
        server = _replace(
            server,
            "--tls-cert" if tls_cert is not None else "--tls-key",
            tls_cert=tls_cert if tls_cert is not None else server.tls_cert,
            tls_key=tls_key if tls_key is not None else server.tls_key,
        )

    sensor_list = list(config.sensors)
    for spec in sensors:
        sensor = _parse_sensor_flag(spec)
        names = [existing.name for existing in sensor_list]
        if sensor.name in names:
            sensor_list[names.index(sensor.name)] = sensor
        else:
            sensor_list.append(sensor)

    policy = config.policy
    if allow:
        policy = _replace(policy, "--allow", allow=policy.allow + tuple(allow))

    config = dataclasses.replace(config, server=server, sensors=tuple(sensor_list), policy=policy)
    if no_auth:
        config = dataclasses.replace(config, auth=dataclasses.replace(config.auth, mode="none"))
    if log_level is not None:
        config = _replace(config, "--log-level", log_level=log_level)
    if log_format is not None:
        config = _replace(config, "--log-format", log_format=log_format)
    if metrics_listen is not None:
        metrics = _replace(config.metrics, "--metrics-listen", listen=metrics_listen)
        config = dataclasses.replace(config, metrics=metrics)
    if isinstance(nats, str):
        raise TypeError("nats must be a sequence of strings, not a string")
    if nats:
        cluster = _replace(config.cluster, "--nats", nats=tuple(nats))
        config = dataclasses.replace(config, cluster=cluster)
    if node is not None:
        config = dataclasses.replace(config, cluster=_replace(config.cluster, "--node", node=node))
    # Any: the keys are checked against NATS_FILE_FLAGS, all of them `str | None` settings.
    given: dict[str, Any] = {
        key: path for key, path in (nats_files or {}).items() if path is not None
    }
    if given:
        unknown = set(given) - set(NATS_FILE_FLAGS)
        if unknown:
            raise TypeError(f"not a [cluster] file setting: {', '.join(sorted(unknown))}")
        try:
            cluster = dataclasses.replace(config.cluster, **given)
        except ConfigError as error:  # the flag of the setting at fault, else the first given
            flag = NATS_FILE_FLAGS.get(error.key, NATS_FILE_FLAGS[next(iter(given))])
            raise ConfigError(flag, error.message) from None
        config = dataclasses.replace(config, cluster=cluster)
    return config


NATS_FILE_FLAGS: Final = {
    "credentials": "--nats-credentials",
    "tls_ca": "--nats-tls-ca",
    "tls_cert": "--nats-tls-cert",
    "tls_key": "--nats-tls-key",
}
"""The ``serve`` flags for ``[cluster]``'s files, by setting."""


def policy_for(config: GatewayConfig) -> Policy:
    """The destination policy a configuration describes: its patterns plus its sensors."""
    return Policy(
        allow=config.policy.allow,
        sensor_uris=frozenset(sensor.uri for sensor in config.sensors),
    )


# --- the generic machinery -----------------------------------------------------------------

_D = TypeVar("_D", bound="DataclassInstance")


def _parse_sensor_flag(spec: str) -> SensorConfig:
    if not isinstance(spec, str) or "=" not in spec:
        raise ConfigError("--sensor", f"expected NAME=URI, got {spec!r}")
    name, _, uri = spec.partition("=")
    try:
        return SensorConfig(name=name, uri=uri)
    except ConfigError as error:
        raise ConfigError("--sensor", f"{error.key} in {spec!r}: {error.message}") from None


def _replace(obj: _D, flag: str, **changes: Any) -> _D:
    """``dataclasses.replace`` with validation errors reported against a flag."""
    try:
        return dataclasses.replace(obj, **changes)
    except ConfigError as error:
        raise ConfigError(flag, error.message) from None


def _build(cls: type[_D], data: object, key: str) -> _D:
    """Construct section ``cls`` from a TOML table found at ``key``."""
    if not isinstance(data, Mapping):
        raise ConfigError(key or "<root>", f"must be a table, got {_show(data)}")
    hints = _type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        sub_key = _join(key, str(name))
        if name not in known:
            raise ConfigError(sub_key, _unknown(str(name), value, known))
        kwargs[name] = _load_value(value, hints[name], sub_key)
    for name, spec in known.items():
        if name not in kwargs and spec.default is MISSING and spec.default_factory is MISSING:
            raise ConfigError(_join(key, name), "required key is missing")
    try:
        return cls(**kwargs)
    except ConfigError as error:
        # Section validators name keys relative to themselves; make them absolute.
        raise ConfigError(_join(key, error.key), error.message) from None


def _load_value(value: object, annotation: Any, key: str) -> object:
    """Turn TOML structure into dataclass structure; types are checked by the dataclass."""
    annotation = _optional_of(annotation) or annotation
    if dataclasses.is_dataclass(annotation) and isinstance(value, Mapping):
        return _build(typing.cast("type[DataclassInstance]", annotation), value, key)
    if typing.get_origin(annotation) is tuple and isinstance(value, (list, tuple)):
        item_type = typing.get_args(annotation)[0]
        return tuple(
            _load_value(item, item_type, f"{key}[{index}]") for index, item in enumerate(value)
        )
    return value


def _check_fields(obj: "DataclassInstance") -> None:
    """Type-check and constraint-check every field of a section, normalizing in place."""
    hints = _type_hints(type(obj))
    for spec in dataclasses.fields(obj):
        rule = spec.metadata.get("rule", _NO_RULE)
        value = getattr(obj, spec.name)
        checked = _check_value(value, hints[spec.name], rule, spec.name)
        if checked is not value:
            object.__setattr__(obj, spec.name, checked)


def _check_value(value: object, annotation: Any, rule: _Rule, key: str) -> object:
    def fail() -> ConfigError:
        return ConfigError(key, f"must be {_describe(annotation, rule)}, got {_show(value)}")

    optional = _optional_of(annotation)
    if optional is not None:
        # TOML has no null: None only ever comes from a default ("not set").
        return None if value is None else _check_value(value, optional, rule, key)

    if annotation is bool:
        if not isinstance(value, bool):
            raise fail()
        return value
    if annotation is int or annotation is float:
        # bool is a subclass of int, but `port = true` is a mistake, not the port 1.
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise fail()
        if annotation is int and not isinstance(value, int):
            raise fail()
        if isinstance(value, float) and not math.isfinite(value):
            raise fail()
        if rule.minimum is not None and value < rule.minimum:
            raise fail()
        if rule.above is not None and value <= rule.above:
            raise fail()
        if rule.maximum is not None and value > rule.maximum:
            raise fail()
        # TOML writes `linger = 5` as an int; float fields store floats.
        return float(value) if annotation is float and not isinstance(value, float) else value
    if annotation is str:
        if not isinstance(value, str):
            raise fail()
        if (rule.nonempty and not value) or (rule.choices and value not in rule.choices):
            raise fail()
        return value
    if typing.get_origin(annotation) is tuple:
        if not isinstance(value, (list, tuple)):
            raise fail()
        item_type = typing.get_args(annotation)[0]
        return tuple(
            _check_value(item, item_type, _NO_RULE, f"{key}[{index}]")
            for index, item in enumerate(value)
        )
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        if not isinstance(value, annotation):
            raise fail()
        return value
    # Reaching this means a section was given a field type the checker does not know yet:
    # a programming error, to be fixed here rather than silently accepted.
    raise TypeError(f"config field {key!r} has unsupported type {annotation!r}")


def _optional_of(annotation: Any) -> Any:
    """``X`` for an annotation ``X | None``, else None."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return args[0]
    return None


def _number(value: float) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _describe(annotation: Any, rule: _Rule) -> str:
    """What a valid value looks like, for error messages."""
    optional = _optional_of(annotation)
    if optional is not None:
        return _describe(optional, rule)
    if annotation is bool:
        return "a boolean (true or false)"
    if annotation is int or annotation is float:
        noun = "an integer" if annotation is int else "a number"
        low, high = rule.minimum, rule.maximum
        parts = []
        if rule.above is not None:
            parts.append(f"> {_number(rule.above)}")
        elif low is not None and high is not None:
            parts.append(f"in {_number(low)}..{_number(high)}")
            high = None
        elif low is not None:
            parts.append(f">= {_number(low)}")
        if high is not None:
            parts.append(f"<= {_number(high)}")
        text = f"{noun} {' and '.join(parts)}" if parts else noun
        return f"{text} (0 {rule.zero})" if rule.zero else text
    if annotation is str:
        if rule.choices:
            return "one of " + ", ".join(repr(choice) for choice in rule.choices)
        return "a non-empty string" if rule.nonempty else "a string"
    if typing.get_origin(annotation) is tuple:
        item_type = typing.get_args(annotation)[0]
        if item_type is str:
            return "an array of strings"
        if dataclasses.is_dataclass(item_type):
            return "an array of tables"
        return "an array"
    if dataclasses.is_dataclass(annotation):
        return "a table"
    return repr(annotation)


def _show(value: object) -> str:
    """A value as the TOML author wrote it, short enough for an error message."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return repr(value) if len(value) <= 60 else repr(value[:60]) + "..."
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, (list, tuple)):
        return "an array"
    return f"a {type(value).__name__}"


def _unknown(name: str, value: object, known: Mapping[str, object]) -> str:
    is_table = isinstance(value, Mapping) or (
        isinstance(value, list) and bool(value) and all(isinstance(v, Mapping) for v in value)
    )
    message = "unknown section" if is_table else "unknown key"
    homes = _homes().get(name)
    if homes:
        where = " or ".join(
            "at the top level (before any [table])" if not home else f"under {home}"
            for home in homes
        )
        return f"{message} here: '{name}' belongs {where}"
    close = difflib.get_close_matches(name, list(known), n=1)
    if close:
        return f"{message} (did you mean '{close[0]}'?)"
    return f"{message}; expected one of: {', '.join(known)}"


@functools.cache
def _homes() -> dict[str, tuple[str, ...]]:
    """Every key of the configuration, and the tables it belongs in (``""``: the top level;
    ``[server]``, ``[[sensors]]``, ``[[auth.tokens]]``...), for "belongs under" hints."""
    homes: dict[str, list[str]] = {}

    def walk(cls: type, table: str, array: bool) -> None:
        hints = _type_hints(cls)
        for spec in dataclasses.fields(cls):
            kind = _optional_of(hints[spec.name]) or hints[spec.name]
            item = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else None
            child = f"{table}.{spec.name}" if table else spec.name
            if dataclasses.is_dataclass(kind):
                homes.setdefault(spec.name, []).append(_table_name(table, array))
                walk(typing.cast(type, kind), child, False)
            elif item is not None and dataclasses.is_dataclass(item):
                homes.setdefault(spec.name, []).append(_table_name(table, array))
                walk(typing.cast(type, item), child, True)
            else:
                homes.setdefault(spec.name, []).append(_table_name(table, array))

    walk(GatewayConfig, "", False)
    return {name: tuple(dict.fromkeys(tables)) for name, tables in homes.items()}


def _table_name(table: str, array: bool) -> str:
    if not table:
        return ""
    return f"[[{table}]]" if array else f"[{table}]"


def _join(prefix: str, key: str) -> str:
    if not prefix:
        return key
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # Resolved once per class: get_type_hints is slow and the answer never changes.
    return typing.get_type_hints(cls)
