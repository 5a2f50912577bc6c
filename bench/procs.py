"""Child processes of a benchmark run: start, talk to, measure (/proc) and always stop them.

`Fleet` is an async context manager: every process started through it is stopped when the
block ends, however it ends (SIGTERM, then SIGKILL after a grace period). Each child also
gets the parent-death signal (so a killed harness takes its children along) and the hard
limit on open files as its soft limit (10 000 connections need more than the usual 1024).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import re
import resource
import signal
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_PR_SET_PDEATHSIG = 1


class BenchError(Exception):
    """A child misbehaved (no ready line, no answer, an error answer, died)."""


def _child_setup() -> None:
    """Runs in the child between fork and exec."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (seconds), from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * PAGE_SIZE


def machine_busy_seconds() -> tuple[float, float]:
    """CPU time spent by the whole machine so far, all cores (seconds), from /proc/stat, and
    the part of it in softirq (mostly network processing, e.g. loopback TCP delivery)."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return (sum(values[:8]) - idle) / CLOCK_TICKS, values[6] / CLOCK_TICKS


def udp_counters() -> dict[str, int]:
    """The machine's UDP counters (/proc/net/snmp), e.g. RcvbufErrors: datagrams dropped
    because a socket's receive buffer was full."""
    with open("/proc/net/snmp") as f:
        lines = [line.split() for line in f if line.startswith("Udp:")]
    return {k: int(v) for k, v in zip(lines[0][1:], lines[1][1:], strict=True)}


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
    except OSError:
        pass
    return inodes


def socket_queues(pid: int) -> dict[str, int]:
    """What sits in the kernel for the sockets of process `pid` right now, and the drops so
    far: from /proc/net/{tcp,tcp6,udp,udp6} (columns tx_queue:rx_queue, inode, drops).

    `tcp_tx`: bytes written but not yet acknowledged by the peer (for a server: what its
    clients have not read yet); `tcp_rx`: bytes received but not yet read by the process;
    `udp_rx`: datagram bytes waiting to be read; `udp_drops`: datagrams dropped because the
    receive buffer was full."""
    inodes = _socket_inodes(pid)
    out = {"tcp_tx": 0, "tcp_rx": 0, "udp_rx": 0, "udp_drops": 0}
    for table in ("tcp", "tcp6", "udp", "udp6"):
        with contextlib.suppress(OSError), open(f"/proc/net/{table}") as f:
            next(f)
            for line in f:
                fields = line.split()
                if len(fields) < 10 or fields[9] not in inodes:
                    continue
                tx, _, rx = fields[4].partition(":")
                if table.startswith("tcp"):
                    out["tcp_tx"] += int(tx, 16)
                    out["tcp_rx"] += int(rx, 16)
                else:
                    out["udp_rx"] += int(rx, 16)
                    out["udp_drops"] += int(fields[-1])
    return out


def udp_drops(pid: int) -> int:
    """Datagrams dropped so far at the UDP sockets of process `pid` (a full receive buffer)."""
    return socket_queues(pid)["udp_drops"]


