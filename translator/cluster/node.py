"""One gateway as a node of a cluster: where notifications come from and go to, over NATS.

A single gateway's hub asks the CoAP side to observe a resource when its first client
subscribes. In a cluster the hub (the *local hub*, this node's clients) asks this module
instead (`watch` / `unwatch`), which makes sure that exactly one node in the cluster observes
the resource and that its frames reach this node:

    local hub ──watch(uri)──▶ interest key  <key>.<node>   (bucket <cluster>_interest, TTL)
                              subscription  <cluster>.r.<key>   ──frames──▶ local hub.relay
                              lease         <key> = <node>   (bucket <cluster>_leases, TTL)
                                 │ the node that creates it owns the observation
                                 ▼
    owner hub ──StartObservation──▶ CoAP side ──answers──▶ owner hub ──notify/status──▶
        publish once to <cluster>.r.<key> (kept by the stream <cluster>_frames, last N per
        subject) and relay to this node's own local hub directly

The *owner hub* is a second `Hub` that numbers and serializes the resource's frames exactly as
a single gateway does (the same code); its one subscriber per owned resource is a `Seat`,
whose deliveries are published. Every node relays the same frame text to its clients, so the
notify frames, their `seq` and (with the cluster's epoch and URI-derived `sub`) the epoch are
identical on every node. A notify is published with the sensor's representation (`wire`):
CBOR clients take the value's CBOR item from it, the RFC 8323 endpoint (`represent`) the
payload; compact diffs and conditional subscriptions are the local hub's, as for any update.
A client that resumes (`since`) on a node whose own history cannot answer it is given the
frames the stream keeps (`retained`, into the local hub's history by `Hub.preload`), and the
join that follows relays every kept frame after them (`resumed`): no gap, no duplicate.

Ownership is a lease with a TTL, renewed by the owner three times per TTL; interest is a key
per node and resource with a TTL, renewed the same way. One loop (`_run`) converges what NATS
holds to what the local hub wants, on every change and every `lease_ttl / 6`: joins and
leaves, renewals, takeovers (a watched resource without a lease: the first node to create it
owns it; the others' clients see `stale` until its first answer says `online`), releases (an
owned resource nobody's interest key names any more). When NATS is unreachable the node
observes what its own clients watch by itself (degraded: `problem` says so, `/readyz` shows
it) and rejoins when NATS returns, giving up what another node owns meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, Protocol

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import KeyValueConfig, StorageType, StreamConfig
from nats.js.kv import KeyValue

from translator.cluster.names import Names, cluster_sub, default_node_name, resource_key
from translator.cluster.wire import Published, decode
from translator.config import ClusterConfig, ConfigError, GatewayConfig
from translator.core.frames import Status
from translator.core.history import History
from translator.core.hub import Command, Deliver, Hub, StartObservation, StopObservation
from translator.logs import LimitedLog

log = logging.getLogger(__name__)

NATS_ERRORS: Final = (nats.errors.Error, OSError, TimeoutError)
"""What talking to NATS may raise: the node then counts as cut off until it works again."""
CONNECT_TIMEOUT: Final = 2.0
DEGRADE_AFTER: Final = 2.0
"""Seconds without NATS after which a node observes what its clients watch by itself."""
RETRY_INTERVAL: Final = 1.0
"""Seconds between attempts to reach NATS while it is unreachable."""
PUBLISH_QUEUE: Final = 10_000
"""Frames waiting to be published at most; past it the oldest go (NATS is too slow or gone,
and the next notify makes them moot)."""
RESUME_TIMEOUT: Final = 3.0
"""Seconds a read of a resource's kept frames (for a client that resumes) may take; past it
the client is answered as if nothing were kept."""
CATCH_UP_FRAMES: Final = 10_000
"""Frames of a resource's subject held while its kept frames are read at most (the oldest
go first: the read brings what they say)."""
_NOTIFY_PREFIX: Final = '{"type":"notify"'
_PUBLISHED_PREFIXES: Final = (_NOTIFY_PREFIX, '{"type":"status"')


class Upstream(Protocol):
    """The CoAP side, as far as the owner of a resource needs it."""

    def start_observation(self, uri: str) -> None: ...

    def stop_observation(self, uri: str) -> None: ...


@dataclass(frozen=True, slots=True, eq=False)
class Seat:
    """The owner hub's subscriber of one owned resource: what it is delivered is published
    (compared by identity)."""

    uri: str


@dataclass(slots=True, eq=False)
class Watch:
    """A resource this node's clients watch (the local hub asked for it)."""

    uri: str
    key: str
    subscription: Subscription | None = None
    """On its subject, once joined (nats-py renews it after a reconnect)."""
    owner_seen: bool = False
    """A lease on it was seen: its disappearance means the owner is gone (say `stale`)."""
    catch_up: bool = False
    """A client resumed from the stream's frames before this node joined the subject: the
    join relays every kept frame after the local hub's latest, not only the last one, so
    that nothing published meanwhile is skipped."""
    held: list[bytes] | None = None
    """While the join reads the kept frames: what the subject delivers meanwhile, relayed
    after them (in order, so that the read cannot make a newer frame overtake)."""


