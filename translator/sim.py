"""Simulated CoAP sensors: a small aiocoap server used by the demo and by the tests.

`SimulatedSensors` serves, over UDP on one (by default loopback, OS-chosen) port:

- ``/temperature``: observable, CBOR number (ct 60), a random walk around 21 °C;
- ``/humidity``: observable, SenML JSON (ct 110), a random walk around 45 %RH;
- ``/status``: text/plain (ct 0) ``ok uptime=12s``, not observable;
- ``/led``: observable CBOR ``{"on": bool}`` (ct 60), settable with a CBOR or JSON PUT;
- ``/.well-known/core``: the link-format listing of the four above.

Besides serving, it lets a test look inside: how many observations a resource currently has
(`observer_count`, and `wait_observers` to await a number without polling), how many were ever
registered (`registrations`) and how many requests reached each path (`requests_seen`).

Only the ``udp6`` transport is started: aiocoap's default server transports would also open
``tcpserver`` and ``ws`` listeners on fixed ports on all interfaces, so a second instance in the
same test run would collide with the first.

Notifications of the sensors are NON: a sensor that changes every 50 ms would otherwise queue
CON notifications without bound behind a slow client (aiocoap keeps one CON in flight per peer,
NSTART=1, and backlogs the rest). Every `confirm_every` seconds one notification per
observation is sent CON instead (RFC 7641 section 4.5). That is what lets a client that merely
forgot an observation, as aiocoap's client does on ``observation.cancel()``, end it at the
server: a NON notification for an unknown token is silently dropped by aiocoap's client, but an
unknown CON notification is answered with a RST, and aiocoap's server ends the observation on
that RST. LED notifications are rare state changes and are always CON.

aiocoap's server also ends an observation when the client re-sends the GET with Observe=1 on
the same token (RFC 7641 section 3.6; aiocoap's own client cannot, it never reuses a token), and
when sending to the client draws an ICMP error, as it does on loopback once the client's
socket is closed.
"""

from __future__ import annotations

import abc
import asyncio
import collections
import json
import logging
import math
import random
from collections.abc import Callable
from types import TracebackType
from typing import Any, Final

import aiocoap
import cbor2
from aiocoap import error, resource

__all__ = ["SimulatedSensors", "run_sensors"]

log = logging.getLogger(__name__)

CF_TEXT: Final = 0
CF_OCTETS: Final = 42
CF_JSON: Final = 50
CF_CBOR: Final = 60
CF_SENML_JSON: Final = 110

TEMPERATURE_CENTRE: Final = 21.0
HUMIDITY_CENTRE: Final = 45.0
SENML_BASE_NAME: Final = "urn:dev:sim:humidity:"
DEFAULT_CONFIRM_EVERY: Final = 2.0

# aiocoap is untyped here (no py.typed), so its messages are `Any` to mypy; the alias only
# documents intent.
Message = Any


def _normalize_path(path: str) -> str:
    """'/temperature', 'temperature' and 'temperature/' all name the same resource."""
    return "/" + path.strip("/")


class _CountingSite(resource.Site):  # type: ignore[misc]  # aiocoap is untyped
    """The root site, counting every incoming request per path before dispatching it.

    Counting here rather than in the resources' render methods matters: those methods are also
    called to produce each observe notification, and unknown paths never reach a resource.
    """

    def __init__(self, seen: collections.Counter[str]) -> None:
        super().__init__()
        self._seen = seen

    async def render_to_pipe(self, request: Any) -> None:
        # `request` is an aiocoap Pipe; its request message still carries the full Uri-Path.
        self._seen["/" + "/".join(request.request.opt.uri_path)] += 1
        await super().render_to_pipe(request)


class _WellKnownCore(resource.WKCResource):  # type: ignore[misc]  # aiocoap is untyped
    """/.well-known/core that does not list itself (RFC 6690 discovery describes the others)."""

    def get_link_description(self) -> None:
        return None


