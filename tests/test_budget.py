"""The budget's arithmetic, the accept() backoff, and the log limiter's doors (issue 18).

The gateway as a process under a lowered limit is tests/test_limits.py; here are the parts
in this process: a listening socket whose accept() always fails for want of descriptors, a
flood of log records through the handler's filter and through asyncio's exception handler,
and a UDP receive buffer that overflows.
"""

from __future__ import annotations

import asyncio
import errno
import io
import logging
import socket
from typing import Any

import pytest

from translator import compat
from translator.budget import (
    HANDSHAKE_HEADROOM,
    LOOKUP_SOCKETS,
    SAFETY_MARGIN,
    client_budget,
    open_descriptors,
)
from translator.coap.batch import KERNEL_DROPS, readers_of
from translator.coap.buffers import DropWatch, kernel_drops, size_receive_buffer
from translator.logs import (
    FIRST,
    INTERVAL,
    RepeatFilter,
    RepeatLimiter,
    limit_every_record,
    limit_loop_exceptions,
)

from .conftest import WAIT, gateway_config


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- the budget ----------------------------------------------------------------------------


def test_the_budget_is_the_limit_less_what_is_open_and_the_reserves() -> None:
    budget = client_budget(1024, 10_000, open_now=8, lookup_workers=6)
    assert budget.reserve == 8 + 6 * LOOKUP_SOCKETS + HANDSHAKE_HEADROOM + SAFETY_MARGIN
    assert budget.allowed == 1024 - budget.reserve
    assert budget.clients == budget.allowed and budget.limited_by_files
    assert budget.sockets == budget.allowed + HANDSHAKE_HEADROOM
    text = budget.describe()
    assert f"at most {budget.allowed}, not [limits] max_connections = 10000" in text
    assert f"raise it to {10_000 + budget.reserve}" in text and "LimitNOFILE=" in text


def test_features_add_to_the_reserve_and_a_large_limit_keeps_more_headroom() -> None:
    plain = client_budget(100_000, 10_000, open_now=8, lookup_workers=6)
    assert plain.headroom == 100_000 // 50  # 2 %: a burst scales with the clients
    protected = client_budget(100_000, 10_000, open_now=8, lookup_workers=6, dtls_sensors=3,
                              oscore_contexts=2, dtls_possible=True)
    assert protected.reserve - plain.reserve == 3 + 2 + 16
    assert plain.clients == 10_000 and not plain.limited_by_files
    assert "at most 10000 ([limits] max_connections" in plain.describe()


def test_a_limit_below_the_reserve_still_admits_one_client() -> None:
    assert client_budget(40, 100, open_now=30, lookup_workers=6).clients == 1


def test_open_descriptors_counts_this_process() -> None:
    before = open_descriptors()
    assert before is not None
    with socket.socket() as _, socket.socket() as _:
        assert open_descriptors() == before + 2


# --- accept() at the limit -----------------------------------------------------------------


class ExhaustedSocket(socket.socket):
    """A listening socket whose accept() fails as at the open-files limit."""

    accepts = 0

    def accept(self) -> tuple[socket.socket, Any]:
        ExhaustedSocket.accepts += 1
        raise OSError(errno.EMFILE, "Too many open files")


@pytest.mark.parametrize("backoff", [True, False])
async def test_a_failed_accept_ends_the_pass_and_is_reported_once(backoff: bool) -> None:
    """asyncio goes on accepting `backlog` times after a failure, reporting each (with a
    traceback) and scheduling a resume for each; with the backoff, one accept() fails and
    one report is made, per pause."""
    loop = asyncio.get_running_loop()
    reports: list[dict[str, Any]] = []
    reported = asyncio.Event()
    loop.set_exception_handler(lambda _, context: (reports.append(context), reported.set()))
    if backoff:
        assert compat.accept_backoff(loop)
    listener = ExhaustedSocket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(100)
    ExhaustedSocket.accepts = 0
    server = await loop.create_server(asyncio.Protocol, sock=listener, backlog=100)
    client = socket.create_connection(listener.getsockname())
    try:
        async with asyncio.timeout(WAIT):
            await reported.wait()
        await asyncio.sleep(0.1)  # the rest of the pass, if it goes on
        if backoff:
            assert ExhaustedSocket.accepts == 1 and len(reports) == 1
        else:
            assert ExhaustedSocket.accepts == 100 and len(reports) == 100
        assert reports[0]["message"] == "socket.accept() out of system resource"
    finally:
        client.close()
        server.close()
        loop.set_exception_handler(None)
        if backoff:
            del loop._accept_connection  # type: ignore[attr-defined]


async def test_a_gate_without_room_pauses_accepting_before_accept_is_called() -> None:
    loop = asyncio.get_running_loop()
    reports: list[dict[str, Any]] = []
    reported = asyncio.Event()
    loop.set_exception_handler(lambda _, context: (reports.append(context), reported.set()))
    compat.accept_backoff(loop)

    class Full:
        accepted_count = 0

        def no_room(self) -> str | None:
            return "no room"

        def accepted(self) -> None:
            self.accepted_count += 1

    server = await loop.create_server(asyncio.Protocol, "127.0.0.1", 0)
    (listening,) = server.sockets
    gate = Full()
    compat.gate_accepts(listening.fileno(), gate)
    client = socket.create_connection(listening.getsockname())
    try:
        async with asyncio.timeout(WAIT):
            await reported.wait()
        assert str(reports[0]["exception"]) == "[Errno 24] no room"
        assert gate.accepted_count == 0 and len(reports) == 1
    finally:
        compat.ungate_accepts(listening.fileno())
        client.close()
        server.close()
        loop.set_exception_handler(None)
        del loop._accept_connection  # type: ignore[attr-defined]


