"""At the edge of the open-files limit (issue 18): the gateway as a process under a lowered
limit, hundreds of clients at once, and a log that stays short.

Each test starts `coap-ws-gateway serve` with ``RLIMIT_NOFILE`` set in the child
(`preexec_fn`), reads its stderr line by line, and speaks to it with real WebSocket
clients. This process raises its own soft limit first: it opens hundreds of sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import resource
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from .conftest import WAIT

CLI = [sys.executable, "-m", "translator"]
FLOOD = 400
"""Clients opened at once against a limit of 256."""
WAVE = 100
"""Clients opened together (one `gather`), so that each wave is bounded in time."""


@pytest.fixture(autouse=True, scope="module")
def enough_descriptors_here() -> Any:
    """This test process holds hundreds of client sockets: its own soft limit goes up to
    the hard one (as the gateway's does), and back afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class Child:
    """A gateway process: its URL, its pid and every line of its stderr so far."""

    def __init__(self, process: asyncio.subprocess.Process, url: str) -> None:
        self.process = process
        self.url = url
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        assert process.stderr is not None
        self._reader = asyncio.create_task(self._read(process.stderr), name="child stderr")

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while raw := await stream.readline():
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._changed.set()

    async def wait_for_line(self, pattern: str, timeout: float = WAIT) -> str:
        """The first line matching `pattern`, waited for."""
        regex = re.compile(pattern)
        async with asyncio.timeout(timeout):
            while True:
                for line in self.lines:
                    if regex.search(line):
                        return line
                self._changed.clear()
                await self._changed.wait()

    def limits(self) -> tuple[int, int]:
        """The child's open-files limit (soft, hard), as the kernel has it."""
        text = Path(f"/proc/{self.process.pid}/limits").read_text()
        match = re.search(r"Max open files\s+(\d+)\s+(\d+)", text)
        assert match, text
        return int(match[1]), int(match[2])

    async def terminate(self) -> tuple[int, float]:
        """SIGTERM; the exit code and the seconds it took."""
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        async with asyncio.timeout(WAIT):
            code = await self.process.wait()
        took = time.monotonic() - started
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        return code, took


async def start_gateway(tmp_path: Path, nofile: tuple[int, int], toml: str = "") -> Child:
    config = tmp_path / "gateway.toml"
    config.write_text(f'log_level = "info"\n[server]\nhost = "127.0.0.1"\nport = 0\n{toml}')

    def lower_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, nofile)

    process = await asyncio.create_subprocess_exec(
        *CLI, "serve", "--config", str(config), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, preexec_fn=lower_limit,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(WAIT * 2):
            line = (await process.stdout.readline()).decode()
    except BaseException:
        process.kill()
        await process.wait()
        raise
    if not line.startswith("listening on "):
        process.kill()
        await process.wait()
        raise AssertionError(f"no ready line: {line!r}")
    return Child(process, line.removeprefix("listening on ").strip())


@pytest.fixture
async def gateways(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    started: list[Child] = []

    async def start(nofile: tuple[int, int], toml: str = "") -> Child:
        child = await start_gateway(tmp_path, nofile, toml)
        started.append(child)
        return child

    yield start
    for child in started:
        if child.process.returncode is None:
            child.process.kill()
            await child.process.wait()


async def open_client(url: str) -> ClientConnection | int:
    """A connected client (101), or the HTTP status of the refusal (checked: 503 carries
    Retry-After)."""
    try:
        return await connect(url, open_timeout=WAIT * 2, ping_interval=None,
                             max_queue=1)
    except InvalidStatus as exc:
        status = exc.response.status_code
        if status == 503:
            assert exc.response.headers.get("Retry-After"), exc.response.headers
        return status


async def ping(client: ClientConnection, frame_id: int) -> None:
    await client.send(json.dumps({"type": "ping", "id": frame_id}))
    async with asyncio.timeout(WAIT):
        while True:
            frame = json.loads(await client.recv())
            if frame.get("type") == "pong":
                assert frame["id"] == frame_id
                return


async def close_all(clients: list[ClientConnection]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


# --- the limit and the budget --------------------------------------------------------------


async def test_a_soft_limit_below_the_hard_one_is_raised_and_said_once(gateways: Any) -> None:
    child = await gateways((256, 1024))
    assert child.limits() == (1024, 1024)
    line = await child.wait_for_line(r"open files: limit")
    assert "limit 1024 (raised from 256" in line
    await child.wait_for_line(r"clients: at most")
    assert sum("open files:" in line for line in child.lines) == 1
    code, _ = await child.terminate()
    assert code == 0


async def test_max_connections_above_the_budget_is_named_at_start(gateways: Any) -> None:
    child = await gateways((512, 512), "[limits]\nmax_connections = 25000\n")
    line = await child.wait_for_line(r"clients: at most")
    assert "WARNING" in line
    match = re.search(r"at most (\d+), not \[limits\] max_connections = 25000: the open-files "
                      r"limit 512 allows (\d+) \((\d+) kept", line)
    assert match, line
    clients, allowed, reserve = map(int, match.groups())
    assert clients == allowed == 512 - reserve and 0 < reserve < 256
    assert "ulimit -n" in line and "LimitNOFILE=" in line
    code, _ = await child.terminate()
    assert code == 0


async def test_max_connections_below_the_budget_is_what_is_enforced(gateways: Any) -> None:
    child = await gateways((512, 512), "[limits]\nmax_connections = 3\n")
    line = await child.wait_for_line(r"clients: at most")
    assert "at most 3 ([limits] max_connections" in line and "INFO" in line
    results = [await open_client(child.url) for _ in range(4)]
    assert [r if isinstance(r, int) else 101 for r in results] == [101, 101, 101, 503]
    await close_all([r for r in results if not isinstance(r, int)])
    code, _ = await child.terminate()
    assert code == 0


# --- a flood at the limit ------------------------------------------------------------------


async def test_a_flood_at_the_limit_gets_101_or_503_and_the_log_stays_short(
    gateways: Any,
) -> None:
    child = await gateways((256, 256), "[limits]\nmax_connections_per_ip = 10000\n")
    line = await child.wait_for_line(r"clients: at most")
    budget = int(re.search(r"at most (\d+)", line)[1])  # type: ignore[index]
    assert 64 < budget < 256
    early = await open_client(child.url)
    assert not isinstance(early, int)
    lines_before = len(child.lines)

    opened: list[ClientConnection] = []
    refused = 0
    started = time.monotonic()
    for _ in range(FLOOD // WAVE):
        async with asyncio.timeout(WAIT * 3):
            wave = await asyncio.gather(*(open_client(child.url) for _ in range(WAVE)))
        for result in wave:
            if isinstance(result, int):
                assert result == 503, result
                refused += 1
            else:
                opened.append(result)
    took = time.monotonic() - started
    # Every client got an answer, within seconds; the budget was used, not exceeded.
    assert len(opened) + refused == FLOOD
    assert len(opened) == budget - 1, (len(opened), budget)
    assert took < 60, took

    # The client connected before the flood is served as before.
    await ping(early, 1)
    # A flood of 400 handshakes costs a few lines a kind, whatever the number of clients.
    flood_lines = child.lines[lines_before:]
    assert len(flood_lines) < 40, "\n".join(flood_lines)
    assert not [line for line in flood_lines if "Traceback" in line], "\n".join(flood_lines)
    # The listener paused before the process ran out of descriptors, not after.
    assert not [line for line in flood_lines if "Too many open files" in line], flood_lines

    # Capacity freed by leaving clients is reused at once (a place is freed when the
    # server sees its TCP connection end: a new client may race that by a loop turn).
    leaving, opened = opened[:20], opened[20:]
    await close_all(leaving)
    for _ in range(20):
        async with asyncio.timeout(WAIT):
            while isinstance(result := await open_client(child.url), int):
                assert result == 503
        opened.append(result)
    assert isinstance(await open_client(child.url), int)  # and the budget holds

    code, took = await child.terminate()
    assert code == 0 and took < 5, (code, took)
    await close_all([early, *opened])
    # What was counted is said, at the latest when the process ends.
    summary = next(line for line in child.lines
                   if re.search(r"refused: %d %s: \.\.\.and \d+ more", line))
    in_all = int(re.search(r"\((\d+) in all\)", summary)[1])  # type: ignore[index]
    assert in_all >= refused, summary


async def test_descriptors_taken_by_unfinished_handshakes_pause_accepting_and_say_so_once(
    gateways: Any,
) -> None:
    """Bare TCP connections that never send a request hold a descriptor each until the
    handshake timeout: enough of them would exhaust the limit whatever the budget. The
    listener pauses before that and retries, once a second, and says so once per 10 s."""
    child = await gateways((256, 256), "[limits]\nhandshake_timeout = 3.0\n"
                                       "max_connections_per_ip = 10000\n")
    await child.wait_for_line(r"clients: at most")
    early = await open_client(child.url)
    assert not isinstance(early, int)
    host, port = child.url.removeprefix("ws://").split("/")[0].rsplit(":", 1)
    silent = []
    for _ in range(300):
        sock = socket.socket()
        sock.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            sock.connect((host, int(port)))
        silent.append(sock)
    try:
        line = await child.wait_for_line(r"cannot accept connections")
        assert "the open-files budget is spent" in line and "open-files limit 256" in line
        # Meanwhile the gateway serves its clients.
        await ping(early, 2)
        # The unfinished handshakes time out, accepting resumes: a new client gets in.
        async with asyncio.timeout(WAIT * 2):
            while isinstance(result := await open_client(child.url), int):
                pass
        assert not isinstance(result, int)
        # Each pause is one failed accept(): the summary counts about one a second, not
        # asyncio's hundred a pass (one per place in the backlog).
        summary = await child.wait_for_line(r"out of system resource: \.\.\.and \d+ more",
                                            timeout=WAIT * 2)
        more = int(re.search(r"and (\d+) more", summary)[1])  # type: ignore[index]
        assert more <= 30, summary
        said = [line for line in child.lines if "cannot accept connections" in line]
        assert len(said) == 1, said
        assert not [line for line in child.lines if "Traceback" in line]
        await close_all([result])
    finally:
        for sock in silent:
            sock.close()
    code, took = await child.terminate()
    assert code == 0 and took < 5, (code, took)
    await close_all([early])


# --- floods of log lines, one per source ---------------------------------------------------


async def test_a_client_sending_bad_frames_costs_a_few_lines(gateways: Any) -> None:
    child = await gateways((1024, 1024), "[limits]\nrate = 0\n")
    await child.wait_for_line(r"clients: at most")
    client = await open_client(child.url)
    assert not isinstance(client, int)
    lines_before = len(child.lines)
    for number in range(1000):
        await client.send(f'{{"type": "nonsense", "id": {number}}}')
    errors = 0
    async with asyncio.timeout(WAIT):
        while errors < 1000:
            frame = json.loads(await client.recv())
            if frame.get("type") == "error":
                errors += 1
    assert len(child.lines) - lines_before <= 4, child.lines[lines_before:]
    code, _ = await child.terminate()
    assert code == 0
    await close_all([client])


async def test_many_clients_connecting_cost_a_few_lines_a_kind(gateways: Any) -> None:
    """"connected" and "disconnected" are INFO lines that any client can repeat at will."""
    child = await gateways((1024, 1024))
    await child.wait_for_line(r"clients: at most")
    lines_before = len(child.lines)
    for _ in range(50):
        client = await open_client(child.url)
        assert not isinstance(client, int)
        await client.close()
    await child.wait_for_line(r"disconnected")
    lines = child.lines[lines_before:]
    assert sum("connected" in line and "disconnected" not in line for line in lines) == 3, lines
    assert len(lines) <= 12, lines
    code, _ = await child.terminate()
    assert code == 0
