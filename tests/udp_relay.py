"""A UDP relay for fault-injection tests, placed between the gateway and a sensor.

::

    client ──▶ relay.port ──"up": drop / duplicate / reorder / delay──▶ target (a sensor)
    client ◀── relay.port ◀─"down": the same, configured separately─── target

The client (the gateway) talks to the relay's port as if it were the sensor. The relay sends
everything on to the target from a socket of its own and sends what comes back to the client
it heard from last (one client at a time: the gateway has a single CoAP socket). Faults are set
per direction (`relay.up.faults`, `relay.down.faults`) and can change at any time:

- ``drop``: the share of datagrams dropped;
- ``duplicate``: the share sent twice;
- ``reorder``: the share held back and sent right after the next datagram in that direction
  (or after `hold_timeout` if no next one comes);
- ``delay``: seconds every datagram waits (order is kept);
- `blackhole()`: nothing passes either way until `lift()`, or for `seconds`.

Every random decision comes from one `random.Random(seed)` per direction, drawing the same
three numbers for every datagram whatever the settings, so a seed gives the same pattern of
faults for the same sequence of datagrams. ICMP errors from a target that is down are
swallowed, as they would be by a router in between.

Counters per direction (`relay.up.counters`) say what happened; `wait_for()` waits for a
condition on them (checked after every datagram) without sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Address = tuple[Any, ...]


@dataclass
class Faults:
    drop: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    delay: float = 0.0


@dataclass
class Counters:
    received: int = 0
    """Datagrams that arrived at the relay in this direction."""
    sent: int = 0
    """Datagrams sent on (duplicates count twice)."""
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    """Datagrams held back and sent after a later one."""
    blackholed: int = 0


@dataclass(eq=False)
class Direction:
    name: str
    rng: random.Random
    faults: Faults = field(default_factory=Faults)
    counters: Counters = field(default_factory=Counters)
    held: bytes | None = None
    hold_timer: asyncio.TimerHandle | None = None
    line: collections.deque[tuple[float, bytes]] = field(default_factory=collections.deque)
    """The delay line: (due time, datagram), oldest first."""
    line_timer: asyncio.TimerHandle | None = None


class _Front(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.relay._client = addr
        self.relay._arrived(self.relay.up, data)

    def error_received(self, exc: Exception) -> None:
        pass  # the client went away; nothing to tell anyone


class _Back(asyncio.DatagramProtocol):
    def __init__(self, relay: UdpRelay) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.relay._arrived(self.relay.down, data)

    def error_received(self, exc: Exception) -> None:
        pass  # ICMP port unreachable from a target that is down: swallowed, like a router


class UdpRelay:
    """``async with UdpRelay(("127.0.0.1", sensor_port), seed=1) as relay:`` ..."""

    def __init__(
        self, target: tuple[str, int], *, seed: int = 0, hold_timeout: float = 0.5
    ) -> None:
        self.target = target
        self.hold_timeout = hold_timeout
        self.up = Direction("up", random.Random(f"{seed}/up"))
        self.down = Direction("down", random.Random(f"{seed}/down"))
        self._front: asyncio.DatagramTransport | None = None
        self._back: asyncio.DatagramTransport | None = None
        self._client: Address | None = None
        self._blackholed = False
        self._lift_timer: asyncio.TimerHandle | None = None
        self._changed = asyncio.Event()

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self._front, _ = await loop.create_datagram_endpoint(
            lambda: _Front(self), local_addr=(host, port)
        )
        self._back, _ = await loop.create_datagram_endpoint(
            lambda: _Back(self), remote_addr=self.target
        )

    async def stop(self) -> None:
        for direction in (self.up, self.down):
            for timer in (direction.hold_timer, direction.line_timer):
                if timer is not None:
                    timer.cancel()
            direction.line.clear()
            direction.held = None
        if self._lift_timer is not None:
            self._lift_timer.cancel()
        for transport in (self._front, self._back):
            if transport is not None:
                transport.close()
        self._front = self._back = None

    async def __aenter__(self) -> UdpRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._front is None:
            raise RuntimeError("relay not started")
        port: int = self._front.get_extra_info("sockname")[1]
        return port

    @property
    def base_uri(self) -> str:
        return f"coap://127.0.0.1:{self.port}"

    # -- control -----------------------------------------------------------------------------

    def blackhole(self, seconds: float | None = None) -> None:
        """Drop everything, both ways, until `lift()` (or for `seconds`)."""
        self._blackholed = True
        if self._lift_timer is not None:
            self._lift_timer.cancel()
            self._lift_timer = None
        if seconds is not None:
            self._lift_timer = asyncio.get_running_loop().call_later(seconds, self.lift)
        self._notify()

    def lift(self) -> None:
        self._blackholed = False
        self._lift_timer = None
        self._notify()

    @property
    def blackholed(self) -> bool:
        return self._blackholed

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until `predicate()` is true; it is checked after every datagram and change."""
        async with asyncio.timeout(timeout):
            while not predicate():
                changed = self._changed
                await changed.wait()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- the data path -----------------------------------------------------------------------

    def _arrived(self, direction: Direction, data: bytes) -> None:
        counters, faults = direction.counters, direction.faults
        counters.received += 1
        # Always the same three draws per datagram, so the pattern depends on the seed only.
        drop, duplicate, reorder = (direction.rng.random() for _ in range(3))
        try:
            if self._blackholed:
                counters.blackholed += 1
            elif drop < faults.drop:
                counters.dropped += 1
            elif direction.held is None and reorder < faults.reorder:
                counters.reordered += 1
                direction.held = data
                direction.hold_timer = asyncio.get_running_loop().call_later(
                    self.hold_timeout, self._release, direction
                )
                return
            else:
                self._emit(direction, data)
                if duplicate < faults.duplicate:
                    counters.duplicated += 1
                    self._emit(direction, data)
            self._release(direction)
        finally:
            self._notify()

    def _release(self, direction: Direction) -> None:
        """Send the held datagram, if any (after the one that came after it)."""
        held, direction.held = direction.held, None
        if direction.hold_timer is not None:
            direction.hold_timer.cancel()
            direction.hold_timer = None
        if held is not None:
            self._emit(direction, held)

    def _emit(self, direction: Direction, data: bytes) -> None:
        delay = direction.faults.delay
        if delay <= 0 and not direction.line:
            self._send(direction, data)
            return
        loop = asyncio.get_running_loop()
        direction.line.append((loop.time() + max(delay, 0.0), data))
        if direction.line_timer is None:
            direction.line_timer = loop.call_at(direction.line[0][0], self._drain, direction)

    def _drain(self, direction: Direction) -> None:
        loop = asyncio.get_running_loop()
        direction.line_timer = None
        while direction.line and direction.line[0][0] <= loop.time():
            self._send(direction, direction.line.popleft()[1])
        if direction.line:
            direction.line_timer = loop.call_at(direction.line[0][0], self._drain, direction)

    def _send(self, direction: Direction, data: bytes) -> None:
        if self._blackholed:  # in flight when the blackhole began: lost too
            direction.counters.blackholed += 1
            return
        if direction is self.up:
            if self._back is None:
                return
            self._back.sendto(data)
        else:
            if self._front is None or self._client is None:
                return
            self._front.sendto(data, self._client)
        direction.counters.sent += 1