class Child:
    """One process: a JSON-lines command channel on stdin/stdout, stderr to a log file."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log
        self.pid = proc.pid
        self.ready: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<{self.name} pid {self.pid}>"

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _fail(self, what: str) -> BenchError:
        code = self.proc.returncode
        state = f"exited with {code}" if code is not None else "running"
        tail = self.log_tail()
        return BenchError(f"{self.name} (pid {self.pid}, {state}): {what}"
                          + (f"\n--- {self.log} ---\n{tail}" if tail else ""))

    async def readline(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise self._fail(f"no output within {timeout:g} s") from None
        if not line:
            await asyncio.sleep(0.2)
            raise self._fail("closed its output")
        return line.decode(errors="replace").strip()

    async def wait_ready(self, pattern: str | None, timeout: float) -> None:
        """Wait for the ready line: a JSON object with "ready", or a match of `pattern`."""
        deadline = time.monotonic() + timeout
        while True:
            line = await self.readline(max(0.1, deadline - time.monotonic()))
            if pattern is not None:
                match = re.search(pattern, line)
                if match:
                    self.ready = {"ready": match.group(1)}
                    return
                continue
            with contextlib.suppress(ValueError):
                obj = json.loads(line)
                if isinstance(obj, dict) and "ready" in obj:
                    self.ready = obj
                    return

    async def call(self, command: dict[str, Any], timeout: float = 30.0) -> dict[str, Any]:
        """Send one command and return its answer; BenchError unless it says ok."""
        assert self.proc.stdin is not None
        if self.proc.returncode is not None:
            raise self._fail(f"gone before {command.get('cmd')!r}")
        self.proc.stdin.write((json.dumps(command) + "\n").encode())
        try:
            await asyncio.wait_for(self.proc.stdin.drain(), timeout)
        except (ConnectionError, TimeoutError):
            raise self._fail(f"cannot send {command.get('cmd')!r}") from None
        deadline = time.monotonic() + timeout
        while True:
            line = await self.readline(max(0.1, deadline - time.monotonic()))
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            if not isinstance(reply, dict):
                continue
            if not reply.get("ok"):
                raise self._fail(f"{command.get('cmd')!r} failed: {reply.get('error')}")
            return reply

    def cpu(self) -> float:
        try:
            return cpu_seconds(self.pid)
        except OSError:
            return float("nan")

    def rss(self) -> int:
        return rss_bytes(self.pid)

    def udp_drops(self) -> int:
        return udp_drops(self.pid)

    def queues(self) -> dict[str, int]:
        return socket_queues(self.pid)

    async def stop(self, grace: float = 6.0) -> int | None:
        """SIGTERM (or `quit` for a command-channel child), then SIGKILL after `grace`."""
        proc = self.proc
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 5)
        if proc.stdin is not None:
            proc.stdin.close()
        return proc.returncode


class Fleet:
    """Starts children and stops every one of them when the `async with` block ends."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []
        self._counter = 0

    async def __aenter__(self) -> Fleet:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop_all()

    async def start(
        self,
        name: str,
        argv: list[str],
        *,
        ready_pattern: str | None = None,
        timeout: float = 30.0,
    ) -> Child:
        self._counter += 1
        log = self.log_dir / f"{self._counter:03d}-{name}.log"
        with log.open("wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                cwd=ROOT,
                preexec_fn=_child_setup,
                limit=1 << 24,
            )
        child = Child(name, proc, log)
        self.children.append(child)
        await child.wait_ready(ready_pattern, timeout)
        return child

    async def python(self, name: str, module: str, *args: str, **kwargs: Any) -> Child:
        return await self.start(name, [sys.executable, "-m", module, *args], **kwargs)

    async def stop(self, *children: Child) -> None:
        await asyncio.gather(*(c.stop() for c in children))
        for child in children:
            with contextlib.suppress(ValueError):
                self.children.remove(child)

    async def stop_all(self) -> None:
        children, self.children = self.children, []
        # Shielded: a cancelled run (budget exceeded, Ctrl-C) must still reap its children.
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await asyncio.shield(asyncio.gather(*(c.stop() for c in children)))
        for child in children:  # whatever happened above, nothing survives the fleet
            if child.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.proc.kill()


async def run_bounded(
    *argv: str, timeout: float, cwd: Path | None = None
) -> tuple[int, bytes, bytes]:
    """Run a command to its end: (exit code, stdout, stderr). Past `timeout` seconds it is
    killed and reaped, and TimeoutError is raised: a helper the harness runs (perf, py-spy,
    the floor) cannot hold a run up."""
    proc = await asyncio.create_subprocess_exec(
        *argv, cwd=cwd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode if proc.returncode is not None else -1, out, err