@dataclass(slots=True, eq=False)
class Ownership:
    """A resource whose upstream observation this node holds."""

    uri: str
    key: str
    seat: Seat
    revision: int | None
    """The lease's revision; None while held without a lease (NATS unreachable)."""


def nats_options(config: ClusterConfig) -> dict[str, Any]:
    """nats-py's connect options for the configured TLS and credentials; a ConfigError for
    files that cannot be used."""
    options: dict[str, Any] = {}
    if config.credentials is not None:
        try:
            importlib.import_module("nkeys")  # nats-py signs with it: optional there
        except ImportError:
            raise ConfigError(
                "cluster.credentials", "a credentials file needs the nkeys package "
                "(pip install 'nats-py[nkeys]')",
            ) from None
        try:
            with open(config.credentials, "rb"):
                pass
        except OSError as exc:
            raise ConfigError("cluster.credentials", f"cannot read {config.credentials!r}: "
                              f"{exc.strerror or exc}") from None
        options["user_credentials"] = config.credentials
    if config.tls_ca is not None or config.tls_cert is not None or any(
        url.startswith("tls://") for url in config.nats
    ):
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
        key = "cluster.tls_ca"
        try:
            if config.tls_ca is not None:
                context.load_verify_locations(config.tls_ca)
            key = "cluster.tls_cert"
            if config.tls_cert is not None and config.tls_key is not None:
                context.load_cert_chain(config.tls_cert, config.tls_key)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(key, f"unusable TLS file: {exc}") from None
        options["tls"] = context
    return options


