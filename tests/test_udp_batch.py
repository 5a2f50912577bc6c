"""Batched UDP reads: a backlog of notifications reaches clients as its newest value."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import aiocoap
import cbor2
import pytest
from aiocoap.numbers.codes import Code
from aiocoap.numbers.types import Type

from translator.coap import batch as udp_batch
from translator.coap.batch import BATCH, COALESCE_ABOVE, MAX_WAIT, _BatchReader

from .conftest import WAIT


class RawSensor:
    """One observable resource on a plain UDP socket, so the test decides when every
    notification is sent (aiocoap's own server would pace and coalesce them)."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.token = b""
        self.peer: Any = None
        self.observe = 0

    async def accept_registration(self) -> None:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(WAIT):
            while True:
                data, self.peer = await loop.sock_recvfrom(self.sock, 2048)
                request = aiocoap.Message.decode(data)
                if request.opt.observe == 0:
                    break
        self.token = request.token
        self.send(0, mtype=Type.ACK, mid=request.mid)

    def send(self, value: int, *, mtype: Type = Type.NON, mid: int | None = None) -> None:
        self.observe += 1
        message = aiocoap.Message(
            code=Code.CONTENT, payload=cbor2.dumps(value), content_format=60,
            observe=self.observe,
        )
        message.mtype = mtype
        message.mid = mid if mid is not None else 1000 + self.observe
        message.token = self.token
        self.sock.sendto(message.encode(), self.peer)

    def close(self) -> None:
        self.sock.close()


async def test_a_backlog_reaches_clients_as_its_newest_value(
    make_gateway: Any, make_client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    sensor = RawSensor()
    try:
        uri = f"coap://127.0.0.1:{sensor.port}/burst"
        gateway = await make_gateway({"server": {"port": 0}, "policy": {"allow": [uri]}})
        client = await make_client(gateway.url)
        sub = (await client.subscribe(uri=uri))["sub"]
        await sensor.accept_registration()
        first = await client.next_notify(sub)
        assert first["value"] == 0

        # 200 notifications land in the gateway's socket before its loop runs again.
        for value in range(1, 201):
            sensor.send(value)
        await client.wait_for(lambda f: f.get("value") == 200)
        forwarded = [f for f in client.seen if f["type"] == "notify"]
        # Read in batches, a backlog beyond COALESCE_ABOVE collapses to the newest of each
        # batch (only its last few, once the backlog is small, go one by one); read one by
        # one, every notification would be forwarded. Never old after new.
        values = [f["value"] for f in forwarded]
        assert len(values) <= 1 + 200 // BATCH + COALESCE_ABOVE, values
        assert values == sorted(values) and values[-1] == 200

        # A small backlog (a loop turn's hiccup) is not "behind": all of it is forwarded.
        # (The time rule is set aside here: a stall of this test process longer than
        # MAX_WAIT would rightly count as behind.)
        monkeypatch.setattr(udp_batch, "MAX_WAIT", 60.0)
        for value in range(1000, 1010):
            sensor.send(value)
        for value in range(1000, 1010):
            assert (await client.next_notify(sub))["value"] == value

        # Once caught up, every notification is forwarded again.
        for value in (201, 202, 203):
            sensor.send(value)
            assert (await client.next_notify(sub))["value"] == value
    finally:
        sensor.close()


def raw(mtype: Type, token: bytes, code: Code = Code.CONTENT, observe: int = 1) -> bytes:
    message = aiocoap.Message(code=code, payload=b"x", observe=observe)
    message.mtype, message.mid, message.token = mtype, observe, token
    return bytes(message.encode())


class _Everything:
    """Every (token, address) is an open request: the guard lets every response through."""

    def __contains__(self, key: object) -> bool:
        return True


class _Recorder:
    """Stands in for aiocoap's side of the socket (compat.UdpStack): records what it is
    handed, and takes every response as expected."""

    def __init__(self) -> None:
        self.handed: list[int] = []
        self.senders: list[Any] = []

    def release_reading(self, loop: Any) -> None:
        pass

    def take_sending(self, send: Any) -> None:
        pass

    def endpoint(self, address: Any, pktinfo: bytes | None) -> Any:
        return (address, pktinfo)

    def open_requests(self) -> Any:
        return _Everything()

    def deliver(self, data: bytes, remote: Any) -> None:
        self.handed.append(aiocoap.Message.decode(data).opt.observe)
        self.senders.append(remote)

    def fail(self, exc: Exception, remote: Any) -> None:
        raise AssertionError(exc)


class _Turns:
    """Stands in for the event loop: a clock the test sets, and the callbacks a loop turn
    would run next, run when the test says the turn is over."""

    def __init__(self) -> None:
        self.now = 0.0
        self.soon: list[Any] = []

    def time(self) -> float:
        return self.now

    def call_soon(self, callback: Any) -> None:
        self.soon.append(callback)

    def next_turn(self) -> None:
        soon, self.soon = self.soon, []
        for callback in soon:
            callback()

    def add_reader(self, *args: Any) -> None:
        pass

    def remove_reader(self, *args: Any) -> None:
        pass


class _Rig:
    """A `_BatchReader` on a real UDP socket, with the stand-ins above, and two senders."""

    def __init__(self) -> None:
        self.receiver = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.receiver.bind(("127.0.0.1", 0))
        self.receiver.setblocking(False)
        self.senders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
        self.recorder, self.turns = _Recorder(), _Turns()
        self.reader = _BatchReader(self.recorder, self.receiver, 4096, BATCH)
        self.reader.loop = self.turns  # type: ignore[assignment]
        self.reader.reading = True

    def send(self, token: bytes, *numbers: int, sender: int = 0) -> None:
        for number in numbers:
            self.senders[sender].sendto(
                raw(Type.NON, token, observe=number), self.receiver.getsockname()
            )

    def arrive(self, token: bytes, *numbers: int, sender: int = 0) -> None:
        """Send, then the socket's readiness callback, as the loop would run it."""
        self.send(token, *numbers, sender=sender)
        self.reader._readable()

    def close(self) -> None:
        for sock in (self.receiver, *self.senders):
            sock.close()


@pytest.fixture
async def rig() -> AsyncIterator[_Rig]:  # async: the reader takes the running loop
    made = _Rig()
    try:
        yield made
    finally:
        made.close()


@pytest.mark.parametrize("turn", [MAX_WAIT / 2, MAX_WAIT * 2])
async def test_a_notification_waiting_longer_than_max_wait_gives_way_to_a_newer_one(
    rig: _Rig, turn: float,
) -> None:
    token, handed = b"\x01\x02", rig.recorder.handed
    rig.arrive(token, 1)
    assert handed == [1]  # in the same loop turn, not the next
    rig.arrive(token, 2, 3)
    assert handed == [1, 2]  # one per observation per turn: 3 waits
    rig.turns.now += turn  # a long turn (a fan-out to many clients), then 4 arrives
    rig.arrive(token, 4)
    rig.turns.next_turn()
    rig.turns.next_turn()
    if turn > MAX_WAIT:
        assert handed == [1, 2, 4]  # behind: 3 was superseded unread
    else:
        assert handed == [1, 2, 3, 4]  # a short wait is not behind


async def test_messages_of_one_sender_share_its_address(
    rig: _Rig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aiocoap keeps every observation's first response, and each holds its sender's
    address: one copy per sender, not per message (and a bounded table of them)."""
    monkeypatch.setattr(udp_batch, "MAX_SENDERS", 1)
    for number, sender in enumerate((0, 0, 1), 1):
        # another observation each time: all are handed on
        rig.arrive(bytes([number]), number, sender=sender)
    assert rig.recorder.handed == [1, 2, 3]
    first, second, third = rig.recorder.senders
    assert first == second and first is second
    assert third != first
    assert len(rig.reader.senders) == 1


async def test_a_queued_notification_gives_way_to_one_still_in_the_socket(rig: _Rig) -> None:
    """The turn after a long one starts with the callbacks it queued, before the loop looks
    at the socket again: the queued hand-on reads the socket first, so a notification that
    arrived meanwhile supersedes the one that waited, instead of going out a turn later."""
    token = b"\x03"
    rig.arrive(token, 1, 2)
    assert rig.recorder.handed == [1]  # 2 waits for the next turn
    rig.turns.now += MAX_WAIT * 2  # a long turn (a fan-out), during which 3 arrives
    rig.send(token, 3)
    rig.turns.next_turn()  # the queued hand-on, before the loop polls the socket
    assert rig.recorder.handed == [1, 3]


async def test_behind_a_non_notification_gives_way_only_to_a_newer_one_of_its_sender_and_token(
    rig: _Rig,
) -> None:
    receiver = rig.receiver.getsockname()
    a, b = rig.senders

    def send(sender: socket.socket, message: bytes) -> None:
        sender.sendto(message, receiver)

    # Enough CON notifications of other observations queued to count as behind.
    for number in range(COALESCE_ABOVE + 1):
        send(a, raw(Type.CON, bytes([0x10, number]), observe=1000 + number))
    send(a, raw(Type.NON, b"t1", observe=1))   # moot: t1 from a comes again
    send(b, raw(Type.NON, b"t1", observe=2))   # another sensor, same token: kept
    send(a, raw(Type.CON, b"t1", observe=3))   # CON: must be acknowledged, kept
    send(a, raw(Type.NON, b"t2", code=Code.NOT_FOUND, observe=4))  # an error, kept
    send(a, raw(Type.NON, b"t1", observe=5))   # the newest of t1 from a
    rig.reader._read()
    for _ in range(10):
        rig.reader._hand_on(read=False)
    handed = [n for n in rig.recorder.handed if n < 1000]
    assert handed == [2, 3, 4, 5]