class _StatusResource(resource.Resource):  # type: ignore[misc]  # aiocoap is untyped
    ct = str(CF_TEXT)
    rt = "status"
    if_ = "core.rp"

    def __init__(self, uptime: Callable[[], float]) -> None:
        super().__init__()
        self._uptime = uptime

    async def render_get(self, request: Message) -> Message:
        text = f"ok uptime={int(self._uptime())}s"
        return aiocoap.Message(payload=text.encode("utf-8"), content_format=CF_TEXT)


class _ObservedResource(resource.ObservableResource):  # type: ignore[misc]  # aiocoap untyped
    """An observable resource that counts its observations and picks CON/NON per notification.

    `confirm_every` is the minimum time between two CON notifications of one observation; 0
    makes every notification CON, None makes them all NON.
    """

    def __init__(self, on_count_change: Callable[[], None], confirm_every: float | None) -> None:
        super().__init__()
        self.observer_count = 0
        self.registrations = 0
        self._on_count_change = on_count_change
        self._confirm_every = confirm_every
        # id(observe request) -> loop time of the last CON sent for that observation. aiocoap
        # renders every notification of an observation from the same request object, and the
        # entry is dropped when the observation ends, so an id is never reused while present.
        self._last_confirmable: dict[int, float] = {}

    async def add_observation(self, request: Message, serverobservation: Any) -> None:
        # Replaces the base implementation (same behaviour) so that the per-observation CON
        # bookkeeping is cleaned up in the same callback that ends the observation.
        key = id(request)
        self._observations.add(serverobservation)
        # The first response rides on the ACK of the (usually CON) request, so it counts as a
        # confirmed one.
        self._last_confirmable[key] = asyncio.get_running_loop().time()
        self.registrations += 1

        def cancelled() -> None:
            self._observations.discard(serverobservation)
            self._last_confirmable.pop(key, None)
            self.update_observation_count(len(self._observations))

        serverobservation.accept(cancelled)
        self.update_observation_count(len(self._observations))

    def update_observation_count(self, newcount: int) -> None:
        self.observer_count = newcount
        self._on_count_change()

    def _transport_tuning(self, request: Message) -> Any:
        """The TransportTuning for a response to `request`.

        Plain (non-observe) requests get None, which lets aiocoap answer in kind (piggybacked
        on the ACK of a CON). Note that this must be an instance: TransportTuning exposes
        derived values such as EXCHANGE_LIFETIME as properties, which a bare class would not
        evaluate.
        """
        key = id(request)
        last = self._last_confirmable.get(key)
        if last is None:
            return None
        now = asyncio.get_running_loop().time()
        if self._confirm_every is not None and now - last >= self._confirm_every:
            self._last_confirmable[key] = now
            return aiocoap.Reliable()
        return aiocoap.Unreliable()


class _ValueResource(_ObservedResource):
    """An observable sensor reading: `set()` stores a new value and notifies observers."""

    content_format: int

    def __init__(
        self, value: Any, on_count_change: Callable[[], None], confirm_every: float | None
    ) -> None:
        super().__init__(on_count_change, confirm_every)
        self.value = value

    def set(self, value: Any) -> None:
        self.value = value
        self.updated_state()

    @abc.abstractmethod
    def encode(self) -> bytes:
        """The current value as the resource's content-format."""

    async def render_get(self, request: Message) -> Message:
        return aiocoap.Message(
            payload=self.encode(),
            content_format=self.content_format,
            transport_tuning=self._transport_tuning(request),
        )


class _TemperatureResource(_ValueResource):
    content_format = CF_CBOR
    ct = str(CF_CBOR)
    rt = "temperature-c"
    if_ = "sensor"

    def encode(self) -> bytes:
        return bytes(cbor2.dumps(self.value))


class _HumidityResource(_ValueResource):
    content_format = CF_SENML_JSON
    ct = str(CF_SENML_JSON)
    rt = "humidity-rh"
    if_ = "sensor"

    def encode(self) -> bytes:
        record = {"bn": SENML_BASE_NAME, "n": "rh", "u": "%RH", "v": self.value}
        return json.dumps([record], separators=(",", ":")).encode("utf-8")