# --- the log limiter's doors ---------------------------------------------------------------


def _handler() -> tuple[logging.Logger, io.StringIO, RepeatFilter]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    repeat_filter = limit_every_record(handler)
    assert limit_every_record(handler) is repeat_filter  # installed once
    logger = logging.getLogger("test.flood")
    logger.propagate = False
    logger.handlers[:] = [handler]
    logger.setLevel(logging.DEBUG)
    return logger, stream, repeat_filter


def test_a_flood_of_one_template_through_the_handler_costs_a_few_lines_and_a_summary() -> None:
    logger, stream, repeat_filter = _handler()
    clock = Clock()
    repeat_filter.limited.clock = clock
    for number in range(10_000):
        logger.warning("%r: keepalive ping failed", f"<Connection #{number}>")
    logger.info("another line")  # another template: its own kind
    logger.debug("debug %d", 1)  # debug lines are asked for: never limited
    logger.debug("debug %d", 2)
    clock.now += INTERVAL
    logger.info("another line")  # the next record writes what is due first
    lines = stream.getvalue().splitlines()
    assert lines[:FIRST] == [f"'<Connection #{n}>': keepalive ping failed" for n in range(FIRST)]
    assert lines[FIRST:] == [
        "another line", "debug 1", "debug 2",
        f"test.flood: %r: keepalive ping failed: ...and {10_000 - FIRST} more in the last "
        f"{INTERVAL:g} s (10000 in all)",
        "another line",
    ]


def test_what_was_counted_is_said_at_the_end_before_its_interval_is_over() -> None:
    logger, stream, repeat_filter = _handler()
    for number in range(10):
        logger.error("bad frame %d", number)
    repeat_filter.close()  # the CLI does this at exit
    lines = stream.getvalue().splitlines()
    assert len(lines) == FIRST + 1
    assert lines[-1].startswith(f"test.flood: bad frame %d: ...and {10 - FIRST} more in the last")


def test_varying_text_cannot_grow_the_limiter_without_bound() -> None:
    limiter = RepeatLimiter(first=1, interval=1.0)
    for number in range(20_000):
        limiter.hit(f"message {number}", now=number * 0.01)
    assert len(limiter.totals) <= 4096 + 1


async def test_a_flood_of_loop_exceptions_costs_a_few_lines_and_an_explained_one_costs_one(
    caplog: pytest.LogCaptureFixture,
) -> None:
    loop = asyncio.get_running_loop()
    limit_loop_exceptions(loop, explained={"out of descriptors": lambda c: "explained"})
    try:
        with caplog.at_level(logging.INFO, logger="asyncio"):
            for _ in range(1000):
                loop.call_exception_handler({"message": "Task exception was never retrieved",
                                             "exception": ValueError("x")})
                loop.call_exception_handler({"message": "out of descriptors"})
        messages = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
        assert messages.count("Task exception was never retrieved") == FIRST
        assert messages.count("explained") == 1
        assert len(messages) == FIRST + 1
        # (exc_text: the redaction installed by other tests formats it early)
        tracebacks = [r for r in caplog.records if r.exc_info or r.exc_text]
        assert len(tracebacks) == FIRST
    finally:
        loop.set_exception_handler(None)


# --- the UDP receive buffer ----------------------------------------------------------------


def test_the_receive_buffer_granted_is_reported_and_drops_are_counted() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sock.bind(("127.0.0.1", 0))
        granted = size_receive_buffer(sock, 4096)
        assert granted == sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= 4096
        assert kernel_drops(sock) == 0
        for _ in range(1000):
            sender.sendto(b"x" * 100, sock.getsockname())
        drops = kernel_drops(sock)
        assert drops is not None and drops > 0


class SignallingWatch(DropWatch):
    """The reader's drop watch, which also says when the reader looked."""

    __slots__ = ("looked",)

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.looked = asyncio.Event()

    def new_drops(self, now: float) -> int:
        self.checked_at = float("-inf")  # look at the counter at every read
        self.looked.set()
        return super().new_drops(now)


async def test_kernel_drops_at_the_coap_socket_are_said_through_the_limiter(
    sensors: Any, make_gateway: Any, make_client: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway too busy to read (a blocked loop here) while datagrams pour in: the
    kernel drops them, and the gateway says so, at most `FIRST` times per interval."""
    gateway = await make_gateway({**gateway_config(sensors), "coap": {"receive_buffer": 4096}})
    client = await make_client(gateway.url)
    await client.next_notify((await client.subscribe(name="temperature"))["sub"])
    (reader,) = readers_of(gateway.coap.context)  # bound to a port now that it has sent
    target = ("127.0.0.1", reader.sock.getsockname()[1])
    reader.drops = watch = SignallingWatch(reader.sock)
    caplog.set_level(logging.INFO)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for _ in range(FIRST + 3):
            for _ in range(500):  # the loop does not run meanwhile: nothing is read
                sender.sendto(b"\x50\x45\x00\x01", target)  # a NON 2.05 nobody asked for
            watch.looked.clear()
            async with asyncio.timeout(WAIT):
                await watch.looked.wait()
    said = [r for r in caplog.records if "the kernel dropped" in r.getMessage()]
    assert len(said) == FIRST, [r.getMessage() for r in said]
    assert reader.log.count(KERNEL_DROPS) == FIRST + 3
    assert KERNEL_DROPS not in gateway.coap.dropped