class ClusterNode:
    """This gateway's part of the cluster: `await start()`, then `await stop()`."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        local: Hub[Any],
        deliver: Callable[[list[Command[Any]]], None],
        upstream: Upstream,
        represent: Callable[[str, Published], None] | None = None,
    ) -> None:
        """`local`: the gateway's hub; `deliver`: carries out its commands (the gateway's
        `_execute`); `upstream`: the CoAP side, for the resources this node owns;
        `represent`: told each notify's representation as the sensor sent it, before the
        local hub relays the notify (the RFC 8323 endpoint sends those bytes)."""
        self.config = config.cluster
        self.node = self.config.node or default_node_name()
        self.names = Names(self.config.name)
        self.local = local
        self._deliver = deliver
        self._upstream = upstream
        self._represent = represent
        self._options = nats_options(self.config)
        self.owner_hub: Hub[Seat] = Hub(
            linger=0,  # interest lingers at the nodes; ownership ends when none is left
            max_subscriptions=1,
            sensors={s.name: s.uri for s in config.sensors},
            max_upstream_bytes=config.limits.max_upstream_bytes,
            max_observations=config.limits.max_observations,
            history=History(size=0),  # the stream keeps the cluster's history
            sub_for=cluster_sub,
        )
        # The Content-Format a resource advertised (/.well-known/core, or its RD
        # registration) is what this node's own hub knows: the owner hub decodes with it.
        self.owner_hub.registered_cf = self.local.advertised_cf
        self.history_size = max(1, config.history.size)
        self._watches: dict[str, Watch] = {}
        self._uri_of_key: dict[str, str] = {}
        self._joined: dict[str, Watch] = {}
        self._owned: dict[str, Ownership] = {}
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._leases: KeyValue | None = None
        self._interest: KeyValue | None = None
        self._wake = asyncio.Event()
        self._outbox: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue(PUBLISH_QUEUE)
        self._tasks: list[asyncio.Task[None]] = []
        self._down_since: float | None = time.monotonic()
        self._degraded = False
        """Cut off for longer than `DEGRADE_AFTER`: observing by itself (logged once)."""
        self._last_error: str | None = None
        """What nats-py last reported while this node could not reach NATS (for `problem`)."""
        self._refused = False
        """`_last_error` is a refusal (TLS, authorization), which routine errors do not hide."""
        self._next_renewal = 0.0
        self._check_interest = False
        self._stopping = False
        self._errors = LimitedLog(log)
        self.joined = asyncio.Event()
        """Set while the node is connected to NATS and set up (for tests and readiness)."""
        self.takeovers = 0
        """Resources this node took over (owned) since it started."""

    # -- the gateway's side -----------------------------------------------------------------

    @property
    def problem(self) -> str | None:
        """Why the node serves only what it observes itself, or None."""
        if not self._degraded:
            return None
        why = f" ({self._last_error})" if self._last_error else ""
        return (f"degraded: NATS {', '.join(self.config.nats)} unreachable{why}; serving what "
                "this node observes itself")

    @property
    def owned(self) -> tuple[str, ...]:
        return tuple(self._owned)

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run(), name=f"cluster node {self.node}"),
            asyncio.create_task(self._connect(), name=f"cluster connection {self.node}"),
            asyncio.create_task(self._publish(), name=f"cluster publisher {self.node}"),
        ]

    async def stop(self) -> None:
        """Hand over at once: end what this node owns, delete its leases and interest keys
        (others need not wait for their TTL), close the connection."""
        self._stopping = True
        for task in self._tasks:
            task.cancel()
        await asyncio.wait(self._tasks, timeout=2)
        owned = list(self._owned.values())
        for ownership in owned:
            self._disown(ownership.uri)
        if self._nc is not None and self._nc.is_connected:
            with contextlib.suppress(*NATS_ERRORS):
                async with asyncio.timeout(2):
                    await self._hand_over(owned)
        if self._nc is not None:
            with contextlib.suppress(*NATS_ERRORS):
                await self._nc.close()
        self._errors.close()

    async def _hand_over(self, owned: list[Ownership]) -> None:
        assert self._leases is not None and self._interest is not None
        for ownership in owned:
            if ownership.revision is not None:
                # Another node's by now: not ours to delete.
                with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                    await self._leases.delete(ownership.key, last=ownership.revision)
        for watch in self._joined.values():
            await self._interest.delete(Names.interest_key(watch.key, self.node))

    def watch(self, uri: str) -> None:
        """The local hub observes `uri`: have its frames come here (StartObservation)."""
        if uri not in self._watches:
            key = resource_key(uri)
            self._watches[uri] = Watch(uri, key)
            self._uri_of_key[key] = uri
            self._wake.set()

    def unwatch(self, uri: str) -> None:
        """The local hub no longer observes `uri` (StopObservation, after its linger)."""
        if self._watches.pop(uri, None) is not None:
            self._wake.set()

    async def retained(self, uri: str) -> list[Published] | None:
        """The frames the stream keeps of `uri` (the latest `history_size`), oldest first,
        for a client that resumes on this node; None when NATS cannot say within
        `RESUME_TIMEOUT` (the client then gets what a subscribe without them gets)."""
        js = self._js
        if js is None or not self.joined.is_set():
            return None
        try:
            async with asyncio.timeout(RESUME_TIMEOUT):
                return await self._read_kept(js, resource_key(uri))
        except NATS_ERRORS as exc:
            self._errors.write("cluster.resume", logging.WARNING,
                               "cluster: cannot read the kept frames of %s: %s: %s", uri,
                               type(exc).__name__, exc)
            return None

    async def _read_kept(self, js: JetStreamContext, key: str) -> list[Published]:
        """The subject's messages, one direct get each (`next_by_subj`, in stream order),
        at most `history_size` of them (what the stream keeps per subject) plus the ones
        published meanwhile; undecodable ones are dropped (and logged)."""
        subject = self.names.subject(key)
        kept: list[Published] = []
        after = 1
        for _ in range(2 * self.history_size):
            try:
                msg = await js.get_msg(self.names.stream, seq=after, subject=subject,
                                       direct=True, next=True)
            except nats.js.errors.NotFoundError:
                break
            if msg.seq is None:
                break  # not a stream message's answer: nothing to go on from
            after = msg.seq + 1
            try:
                kept.append(decode(msg.data or b""))
            except ValueError as exc:
                self._malformed(self._uri_of_key.get(key, key), exc)
        return kept

    def resumed(self, uri: str) -> None:
        """A client was given `uri`'s kept frames (`retained`) and subscribed: if this node
        has not joined its subject yet, the join catches up from the local hub's latest."""
        watch = self._watches.get(uri)
        if watch is not None and uri not in self._joined:
            watch.catch_up = True

    def execute_owned(
        self, commands: list[Command[Seat]], payload: bytes | None = None,
        dropped: bool = False,
    ) -> None:
        """Carry out what the owner hub returns for the CoAP side's events: each notify and
        status frame is published once and relayed to this node's clients directly. A
        notify goes with `payload`, the representation it came from (`dropped`: too large
        or broken), for the clients that take the sensor's bytes (see `wire`)."""
        for command in commands:
            if isinstance(command, Deliver):
                text = command.text
                if not text.startswith(_PUBLISHED_PREFIXES):
                    continue
                published = Published(text)
                if payload is not None and text.startswith(_NOTIFY_PREFIX):
                    meta = command.meta
                    published = Published(
                        text, payload, meta is not None and meta.cbor_value is not None,
                        dropped,
                    )
                for seat in command.targets:
                    self._publish_frame(seat.uri, published)
                    if seat.uri in self._watches:
                        self._relay(seat.uri, published)
            elif isinstance(command, StartObservation):
                self._upstream.start_observation(command.uri)
            elif isinstance(command, StopObservation):
                self._upstream.stop_observation(command.uri)

    # -- frames -----------------------------------------------------------------------------

    def _relay_message(self, uri: str, data: bytes) -> None:
        """A message from the resource's subject (or the stream's latest one)."""
        try:
            published = decode(data)
        except ValueError as exc:
            self._malformed(uri, exc)
            return
        self._relay(uri, published)

    def _relay(self, uri: str, published: Published) -> None:
        try:
            if self._represent is not None and published.payload is not None:
                self._represent(uri, published)
            commands = self.local.relay(uri, published.text, published.cbor_value)
        except (ValueError, KeyError, TypeError, AttributeError, AssertionError) as exc:
            self._malformed(uri, exc)
            return
        self._deliver(commands)

    def _malformed(self, uri: str, exc: Exception) -> None:
        # Only a foreign publisher on our subjects can send what the owner hub never makes:
        # drop it, say so (rate limited).
        self._errors.write("cluster.bad-frame", logging.WARNING,
                           "dropped a malformed frame for %s: %s", uri, exc)

    def _publish_frame(self, uri: str, published: Published) -> None:
        if not self.joined.is_set():
            return  # degraded: nobody else can hear it; the stream misses it
        if self._outbox.full():
            self._outbox.get_nowait()
        self._outbox.put_nowait((self.names.subject(resource_key(uri)), published.encode()))

    async def _publish(self) -> None:
        """Publish frames in the order they were made (core NATS: the stream captures them
        too; no round trip per frame)."""
        while True:
            subject, data = await self._outbox.get()
            nc = self._nc
            if nc is None or not nc.is_connected:
                continue
            try:
                await nc.publish(subject, data)
            except NATS_ERRORS as exc:
                self._errors.write("cluster.publish", logging.WARNING, "publish failed: %s", exc)

    async def _on_frame(self, msg: Msg) -> None:
        uri = self._uri_of_key.get(msg.subject.rpartition(".")[2])
        if uri is None:
            return
        watch = self._watches.get(uri)
        if watch is not None and watch.held is not None:
            if len(watch.held) >= CATCH_UP_FRAMES:
                del watch.held[0]
            watch.held.append(msg.data)
        elif watch is not None and uri not in self._owned:
            self._relay_message(uri, msg.data)

    # -- the loop ---------------------------------------------------------------------------

    @property
    def _period(self) -> float:
        return self.config.lease_ttl / 6

    async def _run(self) -> None:
        while True:
            try:
                await self._reconcile()
            except NATS_ERRORS as exc:
                self._errors.write("cluster.nats", logging.WARNING, "cluster: %s: %s",
                                   type(exc).__name__, exc)
                self._went_down()
                await self._reconcile_down()
            except Exception as exc:  # the loop must outlive any surprise: it is the cluster
                if self._errors.write("cluster.internal", logging.ERROR,
                                      "cluster: internal error, the loop goes on: %s: %s",
                                      type(exc).__name__, exc):
                    log.debug("cluster: where", exc_info=True)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._period):
                    await self._wake.wait()

    async def _connect(self) -> None:
        """Connect (nats-py tries again until a server answers, then reconnects by itself
        whenever the connection breaks) and set up; `_run` serves degraded meanwhile."""
        while True:
            nc = await nats.connect(
                list(self.config.nats),
                name=f"coap-ws-gateway {self.node}",
                connect_timeout=int(CONNECT_TIMEOUT),
                allow_reconnect=True,
                max_reconnect_attempts=-1,
                reconnect_time_wait=int(RETRY_INTERVAL),
                disconnected_cb=self._disconnected,
                reconnected_cb=self._reconnected,
                error_cb=self._error,
                **self._options,
            )
            try:
                await self._set_up(nc)
            except NATS_ERRORS as exc:
                self._errors.write("cluster.setup", logging.WARNING,
                                   "cluster: cannot set up JetStream: %s", exc)
                with contextlib.suppress(*NATS_ERRORS):
                    await nc.close()
                await asyncio.sleep(RETRY_INTERVAL)
                continue
            self._nc = nc
            self._wake.set()
            return

    async def _set_up(self, nc: NatsClient) -> None:
        """The buckets and the stream (created when missing, the same by every node) and the
        cluster's epoch."""
        js = nc.jetstream()
        names = self.names
        self._leases = await self._bucket(js, names.leases, self.config.lease_ttl)
        self._interest = await self._bucket(js, names.interest, self.config.interest_ttl)
        meta = await self._bucket(js, names.meta, None)
        try:
            await js.stream_info(names.stream)
        except nats.js.errors.NotFoundError:
            with contextlib.suppress(nats.js.errors.BadRequestError):  # another node won
                await js.add_stream(StreamConfig(
                    name=names.stream, subjects=[names.subjects],
                    max_msgs_per_subject=self.history_size, storage=StorageType.FILE,
                    allow_direct=True,
                ))
        epoch = self.local.epoch.encode()
        with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
            await meta.create("epoch", epoch)
        self.local.epoch = ((await meta.get("epoch")).value or epoch).decode()
        self._js = js

    @staticmethod
    async def _bucket(js: JetStreamContext, name: str, ttl: float | None) -> KeyValue:
        try:
            return await js.key_value(name)
        except nats.js.errors.BucketNotFoundError:
            return await js.create_key_value(KeyValueConfig(
                bucket=name, ttl=ttl, history=1, storage=StorageType.FILE,
            ))

    async def _disconnected(self) -> None:
        self._went_down()
        self._wake.set()

    async def _reconnected(self) -> None:
        self._wake.set()

    async def _error(self, exc: Exception) -> None:
        # A refused certificate or credentials will not fix itself by retrying: the operator
        # must hear of it (a warning, through the limiter); a lost connection is routine.
        refused = isinstance(exc, ssl.SSLError | nats.errors.AuthorizationError)
        if refused or not self._refused:  # a refusal says more than the "connection lost"
            self._last_error = str(exc) or type(exc).__name__  # after it
            self._refused = self._refused or refused
        self._errors.write(
            "cluster.nats-error", logging.WARNING if refused else logging.INFO,
            "cluster: NATS: %s", exc,
        )

    def _went_down(self) -> None:
        if self._down_since is None:
            self._down_since = time.monotonic()
        self.joined.clear()

    async def _reconcile(self) -> None:
        nc = self._nc
        if self._stopping:
            return
        if nc is None or not nc.is_connected:
            self._went_down()
            await self._reconcile_down()
            return
        assert self._js is not None and self._leases is not None and self._interest is not None
        now = time.monotonic()
        if self._down_since is not None:
            if self._degraded:
                log.warning("cluster: NATS reachable again: node %s rejoins", self.node)
            self._down_since, self._degraded = None, False
            self._last_error, self._refused = None, False
            self._next_renewal = 0.0
            # Everything this node holds without a lease is taken back below, or given up.
        for uri in [u for u in self._joined if u not in self._watches]:
            await self._leave(self._joined.pop(uri))
        for uri, watch in list(self._watches.items()):
            if uri not in self._joined:
                await self._join(watch)
        renewing = now >= self._next_renewal
        if renewing:
            self._next_renewal = now + self.config.lease_ttl / 3
            for watch in list(self._joined.values()):
                await self._interest.put(
                    Names.interest_key(watch.key, self.node), watch.uri.encode()
                )
        for ownership in list(self._owned.values()):
            if ownership.revision is None or renewing:
                await self._renew(ownership)
        for uri, watch in list(self._watches.items()):
            if uri not in self._owned and uri in self._joined:
                await self._check_lease(watch)
        if renewing or self._check_interest:
            self._check_interest = False
            await self._release_unwatched()
        self.joined.set()

    async def _reconcile_down(self) -> None:
        """Cut off from NATS: observe what this node's clients watch, by itself, once the
        connection has been missing for `DEGRADE_AFTER` (not for a blip, nor while the
        first connection is being made)."""
        assert self._down_since is not None
        if time.monotonic() - self._down_since < DEGRADE_AFTER:
            return
        if not self._degraded:
            self._degraded = True
            log.warning("cluster: NATS unreachable: node %s serves what it observes itself "
                        "until it is back", self.node)
        # What no client of this node watches any more ends here: held without a lease, or
        # with one that has surely expired by now (another node observes it, if anyone).
        lease_gone = time.monotonic() - self._down_since >= self.config.lease_ttl
        for ownership in list(self._owned.values()):
            if ownership.uri not in self._watches and (ownership.revision is None or lease_gone):
                self._disown(ownership.uri)
        for uri, watch in self._watches.items():
            if uri not in self._owned:
                self._stale(uri, "the cluster is unreachable: this node observes it itself")
                watch.owner_seen = False
                await self._own(uri, None)

    async def _join(self, watch: Watch) -> None:
        assert self._nc is not None and self._js is not None and self._interest is not None
        if watch.catch_up:
            await self._join_catching_up(watch)
            return
        await self._subscribe_subject(watch)
        try:
            last = await self._js.get_last_msg(
                self.names.stream, self.names.subject(watch.key), direct=True
            )
        except nats.js.errors.NotFoundError:
            return
        if last.data and watch.uri not in self._owned:
            # The latest value at once (the hub drops it when it has it already).
            self._relay_message(watch.uri, last.data)

    async def _subscribe_subject(self, watch: Watch) -> None:
        """Take the resource's frames from its subject, and say this node wants them."""
        assert self._nc is not None and self._interest is not None
        watch.subscription = await self._nc.subscribe(
            self.names.subject(watch.key), cb=self._on_frame
        )
        self._joined[watch.uri] = watch
        await self._interest.put(Names.interest_key(watch.key, self.node), watch.uri.encode())

    async def _join_catching_up(self, watch: Watch) -> None:
        """Join as `_join` does, then relay in order every kept frame after the local hub's
        latest notify of the resource (the resumed client got the frames up to it, replayed),
        then what the subject delivered meanwhile (held: the read must not let a newer frame
        overtake). The hub drops what it has already."""
        assert self._nc is not None and self._js is not None and self._interest is not None
        watch.held = []
        kept: list[Published] = []
        try:
            await self._subscribe_subject(watch)
            kept = await self._read_kept(self._js, watch.key)
        finally:  # on a NATS error too (the loop goes on): what was held is relayed
            held, watch.held, watch.catch_up = watch.held or [], None, False
            resource = self.local.resource(watch.uri)
            if watch.uri not in self._owned and resource is not None:
                # Nothing numbered here yet: the latest value only, as any join relays.
                start = _after_notify(kept, resource.seq) if resource.last_notify is not None \
                    else max(len(kept) - 1, 0)
                for published in kept[start:]:
                    self._relay(watch.uri, published)
                for data in held:
                    self._relay_message(watch.uri, data)

    async def _leave(self, watch: Watch) -> None:
        assert self._interest is not None
        if watch.subscription is not None:
            with contextlib.suppress(nats.errors.BadSubscriptionError):
                await watch.subscription.unsubscribe()
            watch.subscription = None
        await self._interest.delete(Names.interest_key(watch.key, self.node))
        self._check_interest = True

    async def _check_lease(self, watch: Watch) -> None:
        """A watched resource this node does not own: has it an owner? If not, take it."""
        assert self._leases is not None
        try:
            await self._leases.get(watch.key)
        except nats.js.errors.KeyNotFoundError:
            pass
        else:
            watch.owner_seen = True
            return
        try:
            revision = await self._leases.create(watch.key, self.node.encode())
        except nats.js.errors.KeyWrongLastSequenceError:
            watch.owner_seen = True  # another node was faster
            return
        if watch.owner_seen:
            # A takeover: every node's clients hear it, the same frame everywhere, before
            # the new registration's first answer says `online`.
            text = Status(
                sub=cluster_sub(watch.uri), uri=watch.uri, state="stale",
                reason="the node observing it is gone: another one takes over",
            ).serialize()
            self._publish_frame(watch.uri, Published(text))
            self._relay(watch.uri, Published(text))
        watch.owner_seen = False
        await self._own(watch.uri, revision)

    async def _renew(self, ownership: Ownership) -> None:
        """Renew the lease (or take one, for what was held without); give the resource up
        when another node holds it."""
        assert self._leases is not None
        try:
            if ownership.revision is None:
                ownership.revision = await self._leases.create(ownership.key, self.node.encode())
                # Number on from the latest frame anywhere, should another node have
                # observed it meanwhile.
                await self._seed_owner(ownership.uri)
            else:
                ownership.revision = await self._leases.update(
                    ownership.key, self.node.encode(), last=ownership.revision
                )
        except nats.js.errors.KeyWrongLastSequenceError:
            log.info("cluster: %s is observed by another node now: %s stops", ownership.uri,
                     self.node)
            self._disown(ownership.uri)
            watch = self._watches.get(ownership.uri)
            if watch is not None:
                watch.owner_seen = True
                await self._catch_up(watch)

    async def _catch_up(self, watch: Watch) -> None:
        """After holding a resource without a lease: take the owner's numbering again (its
        latest frame), whatever this node numbered meanwhile."""
        assert self._js is not None
        with contextlib.suppress(nats.js.errors.NotFoundError):
            last = await self._js.get_last_msg(
                self.names.stream, self.names.subject(watch.key), direct=True
            )
            if last.data:
                self.local.rebase(watch.uri)
                self._relay_message(watch.uri, last.data)

    async def _release_unwatched(self) -> None:
        """End the observations that no node's interest names any more."""
        assert self._interest is not None and self._leases is not None
        if not self._owned:
            return
        try:
            keys = await self._interest.keys()
        except nats.js.errors.NoKeysError:
            keys = []
        wanted = {key.partition(".")[0] for key in keys}
        for ownership in list(self._owned.values()):
            if ownership.key not in wanted and ownership.uri not in self._watches:
                self._disown(ownership.uri)
                if ownership.revision is not None:
                    with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                        await self._leases.delete(ownership.key, last=ownership.revision)

    # -- ownership --------------------------------------------------------------------------

    async def _own(self, uri: str, revision: int | None) -> None:
        """Observe `uri` for the cluster, numbering on from its latest frame anywhere."""
        if revision is not None:
            await self._seed_owner(uri)
        resource = self.local.resource(uri)
        if resource is not None and resource.last_notify is not None:
            self.owner_hub.seed(uri, resource.last_notify, resource.last_cbor)
        seat = Seat(uri)
        self._owned[uri] = Ownership(uri, resource_key(uri), seat, revision)
        self.takeovers += 1
        log.info("cluster: node %s observes %s%s", self.node, uri,
                 "" if revision is not None else " (without a lease: NATS unreachable)")
        commands = self.owner_hub.subscribe(seat, uri)
        # Only the observation: what a new subscriber would be sent is not news.
        self.execute_owned([c for c in commands if not isinstance(c, Deliver)])

    async def _seed_owner(self, uri: str) -> None:
        assert self._js is not None
        with contextlib.suppress(nats.js.errors.NotFoundError):
            last = await self._js.get_last_msg(
                self.names.stream, self.names.subject(resource_key(uri)), direct=True
            )
            if last.data:
                try:
                    published = decode(last.data)
                    self.owner_hub.seed(uri, published.text, published.cbor_value)
                except (ValueError, KeyError, TypeError, AssertionError) as exc:
                    self._malformed(uri, exc)

    def _disown(self, uri: str) -> None:
        ownership = self._owned.pop(uri, None)
        if ownership is not None:
            self.execute_owned(self.owner_hub.disconnect(ownership.seat))

    def _stale(self, uri: str, reason: str) -> None:
        self._deliver(self.local.upstream_status(uri, "stale", reason))


def _after_notify(kept: list[Published], seq: int) -> int:
    """Where the frames after the notify numbered `seq` start in `kept` (0 when no notify
    of `kept` is numbered `seq` or lower: all of them are newer)."""
    start = 0
    for index, published in enumerate(kept):
        if published.text.startswith(_NOTIFY_PREFIX):
            number = json.loads(published.text).get("seq")
            if isinstance(number, int) and number <= seq:
                start = index + 1
    return start