def _decode_led_body(content_format: int | None, payload: bytes) -> bool:
    """The `on` value of a PUT /led body; raises the aiocoap error that becomes the response."""
    if content_format == CF_CBOR:
        try:
            body = cbor2.loads(payload)
        except (cbor2.CBORDecodeError, ValueError) as exc:
            raise error.BadRequest(f"body is not valid CBOR: {exc}") from None
    elif content_format == CF_JSON:
        try:
            body = json.loads(payload.decode("utf-8"))
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are both ValueErrors
            raise error.BadRequest(f"body is not valid JSON: {exc}") from None
    else:
        raise error.UnsupportedContentFormat(
            f"PUT /led takes content-format {CF_CBOR} (CBOR) or {CF_JSON} (JSON),"
            f" not {content_format}"
        )
    if not isinstance(body, dict) or set(body) != {"on"}:
        raise error.BadRequest('body must be a map with exactly one key, "on"')
    on = body["on"]
    # bool only: 0/1 are not accepted, so a gateway that loses the type is caught.
    if not isinstance(on, bool):
        raise error.BadRequest(f'"on" must be a boolean, not {type(on).__name__}')
    return on


class _LedResource(_ObservedResource):
    ct = str(CF_CBOR)
    rt = "light-switch"
    if_ = "actuator"

    def __init__(self, on_count_change: Callable[[], None]) -> None:
        # A state change is rare and is the one thing an observer must not miss: always CON.
        super().__init__(on_count_change, confirm_every=0.0)
        self.on = False

    def set(self, on: bool) -> None:
        # RFC 7641 notifies on state changes; a PUT that repeats the state changes nothing.
        if on != self.on:
            self.on = on
            self.updated_state()

    async def render_get(self, request: Message) -> Message:
        return aiocoap.Message(
            payload=cbor2.dumps({"on": self.on}),
            content_format=CF_CBOR,
            transport_tuning=self._transport_tuning(request),
        )

    async def render_put(self, request: Message) -> Message:
        cf = request.opt.content_format
        self.set(_decode_led_body(None if cf is None else int(cf), request.payload))
        return aiocoap.Message(code=aiocoap.CHANGED)


class _BlobResource(_ValueResource):
    """Opaque bytes of a size the tests choose: load and slow-consumer tests use it to move
    many bytes per notification."""

    content_format = CF_OCTETS
    ct = str(CF_OCTETS)
    rt = "blob"
    if_ = "sensor"

    def encode(self) -> bytes:
        return bytes(self.value)


class SimulatedSensors:
    """A CoAP server with simulated temperature and humidity sensors, a status and an LED.

    Use as ``async with SimulatedSensors(interval=0.05) as sensors:`` (or start()/stop()).
    `interval` is how often temperature and humidity change; `seed` makes the random walks
    reproducible; `confirm_every` is the minimum time between CON notifications of one sensor
    observation (None: NON only, so a client's silent cancellation never reaches us).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        interval: float = 1.0,
        seed: int | None = None,
        confirm_every: float | None = DEFAULT_CONFIRM_EVERY,
    ) -> None:
        if not (interval > 0 and math.isfinite(interval)):
            raise ValueError(f"interval must be a positive number of seconds, not {interval!r}")
        if confirm_every is not None and not confirm_every >= 0:
            raise ValueError(f"confirm_every must be >= 0 seconds or None, not {confirm_every!r}")
        self.host = host
        self.interval = interval
        self._requested_port = port
        self._rng = random.Random(seed)
        self._context: Any = None
        self._port: int | None = None
        self._started_at: float | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Replaced by a fresh Event on every observer count change after setting the old one,
        # so every waiter wakes exactly for the changes that happen after it looked.
        self._observers_changed = asyncio.Event()

        #: Requests received per path ("/temperature"), any method, unknown paths included. An
        #: observation counts once: its notifications are responses, not requests.
        self.requests_seen: collections.Counter[str] = collections.Counter()

        self._temperature = _TemperatureResource(
            round(TEMPERATURE_CENTRE + self._rng.uniform(-0.5, 0.5), 2),
            self._observer_count_changed,
            confirm_every,
        )
        self._humidity = _HumidityResource(
            round(HUMIDITY_CENTRE + self._rng.uniform(-2.0, 2.0), 2),
            self._observer_count_changed,
            confirm_every,
        )
        self._led = _LedResource(self._observer_count_changed)
        self._blob = _BlobResource(b"\x00" * 16, self._observer_count_changed, confirm_every)
        self._observable: dict[str, _ObservedResource] = {
            "/temperature": self._temperature,
            "/humidity": self._humidity,
            "/led": self._led,
            "/blob": self._blob,
        }

        self._site = _CountingSite(self.requests_seen)
        self._site.add_resource(["temperature"], self._temperature)
        self._site.add_resource(["humidity"], self._humidity)
        self._site.add_resource(["status"], _StatusResource(self._uptime))
        self._site.add_resource(["led"], self._led)
        self._site.add_resource(["blob"], self._blob)
        self._site.add_resource(
            [".well-known", "core"],
            _WellKnownCore(self._site.get_resources_as_linkheader, impl_info=None),
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Bind the UDP socket and start the random walks."""
        if self._context is not None:
            raise RuntimeError("SimulatedSensors already started")
        context = await aiocoap.Context.create_server_context(
            self._site,
            bind=(self.host, self._requested_port),
            transports=["udp6"],
            loggername=f"{__name__}.coap",
        )
        try:
            self._port = _bound_port(context)
        except BaseException:
            await context.shutdown()
            raise
        self._context = context
        self._started_at = asyncio.get_running_loop().time()
        task = asyncio.create_task(self._walk(), name=f"sim-sensors-walk:{self._port}")
        self._tasks.add(task)
        log.info("simulated sensors listening on %s", self.base_uri)

    async def stop(self) -> None:
        """Cancel the random walks and shut the server down (ending all observations)."""
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        context, self._context = self._context, None
        if context is not None:
            await context.shutdown()
            log.info("simulated sensors on port %s stopped", self._port)

    async def __aenter__(self) -> SimulatedSensors:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- addressing --------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The port actually bound (the OS's choice when constructed with port 0)."""
        if self._port is None:
            raise RuntimeError("SimulatedSensors not started")
        return self._port

    @property
    def base_uri(self) -> str:
        """``coap://HOST:PORT`` with an IPv6 literal host in brackets."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"coap://{host}:{self.port}"

    # -- self-registration (RFC 9176) -------------------------------------------------------

    def register_at(self, rd: str, ep: str, lt: int = 90_000) -> Any:
        """Register these sensors at the Resource Directory `rd` (``coap://host:port``) from
        their own socket, so that the directory sees their address as the source, with
        aiocoap's own RD client. It finds the registration interface through the
        directory's /.well-known/core, renews before `lt` runs out, and removes the
        registration on ``await registerer.shutdown()``."""
        from aiocoap.resourcedirectory.client.register import Registerer

        if self._context is None:
            raise RuntimeError("SimulatedSensors not started")
        return Registerer(
            self._context, rd=rd, lt=lt, registration_parameters={"ep": ep},
            loggername=f"{__name__}.rd",
        )

    async def request(self, message: Message) -> Message:
        """Send a request from the sensors' own socket (as a sensor talks to a directory)."""
        if self._context is None:
            raise RuntimeError("SimulatedSensors not started")
        response: Message = await self._context.request(message).response
        return response

    # -- observation introspection -----------------------------------------------------------

    def _observed(self, path: str) -> _ObservedResource:
        try:
            return self._observable[_normalize_path(path)]
        except KeyError:
            raise KeyError(
                f"{path!r} is not an observable resource (one of {sorted(self._observable)})"
            ) from None

    def observer_count(self, path: str) -> int:
        """How many observations `path` (e.g. "/temperature") currently has."""
        return self._observed(path).observer_count

    def registrations(self, path: str) -> int:
        """How many observe registrations `path` has accepted since construction."""
        return self._observed(path).registrations

    # The timeout parameter is part of the API on purpose: tests read better with it than
    # with an asyncio.timeout block around every wait.
    async def wait_observers(
        self,
        path: str,
        count: int,
        timeout: float = 5.0,
    ) -> None:
        """Wait until `path` has exactly `count` observations; TimeoutError after `timeout`."""
        res = self._observed(path)
        try:
            async with asyncio.timeout(timeout):
                while res.observer_count != count:
                    await self._observers_changed.wait()
        except TimeoutError:
            raise TimeoutError(
                f"{path} still has {res.observer_count} observers after {timeout}s,"
                f" expected {count}"
            ) from None

    def _observer_count_changed(self) -> None:
        changed, self._observers_changed = self._observers_changed, asyncio.Event()
        changed.set()

    # -- state -------------------------------------------------------------------------------

    @property
    def temperature(self) -> float:
        return float(self._temperature.value)

    @property
    def humidity(self) -> float:
        return float(self._humidity.value)

    @property
    def led_on(self) -> bool:
        return self._led.on

    def set_temperature(self, value: float) -> None:
        """Set the temperature (as given, not rounded) and notify its observers now."""
        self._temperature.set(float(value))

    def set_humidity(self, value: float) -> None:
        """Set the relative humidity and notify its observers now."""
        self._humidity.set(float(value))

    def set_blob(self, data: bytes) -> None:
        """Set /blob's bytes (at most 1024, one CoAP block) and notify its observers now."""
        if len(data) > 1024:
            raise ValueError("a /blob value is at most 1024 bytes (one block)")
        self._blob.set(data)

    def set_led(self, on: bool) -> None:
        """Switch the LED as a PUT would (observers are notified if the state changes)."""
        self._led.set(on)

    def _uptime(self) -> float:
        if self._started_at is None:
            return 0.0
        return asyncio.get_running_loop().time() - self._started_at

    async def _walk(self) -> None:
        """Move temperature and humidity every `interval` seconds, forever."""
        while True:
            await asyncio.sleep(self.interval)
            self._temperature.set(self._step(self.temperature, TEMPERATURE_CENTRE, 0.2, -40, 85))
            self._humidity.set(self._step(self.humidity, HUMIDITY_CENTRE, 0.5, 0, 100))

    def _step(self, value: float, centre: float, spread: float, low: float, high: float) -> float:
        """One random-walk step that drifts back to `centre` and always changes the value.

        Always changing keeps each tick a real change for observers (and makes "two different
        notifications" a safe thing for tests to wait for).
        """
        new = value + 0.1 * (centre - value) + self._rng.uniform(-spread, spread)
        new = round(min(max(new, low), high), 2)
        if new == value:
            new = round(value + (0.01 if value < centre else -0.01), 2)
        return new


def _bound_port(context: Any) -> int:
    """The local port of the context's udp6 socket.

    aiocoap does not expose it; the chain is Context.request_interfaces[i] (TokenManager)
    .token_interface (MessageManager) .message_interface (MessageInterfaceUDP6) .transport,
    whose extra info "socket" is the bound socket. The server transport bind()s explicitly, so
    the OS's choice for port 0 is already known here.
    """
    for token_manager in context.request_interfaces:
        message_manager = getattr(token_manager, "token_interface", None)
        message_interface = getattr(message_manager, "message_interface", None)
        transport = getattr(message_interface, "transport", None)
        sock = transport.get_extra_info("socket") if transport is not None else None
        if sock is not None:
            port = sock.getsockname()[1]
            if isinstance(port, int) and port != 0:
                return port
    raise RuntimeError("could not find the bound udp6 socket of the aiocoap context")


async def run_sensors(
    host: str,
    port: int,
    interval: float = 1.0,
    *,
    on_started: Callable[[str], None] | None = None,
) -> None:
    """Serve simulated sensors until cancelled.

    `on_started` is called with the base URI once bound (useful with port 0, where the caller
    cannot know the port in advance). Nothing is printed here; progress goes to logging.
    """
    async with SimulatedSensors(host, port, interval=interval) as sensors:
        if on_started is not None:
            on_started(sensors.base_uri)
        await asyncio.Event().wait()  # never set: runs until the caller cancels us
