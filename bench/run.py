"""`make bench`: measure the gateway against bare baselines in the same run, on loopback.

    python -m bench.run [--quick] [--large] [--smoke] [--out DIR] [--budget S] [--profile]

Scenarios (see docs/performance.md for the method and the latest figures):

1. fan-out: one resource, N subscribed clients, the sensor offering more than can be
   delivered (plus, at the largest N: 10 updates/s, and twice the measured capacity);
2. ingest: 1000 observed resources, one subscriber each, the offered rate stepped up until
   notifications are lost;
3. commands: request round trips, sequential and 50 in flight over 10 clients, GET and PUT;
4. memory: RSS per idle connection and per observed resource;
5. admission: 1000 new clients connect and subscribe while fan-out at N = 1000 saturates;
6. baselines for each: a bare websockets broadcast server, a bare aiocoap client;
7. slow readers: clients behind a slow link (1/4 and 1/10 of 200 updates/s) beside 100
   full-speed ones, with the bound on what waits in the kernel (`max_inflight_bytes`) on and
   off: the age of the values the slow ones get, the full-speed ones' latency;
8. resource directory (bench/rd.py): registrations and updates per second and RSS per
   registration of the gateway's RFC 9176 directory, against aiocoap's `aiocoap-rd`.
9. metrics: fan-out at N = 1000 with /metrics scraped (1/s, 10/s) and not; and, with the
   full memory scenario, the resume history's bytes per resource when full
   (bench/operations.py; neither is in a quick run unless asked for with --only).
10. bandwidth: bytes per update on the wire for three payloads in each client mode (JSON,
    compact, CBOR, permessage-deflate) against the sensor's CoAP message, and the gateway's
    CPU per delivered frame at N = 1000 in each mode (bench/bandwidth.py).

Every process (sensor, gateway, load generators, baselines) is a child on 127.0.0.1, and
every one is stopped when the run ends, whatever way it ends. The run has a time budget;
past it, what was measured so far is still written (marked incomplete).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from . import bandwidth as bandwidth_scenario
from . import conditions, cpu_split
from . import rd as rd_bench
from .control import Histogram
from .procs import (
    ROOT,
    BenchError,
    Child,
    Fleet,
    machine_busy_seconds,
    run_bounded,
    udp_counters,
)

RESULTS = ROOT / "bench" / "results"
SLOW_UPDATE_RATE = 200.0
"""Updates/s of the one resource in the slow readers scenario."""
SLOW_CLIENT_RCVBUF = 4096
"""A slow reader's receive buffer, set before connecting (the kernel doubles it)."""
DEFAULT_INFLIGHT = None
"""`max_inflight_bytes` of the gateway under test: None keeps the gateway's default."""
PUT_VALUE = {"on": True}
PUT_CBOR_HEX = "a1626f6ef5"  # cbor2.dumps({"on": True}): what the gateway sends for PUT_VALUE
SATURATING_DELIVERIES = 200_000
"""Offered updates/s at fan-out N are this / N (at most MAX_SENSOR_RATE): far more than a
Python process on one core can deliver, so the run measures capacity."""
MAX_SENSOR_RATE = 20_000
SUBSCRIBE_BATCH = 10
WARMUP = 10
"""Connections or observations opened before the memory baseline is read (see memory_*)."""
"""Subscriptions a client sends before waiting for their first notifies (with 10 clients, 100
registrations in flight). Before the gateway read its UDP socket in batches with a 1 MiB
buffer, a burst of several hundred lost answers there and each cost a registration timeout
(docs/performance.md); pacing keeps the setup time out of the measurement either way."""


@dataclass
class Settings:
    mode: str = "full"
    fanout_ns: tuple[int, ...] = (1, 100, 1000)
    window: float = 3.0
    warmup: float = 1.0
    overload_warmup: float = 2.5
    rounds: int = 2
    """Alternating windows per system and phase (the admission phase runs once)."""
    quiet_limit: float = 12.0
    """Longest wait for a system's backlog to be delivered after a window."""
    # Fine steps from 6000/s up, where both systems top out on this machine: with 8000 then
    # 11 000, one run's ratio could read 0.73 for two systems a step apart.
    ingest_rates: tuple[int, ...] = (1000, 2000, 4000, 6000, 7000, 8000, 9000, 10_000, 11_000,
                                     12_500, 15_000)
    ingest_resources: int = 1000
    ingest_window: float = 2.5
    settle: float = 1.0
    """Seconds to let a new rate (ingest) or new connections (memory) settle."""
    command_seconds: float = 3.0
    idle_connections: tuple[int, ...] = (1000, 10_000)
    observed_resources: tuple[int, ...] = (1000, 10_000)
    admission_clients: int = 1000
    floor_bursts: int = 50
    """Bursts per writer in bench.floor (three writers, one burst every 100 ms)."""
    floor_hiccups: int = 200
    scenarios: tuple[str, ...] = (
        "fanout", "ingest", "commands", "memory", "slow", "rd", "metrics", "cond", "bandwidth",
        "cluster",
    )
    rd_registrations: int = 3000
    """Endpoints registered per system in the resource directory scenario."""
    slow_seconds: float = 60.0
    """The slow readers' measurement, per gateway (bound on, bound off)."""
    slow_window: float = 10.0
    """Their ages are reported per window of this many seconds."""
    slow_alone_seconds: float = 10.0
    """The full-speed clients measured alone first (their p99 without slow readers)."""
    slow_rates: tuple[float, ...] = (50.0, 50.0, 50.0, 20.0, 20.0, 20.0)
    """Frames per second each slow reader takes: 1/4 and 1/10 of `SLOW_UPDATE_RATE`."""
    slow_fast_clients: int = 100
    bandwidth_clients: int = 1000
    bandwidth_window: float = 4.0
    budget: float = 1260.0  # the metrics and history scenarios added some 2.5 min, cond 40 s,
    # bandwidth 3 min, cluster 2 min
    profile: bool = False
    chart: bool = True

    @classmethod
    def for_mode(cls, args: argparse.Namespace) -> Settings:
        if args.smoke:
            s = cls(mode="smoke", fanout_ns=(2,), window=1.5, warmup=0.5, rounds=1,
                    quiet_limit=3.0, scenarios=("fanout",), budget=60.0, chart=False,
                    admission_clients=0, floor_bursts=5, floor_hiccups=20)
        elif args.quick:
            # Under a minute: fan-out at 1 and 1000 only, shorter windows, no admission
            # phase, memory at 1000 only.
            s = cls(mode="quick", fanout_ns=(1, 1000), window=1.0, warmup=0.5,
                    overload_warmup=0.8, rounds=1, quiet_limit=2.5, ingest_rates=(2000,),
                    ingest_window=1.0, settle=0.3, command_seconds=0.4,
                    idle_connections=(1000,), observed_resources=(1000,), admission_clients=0,
                    floor_bursts=15, floor_hiccups=60, budget=90.0,
                    scenarios=("fanout", "ingest", "commands", "memory", "rd"),
                    rd_registrations=500)
        else:
            s = cls()
        if args.large:
            s.fanout_ns = (*s.fanout_ns, 5000)
        if args.only:
            s.scenarios = tuple(args.only)
        if args.budget:
            s.budget = args.budget
        s.profile = args.profile
        if args.no_chart:
            s.chart = False
        return s


@dataclass
class Run:
    """Everything measured in one run, as written to latest.json."""

    settings: Settings
    runs: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- processes ---------------------------------------------------------------------------------


def gateway_config(sensor_base: str, directory: Path, inflight: int | None = None) -> Path:
    """The gateway's configuration; `inflight`: its `max_inflight_bytes` (None: default)."""
    path = directory / f"gateway-{inflight}.toml"
    extra = "" if inflight is None else f"max_inflight_bytes = {inflight}\n"
    # BENCH_RECEIVE_BUFFER=bytes: the CoAP socket's [coap] receive_buffer (its drops under
    # the flood phases are measured against it; 0 = the kernel's default).
    receive_buffer = os.environ.get("BENCH_RECEIVE_BUFFER")
    coap = "" if receive_buffer is None else f"[coap]\nreceive_buffer = {int(receive_buffer)}\n"
    path.write_text(f"""# written by bench/run.py
log_level = "warning"
{coap}
[server]
host = "127.0.0.1"
port = 0
linger = 0.0

[policy]
allow = ["{sensor_base}/*"]

[limits]
max_subscriptions = 10000
max_inflight = 64
max_connections = 25000
max_connections_per_ip = 25000
rate = 0.0
{extra}""")
    return path


async def start_sensor(fleet: Fleet, resources: int = 1, pad: int = 0) -> Child:
    return await fleet.python("sensor", "bench.fast_sensor", "--resources", str(resources),
                              "--pad", str(pad))


async def start_gateway(fleet: Fleet, sensor: Child,
                        inflight: int | None = DEFAULT_INFLIGHT) -> tuple[Child, str]:
    config = gateway_config(sensor.ready["ready"], fleet.log_dir, inflight)
    name = "gateway" if inflight is None else f"gateway-inflight{inflight}"
    gateway = await fleet.python(name, "translator", "serve", "--config", str(config),
                                 ready_pattern=r"listening on (ws://\S+)")
    return gateway, gateway.ready["ready"]


async def start_bare_ws(fleet: Fleet) -> tuple[Child, str]:
    bare = await fleet.python("bare_ws", "bench.bare_ws")
    return bare, bare.ready["ready"]


async def start_loadgens(fleet: Fleet, count: int) -> list[Child]:
    return list(await asyncio.gather(
        *(fleet.python(f"loadgen{i}", "bench.loadgen") for i in range(count))
    ))


def split(n: int, parts: int) -> list[int]:
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


async def call_all(
    children: list[Child], command: dict[str, Any] | list[dict[str, Any]], timeout: float
) -> list[dict[str, Any]]:
    commands = command if isinstance(command, list) else [command] * len(children)
    return list(await asyncio.gather(
        *(c.call(cmd, timeout) for c, cmd in zip(children, commands, strict=True))
    ))


# -- measuring one window ----------------------------------------------------------------------


@dataclass
class Probe:
    """CPU of the processes involved and the UDP counters, read at a window's edges."""

    server: Child
    sensor: Child | None
    loadgens: list[Child]

    def read(self) -> dict[str, Any]:
        return {
            "t": time.monotonic(),
            "server": self.server.cpu(),
            "sensor": self.sensor.cpu() if self.sensor else 0.0,
            "loadgens": sum(c.cpu() for c in self.loadgens),
            "machine": machine_busy_seconds(),
            "udp": udp_counters(),
            "server_udp_drops": self.server.udp_drops(),
        }

    @staticmethod
    def delta(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
        seconds = b["t"] - a["t"]
        return {
            "seconds": seconds,
            "server_cpu": b["server"] - a["server"],
            "sensor_cpu": b["sensor"] - a["sensor"],
            "loadgen_cpu": b["loadgens"] - a["loadgens"],
            # CPU the machine spent outside this run's processes (other users, the kernel's
            # own threads): a noisy neighbour shows up here.
            # (softirq, the kernel's network processing, is not charged to any process and
            # is mostly this run's own loopback traffic: counted apart.)
            "softirq_cpu": b["machine"][1] - a["machine"][1],
            "other_cpu": (b["machine"][0] - a["machine"][0]) - (b["machine"][1] - a["machine"][1])
            - (b["server"] - a["server"]) - (b["sensor"] - a["sensor"])
            - (b["loadgens"] - a["loadgens"]),
            "udp_rcvbuf_errors": b["udp"].get("RcvbufErrors", 0) - a["udp"].get("RcvbufErrors", 0),
            "server_udp_drops": b["server_udp_drops"] - a["server_udp_drops"],
        }


def latency_fields(hist: Histogram) -> dict[str, Any]:
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 3)

    return {
        "p50_ms": ms(hist.percentile(0.50)),
        "p99_ms": ms(hist.percentile(0.99)),
        "max_ms": ms(hist.max if hist.count else None),
        "samples": hist.count,
    }


async def offered_updates(source: Child) -> int:
    reply = await source.call({"cmd": "stats"}, 10)
    return int(reply["updates"])


async def measure_window(
    *,
    probe: Probe,
    counters: list[Child],
    source: Child,
    window: float,
    during: Callable[[], Awaitable[dict[str, Any]]] | None = None,
) -> dict[str, Any]:
    """One measurement window: open windows in `counters`, wait, close, collect."""
    # The sensor's counter is read right next to the clients' window, on both sides: an
    # update offered before the clients' window opens (or after it closes) is delivered
    # outside it, and gaps of tens of ms over a 3 s window read as a few % of loss.
    before = probe.read()
    offered0 = await offered_updates(source)
    await call_all(counters, {"cmd": "start"}, 10)
    extra: dict[str, Any] = {}
    if during is not None:
        extra, _ = await asyncio.gather(during(), asyncio.sleep(window))
    else:
        await asyncio.sleep(window)
    # Where undelivered data sits at the end of the window: in the server's UDP receive
    # buffer, in TCP send buffers toward the clients, or read by the clients' kernels but not
    # yet by the clients (then the load generator is the bottleneck, not the server).
    server_q = probe.server.queues()
    client_rx = sum(c.queues()["tcp_rx"] for c in probe.loadgens)
    stops = await call_all(counters, {"cmd": "stop"}, 30)
    offered1 = await offered_updates(source)
    after = probe.read()
    usage = Probe.delta(before, after)
    seconds = max(s["seconds"] for s in stops)
    frames = sum(s["frames"] for s in stops)
    hist = Histogram.merged(s["latency"] for s in stops)
    # The load generator's own receipt (after its queueing on this shared machine), beside
    # the kernel's receipt that the latency figures use.
    app = Histogram.merged(s["app_latency"] for s in stops if "app_latency" in s)
    app_fields = {f"app_{k}": v for k, v in latency_fields(app).items() if k != "samples"}
    result = {
        "window_s": round(seconds, 3),
        "offered_updates": offered1 - offered0,
        "offered_per_s": round((offered1 - offered0) / usage["seconds"], 1),
        "deliveries": frames,
        "deliveries_per_s": round(frames / seconds, 1),
        **latency_fields(hist),
        **app_fields,
        "closed_clients": sum(s.get("closed", 0) for s in stops),
        "server_cpu_s": round(usage["server_cpu"], 3),
        "server_cpu_pct": round(100 * usage["server_cpu"] / usage["seconds"], 1),
        "sensor_cpu_pct": round(100 * usage["sensor_cpu"] / usage["seconds"], 1),
        "loadgen_cpu_pct": round(100 * usage["loadgen_cpu"] / usage["seconds"], 1),
        "other_cpu_pct": round(100 * usage["other_cpu"] / usage["seconds"], 1),
        "softirq_cpu_pct": round(100 * usage["softirq_cpu"] / usage["seconds"], 1),
        "cpu_us_per_delivery": round(1e6 * usage["server_cpu"] / frames, 2) if frames else None,
        "server_udp_drops": usage["server_udp_drops"],
        "machine_udp_rcvbuf_errors": usage["udp_rcvbuf_errors"],
        "end_server_udp_rx_kib": round(server_q["udp_rx"] / 1024, 1),
        "end_server_tcp_tx_kib": round(server_q["tcp_tx"] / 1024, 1),
        "end_clients_tcp_rx_kib": round(client_rx / 1024, 1),
        **extra,
    }
    return result


# -- 1 + 5: fan-out (and admission) ------------------------------------------------------------


@dataclass
class FanoutSystem:
    """One system under fan-out test (the gateway or the bare broadcast) with its clients."""

    name: str
    server: Child
    sensor: Child | None
    source: Child
    """Whose `rate` command sets the offered updates: the sensor, or the bare server."""
    url: str
    uri: str
    loadgens: list[Child]
    newcomers: list[Child]

    @property
    def counters(self) -> list[Child]:
        return self.loadgens + self.newcomers

    @property
    def probe(self) -> Probe:
        return Probe(self.server, self.sensor, self.counters)


async def _setup_fanout(fleet: Fleet, name: str, n: int, admission: bool) -> FanoutSystem:
    sensor: Child | None = None
    if name == "gateway":
        sensor = await start_sensor(fleet)
        server, url = await start_gateway(fleet, sensor)
        uri = sensor.ready["ready"] + "/r/0"
        source = sensor
    else:
        server, url = await start_bare_ws(fleet)
        uri = "coap://127.0.0.1:5683/r/0"
        source = server
    loadgens = await start_loadgens(fleet, 1 if n < 100 else 2)
    newcomers = await start_loadgens(fleet, 2) if admission else []
    t0 = time.monotonic()
    replies = await call_all(loadgens, [
        {"cmd": "connect", "url": url, "n": k, "uris": [uri], "concurrency": 50,
         "timeout": 30} for k in split(n, len(loadgens))], timeout=120)
    connected = sum(r["connected"] for r in replies)
    if connected < n:
        raise BenchError(f"{name}: only {connected}/{n} clients connected: "
                         f"{[r['errors'] for r in replies]}")
    log(f"  {name} N={n}: {connected} clients connected in {time.monotonic() - t0:.1f} s")
    return FanoutSystem(name, server, sensor, source, url, uri, loadgens, newcomers)


async def _quiet(system: FanoutSystem, limit: float) -> float:
    """After the offered rate went to 0: wait until the clients stop receiving (a backlog
    held in the gateway's UDP buffer is still being delivered), at most `limit` seconds, so
    that it cannot leak into the other system's window. Returns the seconds waited."""
    start = time.monotonic()
    last, stable_since = -1, start
    while time.monotonic() - start < limit:
        counts = await call_all(system.counters, {"cmd": "count"}, 10)
        total = sum(c["notified"] for c in counts)
        now = time.monotonic()
        if total != last:
            last, stable_since = total, now
        elif now - stable_since >= 0.5:
            break
        await asyncio.sleep(0.2)
    return time.monotonic() - start


async def fanout(bench: Run, fleet: Fleet, n: int, phases: list[str]) -> None:
    """Both systems with `n` clients each, set up once; every phase measured in alternating
    windows (gateway, bare, gateway, bare, ...) so that both see the same machine."""
    s = bench.settings
    admission = "admission" in phases
    systems = [await _setup_fanout(fleet, name, n, admission) for name in ("gateway", "bare_ws")]
    saturating = min(MAX_SENSOR_RATE, SATURATING_DELIVERIES / n)
    capacity: dict[str, list[float]] = {system.name: [] for system in systems}
    for phase in phases:
        rounds = 1 if phase == "admission" else s.rounds
        for round_number in range(1, rounds + 1):
            for system in systems:
                if phase in ("overload2x", "flood10x"):
                    if not capacity[system.name]:
                        continue
                    factor = 2 if phase == "overload2x" else 10
                    rate = factor * statistics.mean(capacity[system.name]) / n
                else:
                    rate = 10.0 if phase == "10hz" else saturating
                result = await _fanout_window(bench, system, n, phase, rate, round_number)
                if phase == "saturated":
                    capacity[system.name].append(result["deliveries_per_s"])
    for system in systems:
        await fleet.stop(*system.counters)
    await fleet.stop(*[c for system in systems for c in (system.server, system.sensor)
                       if c is not None])


async def _fanout_window(bench: Run, system: FanoutSystem, n: int, phase: str, rate: float,
                         round_number: int) -> dict[str, Any]:
    s = bench.settings
    await system.source.call({"cmd": "rate", "rate": rate})
    await asyncio.sleep(s.overload_warmup if phase in ("overload2x", "flood10x")
                        else s.warmup)
    during = None
    if phase == "admission":
        during = _admission(system.newcomers, system.url, system.uri, s.admission_clients)
    profile_task = split_task = None
    if s.profile and system.name == "gateway" and n == max(s.fanout_ns):
        # py-spy in the first round, perf in the second: one sampler at a time.
        if phase == "saturated" and round_number == 1:
            profile_task = asyncio.create_task(_profile(system.server, s.window, f"fanout-{n}"))
        if phase in ("saturated", "10hz") and round_number == 2:
            split_task = asyncio.create_task(cpu_split.record(
                system.server.pid, max(1, int(s.window)), RESULTS / f"perf-{phase}-{n}.data"))
    result = await measure_window(probe=system.probe, counters=system.counters,
                                  source=system.source, window=s.window, during=during)
    if profile_task is not None:
        result["profile"] = await profile_task
    if split_task is not None:
        result["cpu_split"] = await split_task
    await system.source.call({"cmd": "rate", "rate": 0})
    result["quiet_s"] = round(await _quiet(system, s.quiet_limit), 2)
    result.update(scenario="fanout", system=system.name, n=n, phase=phase,
                  round=round_number, offered_rate=round(rate, 2))
    per_client = n + (s.admission_clients if phase == "admission" else 0)
    if result["offered_updates"]:
        result["share"] = round(result["deliveries"] / (result["offered_updates"] * per_client),
                                4)
    bench.runs.append(result)
    log(f"  {system.name} N={n} {phase} #{round_number}: "
        f"{result['deliveries_per_s']:.0f} deliveries/s, p50 {result['p50_ms']} ms, "
        f"p99 {result['p99_ms']} ms (read by the client: p50 {result.get('app_p50_ms')}, "
        f"p99 {result.get('app_p99_ms')} ms), share {result.get('share')}, "
        f"server CPU {result['server_cpu_pct']} %, {result['cpu_us_per_delivery']} µs/delivery, "
        f"{result['server_udp_drops']} dropped at its UDP socket, "
        f"closed {result['closed_clients']}, quiet after {result['quiet_s']} s")
    return result


def _admission(
    newcomers: list[Child], url: str, uri: str, clients: int
) -> Callable[[], Awaitable[dict[str, Any]]]:
    async def admit() -> dict[str, Any]:
        replies = await call_all(newcomers, [
            {"cmd": "admit", "url": url, "n": k, "uris": [uri], "concurrency": 50,
             "timeout": 30} for k in split(clients, len(newcomers))], timeout=120)
        return {"admission": {
            "clients": clients,
            "connected": sum(r["connected"] for r in replies),
            "failed": sum(r["failed"] for r in replies),
            "all_handshaken_s": round(max(r.get("all_handshaken", math.inf) for r in replies), 3),
            "all_subscribed_s": round(max(r.get("all_subscribed", math.inf) for r in replies), 3),
            "handshake_p50_ms": round(1000 * max(r.get("handshake_p50", 0) for r in replies), 2),
            "handshake_p99_ms": round(1000 * max(r.get("handshake_p99", 0) for r in replies), 2),
            "errors": [e for r in replies for e in r["errors"]][:3],
        }}

    return admit


async def _profile(server: Child, seconds: float, label: str) -> dict[str, Any]:
    """py-spy the server for `seconds`; the top functions by own time (if py-spy exists)."""
    spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if spy is None:
        return {"error": "py-spy not installed"}
    out = RESULTS / f"profile-{label}.txt"
    try:
        await run_bounded(
            spy, "record", "--format", "raw", "--rate", "200", "--nonblocking",
            "-d", str(max(1, int(seconds))), "-p", str(server.pid), "-o", str(out),
            timeout=seconds + 20)
    except TimeoutError:
        return {"error": "py-spy did not finish"}
    return summarize_profile(out)


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Own-time and inclusive shares per function from py-spy's collapsed stacks."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        return {"error": str(exc)}
    for line in lines:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [_short_frame(f) for f in stack.split(";")]
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    if not total:
        return {"error": "no samples"}
    return {
        "file": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path),
        "samples": total,
        "own": [[f, round(100 * c / total, 1)] for f, c in own.most_common(top)],
        "inclusive": [[f, round(100 * c / total, 1)] for f, c in inclusive.most_common(top * 2)],
    }


def _short_frame(frame: str) -> str:
    """'send (websockets/asyncio/connection.py:123)' -> 'send (websockets/asyncio/connection.py)'"""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rpartition(":")[0] or where.rstrip(")")
    for marker in ("site-packages/", "/lib/python3.11/", str(ROOT) + "/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})"


async def floor(bench: Run, fleet: Fleet) -> None:
    """The CPU cost of one write of one frame to one loopback client (bench/floor.py)."""
    try:
        code, out, _ = await run_bounded(
            sys.executable, "-m", "bench.floor", "--bursts", str(bench.settings.floor_bursts),
            "--hiccups", str(bench.settings.floor_hiccups), cwd=ROOT, timeout=60)
    except TimeoutError:
        raise BenchError("bench.floor did not finish within 60 s") from None
    if code != 0:
        raise BenchError(f"bench.floor exited with {code}")
    result = json.loads(out)
    bench.runs.append({"scenario": "floor", "system": "python", **result})
    log(f"  one frame to one loopback client: socket.send {result['socket_send_us']} µs, "
        f"asyncio transport.write {result['transport_write_us']} µs of CPU")
    for writer in ("python", "c", "c_2threads"):
        if f"burst_{writer}_p99_ms" in result:
            log(f"  burst to {result['burst_clients']} at 10/s by {writer}: frame written after "
                f"p50 {result[f'burst_{writer}_p50_ms']} ms, p99 {result[f'burst_{writer}_p99_ms']}"
                f" ms, {result[f'burst_{writer}_us_per_write']} µs of CPU per write")
    if "burst_c_error" in result:
        log(f"  no C writer: {result['burst_c_error']}")
    log(f"  {result['hiccup_count']} runs of {result['hiccup_p50_ms']} ms of pure CPU work: "
        f"p99 {result['hiccup_p99_ms']} ms, max {result['hiccup_max_ms']} ms, "
        f"{result['hiccup_over_2x_median_pct']} % took over twice the median")


# -- 2: ingest ---------------------------------------------------------------------------------


@dataclass
class IngestSystem:
    """One side of the ingest scenario: its own sensor, the server, what counts deliveries."""

    name: str
    sensor: Child
    server: Child
    counters: list[Child]
    probe: Probe
    setup: dict[str, Any]
    best: dict[str, Any] | None = None
    climbing: bool = True


async def _ingest_system(bench: Run, fleet: Fleet, system: str) -> IngestSystem:
    """Start `system` with a sensor of its own and observe all of that sensor's resources."""
    k = bench.settings.ingest_resources
    sensor = await start_sensor(fleet, resources=k)
    uris = [f"{sensor.ready['ready']}/r/{i}" for i in range(k)]
    udp0 = udp_counters().get("RcvbufErrors", 0)
    if system == "gateway":
        server, url = await start_gateway(fleet, sensor)
        counters = await start_loadgens(fleet, 2)
        t0 = time.monotonic()
        replies = await call_all(counters, [
            {"cmd": "connect", "url": url, "n": 5, "uris": part, "assign": "split",
             "wait_notify": True, "timeout": 60, "batch": SUBSCRIBE_BATCH}
            for part in (uris[0::2], uris[1::2])], 150)
        ready = sum(r["connected"] for r in replies) == 10
    else:
        server = await fleet.python("bare_coap", "bench.bare_coap")
        counters = [server]
        t0 = time.monotonic()
        reply = await server.call({"cmd": "observe", "uris": uris, "timeout": 60}, 90)
        ready = reply["observing"] == k
    if not ready:
        raise BenchError(f"ingest {system}: not every resource is observed")
    setup = {"setup_s": round(time.monotonic() - t0, 2),
             "registrations": (await sensor.call({"cmd": "stats"}))["registrations"],
             "setup_server_udp_drops": server.udp_drops(),
             "setup_machine_udp_rcvbuf_errors": udp_counters().get("RcvbufErrors", 0) - udp0}
    log(f"  ingest {system}: {k} resources observed in {setup['setup_s']} s "
        f"({setup['registrations']} registrations)")
    probe = Probe(server, sensor, [c for c in counters if c is not server])
    return IngestSystem(system, sensor, server, counters, probe, setup)


async def ingest(bench: Run, fleet: Fleet) -> None:
    """The gateway and the bare aiocoap client, each observing its own sensor's resources,
    stepped up through the same rates in turn (gateway, then bare, at each rate), so that
    both meet the same machine, as the fan-out windows alternate. A system stops climbing
    at its first step that loses updates twice; the other goes on alone."""
    s = bench.settings
    systems = [await _ingest_system(bench, fleet, name) for name in ("gateway", "bare_coap")]
    for rate in s.ingest_rates:
        for system in [x for x in systems if x.climbing]:
            for attempt in (1, 2):  # a failed step is tried once more: the machine is shared
                result = await _ingest_step(bench, system, rate)
                result.update(scenario="ingest", system=system.name,
                              resources=s.ingest_resources, attempt=attempt)
                bench.runs.append(result)
                log(f"  ingest {system.name} {rate}/s: share {result['share']:.3f}, "
                    f"p99 {result['p99_ms']} ms, server CPU {result['server_cpu_pct']} %, "
                    f"{result['server_udp_drops']} dropped at its socket -> "
                    f"{'ok' if result['sustained'] else 'LOSS'}")
                if result["sustained"]:
                    system.best = result
                    break
            else:
                system.climbing = False
        if not any(system.climbing for system in systems):
            break
    for system in systems:
        best = system.best
        bench.runs.append({"scenario": "ingest_best", "system": system.name, **system.setup,
                           "max_sustained_per_s": best["offered_per_s"] if best else 0.0,
                           "cpu_ms_per_1000": best["cpu_ms_per_1000"] if best else None,
                           "server_cpu_pct": best["server_cpu_pct"] if best else None})
    children: list[Child] = []
    for x in systems:
        children += [c for c in (*x.counters, x.server, x.sensor) if c not in children]
    await fleet.stop(*children)


async def _idle(server: Child, limit: float) -> float:
    """Wait until `server` uses less than a tenth of a core (its backlog is done), at most
    `limit` seconds; the seconds waited."""
    start = time.monotonic()
    last = server.cpu()
    while time.monotonic() - start < limit:
        await asyncio.sleep(0.2)
        now = server.cpu()
        if now - last < 0.02:
            break
        last = now
    return time.monotonic() - start


async def _ingest_step(bench: Run, system: IngestSystem, rate: int) -> dict[str, Any]:
    """One window of `system` at `rate`; its sensor is quiet again afterwards (and the
    server caught up), so the other system's step that follows has the machine."""
    s = bench.settings
    await system.sensor.call({"cmd": "rate", "rate": rate})
    await asyncio.sleep(s.settle)
    profile_task = None
    if s.profile and system.name == "gateway" and rate == s.ingest_rates[0]:
        profile_task = asyncio.create_task(
            _profile(system.server, s.ingest_window, f"ingest-{rate}"))
    result = await measure_window(probe=system.probe, counters=system.counters,
                                  source=system.sensor, window=s.ingest_window)
    if profile_task is not None:
        result["profile"] = await profile_task
    await system.sensor.call({"cmd": "rate", "rate": 0})
    result["quiet_s"] = round(await _idle(system.server, s.quiet_limit), 2)
    offered = result["offered_updates"]
    share = result["deliveries"] / offered if offered else 0.0
    p99 = result["p99_ms"] or math.inf
    result.update(offered_rate=rate, share=round(share, 4),
                  sustained=share >= 0.98 and p99 <= 200,
                  cpu_ms_per_1000=round(1e6 * result["server_cpu_s"] / result["deliveries"], 2)
                  if result["deliveries"] else None)
    return result


# -- 3: commands -------------------------------------------------------------------------------

COMMAND_SHAPES = (("sequential", 1, 1), ("50 in flight", 10, 50))


async def commands(bench: Run, fleet: Fleet, system: str) -> None:
    s = bench.settings
    sensor = await start_sensor(fleet)
    uri = sensor.ready["ready"] + "/r/0"
    if system == "gateway":
        server, url = await start_gateway(fleet, sensor)
        client = (await start_loadgens(fleet, 1))[0]
    else:
        server = client = await fleet.python("bare_coap", "bench.bare_coap")
    for method in ("GET", "PUT"):
        for shape, clients, inflight in COMMAND_SHAPES:
            before = server.cpu()
            if system == "gateway":
                frame: dict[str, Any] = {"type": "request", "method": method, "uri": uri}
                if method == "PUT":
                    frame["value"] = PUT_VALUE
                reply = await client.call({
                    "cmd": "requests", "url": url, "clients": clients, "inflight": inflight,
                    "duration": s.command_seconds, "frame": frame}, s.command_seconds + 30)
            else:
                reply = await client.call({
                    "cmd": "requests", "uri": uri, "method": method, "inflight": inflight,
                    "payload_hex": PUT_CBOR_HEX if method == "PUT" else "",
                    "duration": s.command_seconds}, s.command_seconds + 30)
            server_cpu = server.cpu() - before
            hist = Histogram.merged([reply["latency"]])
            result = {
                "scenario": "commands", "system": system, "method": method, "shape": shape,
                "round_trips_per_s": round(reply["round_trips"] / reply["seconds"], 1),
                **latency_fields(hist), "codes": reply["codes"], "errors": reply["errors"],
                "server_cpu_pct": round(100 * server_cpu / reply["seconds"], 1),
            }
            bench.runs.append(result)
            log(f"  commands {system} {method} {shape}: {result['round_trips_per_s']:.0f}/s, "
                f"p50 {result['p50_ms']} ms, p99 {result['p99_ms']} ms")
    await fleet.stop(*{client, server}, sensor)


# -- 4: memory ---------------------------------------------------------------------------------


async def settled_rss(child: Child, seconds: float = 1.0) -> int:
    await asyncio.sleep(seconds)
    return child.rss()


async def memory_connections(bench: Run, fleet: Fleet, system: str) -> None:
    s = bench.settings
    sensor = None
    if system == "gateway":
        sensor = await start_sensor(fleet)
        server, url = await start_gateway(fleet, sensor)
    else:
        server, url = await start_bare_ws(fleet)
    loadgens = await start_loadgens(fleet, 4 if max(s.idle_connections) > 2000 else 1)
    start = await settled_rss(server, 0.5)
    # The first connections also pay one-time costs (code paths run for the first time,
    # allocator arenas, lazily built tables); the figure is the cost of each further one.
    warm = await loadgens[0].call({"cmd": "connect", "url": url, "n": WARMUP, "uris": [],
                                   "concurrency": 50, "timeout": 60}, 120)
    base = await settled_rss(server, s.settle)
    total = warmed = warm["connected"]
    for target in s.idle_connections:
        add = target - total
        replies = await call_all(loadgens, [
            {"cmd": "connect", "url": url, "n": k, "uris": [], "concurrency": 50,
             "timeout": 60} for k in split(add, len(loadgens))], timeout=300)
        total += sum(r["connected"] for r in replies)
        rss = await settled_rss(server, s.settle)
        result = {
            "scenario": "memory_connections", "system": system, "connections": total,
            "target": target, "rss_start_mib": round(start / 2**20, 1),
            "rss_base_mib": round(base / 2**20, 1), "rss_mib": round(rss / 2**20, 1),
            "kib_per_connection": round((rss - base) / 1024 / (total - warmed), 2)
            if total > warmed else None,
            "kib_per_connection_with_first": round((rss - start) / 1024 / total, 2)
            if total else None,
        }
        bench.runs.append(result)
        log(f"  memory {system}: {total} idle connections, "
            f"{result['kib_per_connection']} KiB each after the first {warmed} "
            f"({result['kib_per_connection_with_first']} KiB with them; RSS "
            f"{result['rss_mib']} MiB)")
        if total < target:
            bench.errors.append(f"memory {system}: only {total}/{target} connections: "
                                f"{[r['errors'] for r in replies]}")
            break
    await fleet.stop(*loadgens)
    await fleet.stop(*[c for c in (server, sensor) if c is not None])


async def gateway_metric(ws_url: str, name: str) -> float | None:
    """One value from a gateway's /metrics (None when it cannot be read)."""
    import urllib.request

    page = ws_url.removesuffix("/ws").replace("ws", "http", 1) + "/metrics"

    def read() -> str:
        with urllib.request.urlopen(page, timeout=10) as answer:
            return str(answer.read().decode())

    try:
        text = await asyncio.to_thread(read)
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


async def memory_resources(bench: Run, fleet: Fleet, system: str) -> None:
    s = bench.settings
    top = max(s.observed_resources)
    sensor = await start_sensor(fleet, resources=top)
    uris = [f"{sensor.ready['ready']}/r/{i}" for i in range(top)]
    loadgen: Child | None = None
    if system == "gateway":
        server, url = await start_gateway(fleet, sensor)
        loadgen = (await start_loadgens(fleet, 1))[0]
    else:
        server = await fleet.python("bare_coap", "bench.bare_coap")
    start = await settled_rss(server, 0.5)
    # As for connections: the first few observations pay one-time costs (aiocoap resolves
    # its first address in a worker thread it starts then, for one); measured, each
    # further one.
    done = WARMUP
    connections = 0
    if loadgen is not None:
        reply = await loadgen.call(
            {"cmd": "connect", "url": url, "n": 1, "uris": uris[:WARMUP], "assign": "split",
             "wait_notify": True, "timeout": 120, "batch": SUBSCRIBE_BATCH}, 300)
        connections += reply["connected"]
        ok = reply["connected"] == 1
    else:
        reply = await server.call({"cmd": "observe", "uris": uris[:WARMUP], "timeout": 120}, 300)
        ok = reply["observing"] == WARMUP
    if not ok:
        bench.errors.append(f"memory {system}: the first {WARMUP} observations failed: {reply}")
        await fleet.stop(*[c for c in (loadgen, server, sensor) if c is not None])
        return
    base = await settled_rss(server, s.settle)
    for target in s.observed_resources:
        part = uris[done:target]
        if loadgen is not None:
            reply = await loadgen.call(
                {"cmd": "connect", "url": url, "n": 10, "uris": part, "assign": "split",
                 "wait_notify": True, "timeout": 120, "batch": SUBSCRIBE_BATCH}, 300)
            connections += reply["connected"]
            ok = reply["connected"] == 10
        else:
            reply = await server.call({"cmd": "observe", "uris": part, "timeout": 120}, 300)
            ok = reply["observing"] == len(part)
        if not ok:
            bench.errors.append(f"memory {system}: observing {target} failed: {reply}")
            break
        done = target
        rss = await settled_rss(server, s.settle)
        result = {
            "scenario": "memory_resources", "system": system, "resources": done,
            "connections": connections, "rss_start_mib": round(start / 2**20, 1),
            "rss_base_mib": round(base / 2**20, 1), "rss_mib": round(rss / 2**20, 1),
            "kib_per_resource": round((rss - base) / 1024 / (done - WARMUP), 2),
            "kib_per_resource_with_first": round((rss - start) / 1024 / done, 2),
        }
        if system == "gateway":
            # The resume history is part of each resource's cost: counted apart, from the
            # gateway's own metrics. Each resource got one notify here, which is its cached
            # latest value, not history: this reads about 0. A full history's cost is
            # measured by `bench.operations.memory_history`.
            history = await gateway_metric(url, "coap_ws_gateway_history_bytes")
            if history is not None:
                result["history_kib_per_resource"] = round(history / 1024 / done, 2)
        bench.runs.append(result)
        log(f"  memory {system}: {done} observed resources, {result['kib_per_resource']} KiB "
            f"each after the first {WARMUP} ({result['kib_per_resource_with_first']} KiB "
            f"with them; RSS {result['rss_mib']} MiB, {connections} connections)")
    await fleet.stop(*[c for c in (loadgen, server, sensor) if c is not None])


# -- 7: slow readers ------------------------------------------------------------------------


async def slow_readers(bench: Run, fleet: Fleet) -> None:
    """One resource at SLOW_UPDATE_RATE, `slow_fast_clients` full-speed clients and the slow
    readers (`bench.slow_reader`), against a gateway with its default `max_inflight_bytes`,
    then one with the bound off (0) as the baseline. The full-speed clients are measured
    alone first, then beside the slow readers for `slow_seconds`."""
    s = bench.settings
    for inflight in (DEFAULT_INFLIGHT, 0):
        bound = "off" if inflight == 0 else "on"
        sensor = await start_sensor(fleet)
        gateway, url = await start_gateway(fleet, sensor, inflight)
        uri = sensor.ready["ready"] + "/r/0"
        loadgens = await start_loadgens(fleet, 1)
        reply = await loadgens[0].call({"cmd": "connect", "url": url, "n": s.slow_fast_clients,
                                        "uris": [uri], "concurrency": 50, "timeout": 30}, 120)
        if reply["connected"] < s.slow_fast_clients:
            raise BenchError(f"slow readers: only {reply['connected']} full-speed clients "
                             f"connected: {reply['errors']}")
        await sensor.call({"cmd": "rate", "rate": SLOW_UPDATE_RATE})
        await asyncio.sleep(s.warmup)
        probe = Probe(gateway, sensor, loadgens)
        base = {"scenario": "slow_readers", "system": "gateway", "bound": bound,
                "offered_rate": SLOW_UPDATE_RATE, "fast_clients": s.slow_fast_clients}
        if bound == "on":
            alone = await measure_window(probe=probe, counters=loadgens, source=sensor,
                                         window=s.slow_alone_seconds)
            bench.runs.append({**base, "phase": "alone", **alone})
            log(f"  bound {bound}, {s.slow_fast_clients} full-speed clients alone: p50 "
                f"{alone['p50_ms']} ms, p99 {alone['p99_ms']} ms")
        slow = await fleet.python("slow_reader", "bench.slow_reader")
        await slow.call({"cmd": "connect", "url": url, "uri": uri, "rates": list(s.slow_rates),
                         "rcvbuf": SLOW_CLIENT_RCVBUF}, 60)
        await slow.call({"cmd": "start"})
        beside = await measure_window(probe=probe, counters=loadgens, source=sensor,
                                      window=s.slow_seconds)
        ages = await slow.call({"cmd": "stop", "window": s.slow_window}, 30)
        bench.runs.append({**base, "phase": "with slow readers", **beside,
                           "slow_clients": ages["clients"]})
        log(f"  bound {bound}, full-speed clients beside {len(s.slow_rates)} slow readers: "
            f"p50 {beside['p50_ms']} ms, p99 {beside['p99_ms']} ms, closed "
            f"{beside['closed_clients']}")
        for rate, windows, closed in _slow_rows(ages["clients"]):
            log(f"    reading {rate:g}/s: age p50/p99 per {s.slow_window:g} s: "
                + ", ".join(f"{p50:.2f}/{p99:.2f}" for p50, p99 in windows)
                + (f"; closed: {closed}" if closed else ""))
        await sensor.call({"cmd": "rate", "rate": 0})
        await fleet.stop(slow, *loadgens)
        await fleet.stop(gateway, sensor)


async def bandwidth(bench: Run, fleet: Fleet) -> None:
    s = bench.settings
    result = await bandwidth_scenario.run(
        s.bandwidth_clients, rate=10.0, window=s.bandwidth_window, updates=40,
        cpu_payloads=("cbor_number", "json_1k"), fleet=fleet)
    for row in result["bytes"]:
        bench.runs.append({"scenario": "bandwidth_bytes", **row})
        log(f"  {row['payload']}: CoAP {row['coap_bytes']} B/update; " + ", ".join(
            f"{mode} {row[f'{mode}_bytes']} B ({row[f'{mode}_ratio']} x)"
            for mode in bandwidth_scenario.MODES))
    for row in result["cpu"]:
        bench.runs.append({"scenario": "bandwidth_cpu", **row})
        log(f"  {row['payload']} {row['mode']} N={row['clients']}: "
            f"{row['cpu_us_per_frame']} us/frame, {row['frames']}/{row['expected_frames']} "
            f"frames")
    memory = result["memory"]
    bench.runs.append({"scenario": "bandwidth_memory", **memory})
    log(f"  RSS per connection: plain {memory['plain_bytes_per_connection']} B, with deflate "
        f"{memory['deflate_bytes_per_connection']} B")


def _slow_rows(
    clients: list[dict[str, Any]],
) -> list[tuple[float, list[tuple[float, float]], str]]:
    """Per read rate: the worst p50 and p99 age over its clients in each window, and why
    any of them was closed."""
    rows = []
    for rate in sorted({c["rate"] for c in clients}, reverse=True):
        group = [c for c in clients if c["rate"] == rate]
        count = max((len(c["windows"]) for c in group), default=0)
        windows = []
        for i in range(count):
            parts = [c["windows"][i] for c in group if len(c["windows"]) > i]
            windows.append((max(w["p50_s"] for w in parts), max(w["p99_s"] for w in parts)))
        closed = "; ".join(sorted({c["closed"] for c in group if c["closed"]}))
        rows.append((rate, windows, closed))
    return rows


def slow_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures the slow readers' targets are about."""
    out: dict[str, Any] = {}
    alone = _find(runs, scenario="slow_readers", bound="on", phase="alone")
    for bound in ("on", "off"):
        beside = _find(runs, scenario="slow_readers", bound=bound, phase="with slow readers")
        if beside is None:
            continue
        for rate, windows, closed in _slow_rows(beside["slow_clients"]):
            later = [p50 for p50, _ in windows[1:]]  # from the end of the first window
            out[f"bound {bound}, reading {rate:g}/s"] = {
                "p50_after_first_window_s": max(later) if later else None,
                "p50_growth_s": round(later[-1] - later[0], 3) if len(later) > 1 else None,
                "closed": closed,
            }
        if alone is not None and bound == "on":
            out["full-speed p99 beside slow readers / alone"] = _ratio(beside["p99_ms"],
                                                                       alone["p99_ms"])
    return out


# -- the summary: ratios and targets -----------------------------------------------------------


async def resource_directory(bench: Run, fleet: Fleet, system: str) -> None:
    bench.runs.append(await rd_bench.measure(fleet, system, bench.settings.rd_registrations))


def _find(runs: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    for run in runs:
        if all(run.get(k) == v for k, v in match.items()):
            return run
    return None


FANOUT_MEANS = ("deliveries_per_s", "share", "p50_ms", "p99_ms", "cpu_us_per_delivery",
                "server_cpu_pct", "loadgen_cpu_pct", "other_cpu_pct")


def fanout_mean(runs: list[dict[str, Any]], system: str, n: int,
                phase: str) -> dict[str, Any] | None:
    """The mean over a fan-out phase's rounds (windows) for one system."""
    rows = [r for r in runs if r.get("scenario") == "fanout" and r["system"] == system
            and r["n"] == n and r["phase"] == phase]
    if not rows:
        return None
    out: dict[str, Any] = {"system": system, "n": n, "phase": phase, "rounds": len(rows)}
    for key in FANOUT_MEANS:
        values = [r[key] for r in rows if r.get(key) is not None]
        out[key] = round(statistics.mean(values), 3) if values else None
    if "admission" in rows[0]:
        out["admission"] = rows[0]["admission"]
    return out


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, 3)


def summarize(bench: Run) -> dict[str, Any]:
    runs = bench.runs
    s = bench.settings
    ratios: dict[str, Any] = {}
    for n in s.fanout_ns:
        for phase in ("saturated", "10hz", "overload2x", "flood10x", "admission"):
            gw = fanout_mean(runs, "gateway", n, phase)
            bare = fanout_mean(runs, "bare_ws", n, phase)
            if gw and bare:
                ratios[f"fanout N={n} {phase}"] = {
                    "deliveries_per_s": _ratio(gw["deliveries_per_s"], bare["deliveries_per_s"]),
                    "p50_latency": _ratio(gw["p50_ms"], bare["p50_ms"]),
                    "p99_latency": _ratio(gw["p99_ms"], bare["p99_ms"]),
                    "cpu_per_delivery": _ratio(gw["cpu_us_per_delivery"],
                                               bare["cpu_us_per_delivery"]),
                    "share": _ratio(gw.get("share"), bare.get("share")),
                }
                if phase == "admission":
                    ga, ba = gw.get("admission", {}), bare.get("admission", {})
                    ratios[f"fanout N={n} admission"]["all_handshaken"] = _ratio(
                        ga.get("all_handshaken_s"), ba.get("all_handshaken_s"))
    gi = _find(runs, scenario="ingest_best", system="gateway")
    bi = _find(runs, scenario="ingest_best", system="bare_coap")
    if gi and bi:
        ratios["ingest"] = {
            "max_sustained": _ratio(gi["max_sustained_per_s"], bi["max_sustained_per_s"]),
            "cpu_per_1000": _ratio(gi["cpu_ms_per_1000"], bi["cpu_ms_per_1000"]),
        }
        # CPU per notification falls as the rate rises (fixed costs spread): compare it also
        # at the highest rate both sustained.
        sustained = {system: {r["offered_rate"]: r for r in runs if r.get("scenario") == "ingest"
                              and r["system"] == system and r["sustained"]}
                     for system in ("gateway", "bare_coap")}
        common = sorted(set(sustained["gateway"]) & set(sustained["bare_coap"]))
        if common:
            rate = common[-1]
            ratios["ingest"]["same_rate"] = rate
            ratios["ingest"]["cpu_per_1000_at_same_rate"] = _ratio(
                sustained["gateway"][rate]["cpu_ms_per_1000"],
                sustained["bare_coap"][rate]["cpu_ms_per_1000"])
    for method in ("GET", "PUT"):
        for shape, _, _ in COMMAND_SHAPES:
            gw = _find(runs, scenario="commands", system="gateway", method=method, shape=shape)
            bare = _find(runs, scenario="commands", system="bare_coap", method=method,
                         shape=shape)
            if gw and bare:
                ratios[f"commands {method} {shape}"] = {
                    "round_trips_per_s": _ratio(gw["round_trips_per_s"],
                                                bare["round_trips_per_s"]),
                    "p50_latency": _ratio(gw["p50_ms"], bare["p50_ms"]),
                    "p99_latency": _ratio(gw["p99_ms"], bare["p99_ms"]),
                }
    for count in s.idle_connections:
        gw = _find(runs, scenario="memory_connections", system="gateway", target=count)
        bare = _find(runs, scenario="memory_connections", system="bare_ws", target=count)
        if gw and bare:
            ratios[f"memory per idle connection at {count}"] = _ratio(
                gw["kib_per_connection"], bare["kib_per_connection"])
    for count in s.observed_resources:
        gw = _find(runs, scenario="memory_resources", system="gateway", resources=count)
        bare = _find(runs, scenario="memory_resources", system="bare_coap", resources=count)
        if gw and bare:
            ratios[f"memory per observed resource at {count}"] = _ratio(
                gw["kib_per_resource"], bare["kib_per_resource"])
    gw = _find(runs, scenario="rd", system="gateway")
    bare = _find(runs, scenario="rd", system="aiocoap_rd")
    if gw and bare:
        ratios["resource directory"] = {
            "registrations_per_s": _ratio(gw["registrations_per_s"], bare["registrations_per_s"]),
            "updates_per_s": _ratio(gw["updates_per_s"], bare["updates_per_s"]),
            "bytes_per_registration": _ratio(gw["bytes_per_registration"],
                                             bare["bytes_per_registration"]),
        }
    means = [m for n in s.fanout_ns
             for phase in ("10hz", "saturated", "overload2x", "flood10x", "admission")
             for system in ("gateway", "bare_ws")
             if (m := fanout_mean(runs, system, n, phase)) is not None]
    slow = slow_summary(runs)
    from . import operations  # it imports this module

    ratios.update(operations.summary(runs))
    return {"fanout_means": means, "ratios": ratios, "slow_readers": slow,
            "targets": targets(bench, ratios, slow) + operations.targets(ratios)}


def targets(bench: Run, ratios: dict[str, Any],
            slow: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    runs = bench.runs
    out: list[dict[str, Any]] = []

    def target(name: str, bound: str, value: Any, holds: bool | None) -> None:
        out.append({"target": name, "bound": bound, "value": value, "holds": holds})

    r = ratios.get("fanout N=1000 saturated", {}).get("deliveries_per_s")
    target("fan-out N=1000 deliveries/s vs bare broadcast", ">= 1.00 x", r,
           None if r is None else r >= 1.0)
    gw = fanout_mean(runs, "gateway", 1000, "overload2x")
    v = gw["p99_ms"] if gw else None
    target("p99 latency, N=1000, sensor offering 2x capacity", "<= 50 ms", v,
           None if v is None else v <= 50)
    gw = fanout_mean(runs, "gateway", 1000, "10hz")
    v = gw["p99_ms"] if gw else None
    target("p99 latency, N=1000 x 10 updates/s", "<= 10 ms", v, None if v is None else v <= 10)
    gw = fanout_mean(runs, "gateway", 1000, "admission")
    adm = gw.get("admission") if gw else None
    v = adm["all_handshaken_s"] if adm else None
    target("1000 new handshakes while fan-out saturates", "<= 2 s", v,
           None if v is None or adm is None else (v <= 2 and adm["failed"] == 0))
    gw = fanout_mean(runs, "gateway", 1000, "saturated")
    v = gw["cpu_us_per_delivery"] if gw else None
    target("gateway CPU per delivered frame, N=1000", "<= 3 us", v,
           None if v is None else v <= 3)
    for count in (1000, 10_000):
        m = _find(runs, scenario="memory_connections", system="gateway", target=count)
        v = m["kib_per_connection"] if m and m["connections"] == count else None
        target(f"RSS per idle connection at {count}", "<= 16 KiB", v,
               None if v is None else v <= 16)
    for count in (1000, 10_000):
        m = _find(runs, scenario="memory_resources", system="gateway", resources=count)
        v = m["kib_per_resource"] if m else None
        target(f"RSS per observed resource at {count}", "<= 8 KiB", v,
               None if v is None else v <= 8)
    r = ratios.get("ingest", {}).get("max_sustained")
    target("ingest vs bare aiocoap observe rate", ">= 0.80 x", r, None if r is None else r >= 0.8)
    r = ratios.get("fanout N=1000 flood10x", {}).get("p99_latency")
    target("p99 latency, N=1000, sensor offering 10x capacity, vs bare broadcast", "<= 3 x", r,
           None if r is None else r <= 3)
    for row in (r for r in runs if r.get("scenario") == "bandwidth_bytes"):
        for mode, bound in bandwidth_scenario.TARGETS.items():
            v = row.get(f"{mode}_ratio")
            target(f"bytes per update, {row['payload']}, {mode} vs the CoAP notification",
                   f"<= {bound} x", v, None if v is None else v <= bound)
    slow = slow or {}
    quarter = slow.get(f"bound on, reading {SLOW_UPDATE_RATE / 4:g}/s", {})
    v = quarter.get("p50_after_first_window_s")
    target("slow reader at 1/4 of the rate: age p50 after the first window", "<= 1 s", v,
           None if v is None else v <= 1 and not quarter.get("closed"))
    v = quarter.get("p50_growth_s")
    target("slow reader at 1/4 of the rate: age p50 growth, 2nd to last window", "<= 0.2 s",
           v, None if v is None else v <= 0.2)
    v = slow.get("full-speed p99 beside slow readers / alone")
    target("full-speed clients' p99 beside slow readers vs alone", "<= 1.10 x", v,
           None if v is None else v <= 1.1)
    return out


# -- output ------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float):
        if value >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if value < 10 else f"{value:.1f}"
    return str(value)


def text_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True)))
              for row in cells]
    return "\n".join(lines)


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def report(result: dict[str, Any], markdown: bool = False) -> str:
    """The tables, as text for the terminal or as Markdown (bench/results/latest.md)."""
    runs = result["runs"]
    parts: list[str] = []
    table = md_table if markdown else text_table

    def head(title: str) -> str:
        return f"#### {title}\n\n" if markdown else f"{title}\n"

    if markdown:
        parts.append(f"{result['meta']['mode']} run of {result['meta']['date']}, commit "
                     f"{result['meta']['commit']}, {result['meta']['seconds']} s, load average "
                     f"at start {result['meta']['loadavg_at_start']}")
    fan = [r for r in runs if r.get("scenario") == "fanout"]
    if fan:
        parts.append(head("Fan-out, every window (one resource, N clients)") + table(
            ["system", "N", "phase", "#", "offered/s", "deliv/s", "share", "p50 ms", "p99 ms",
             "srv CPU%", "µs/deliv", "sensor%", "loadgen%", "softirq%", "other%", "drops",
             "UDP q KiB", "TCP q KiB", "client q KiB", "closed"],
            [[r["system"], r["n"], r["phase"], r.get("round"), r["offered_per_s"],
              r["deliveries_per_s"],
              r.get("share"), r["p50_ms"], r["p99_ms"], r["server_cpu_pct"],
              r["cpu_us_per_delivery"], r["sensor_cpu_pct"], r["loadgen_cpu_pct"],
              r.get("softirq_cpu_pct"), r["other_cpu_pct"], r.get("server_udp_drops"),
              r.get("end_server_udp_rx_kib"), r.get("end_server_tcp_tx_kib"),
              r.get("end_clients_tcp_rx_kib"), r["closed_clients"]]
             for r in fan]))
        means = result["summary"]["fanout_means"]
        parts.append(head("Fan-out, mean of the rounds") + table(
            ["system", "N", "phase", "rounds", "deliv/s", "share", "p50 ms", "p99 ms",
             "srv CPU%", "µs/deliv", "other%"],
            [[m["system"], m["n"], m["phase"], m["rounds"], m["deliveries_per_s"], m["share"],
              m["p50_ms"], m["p99_ms"], m["server_cpu_pct"], m["cpu_us_per_delivery"],
              m["other_cpu_pct"]] for m in means]))
        adm = [r for r in fan if "admission" in r]
        if adm:
            parts.append(head("Admission (new clients while fan-out saturates)") + table(
                ["system", "N", "new", "connected", "all handshaken s", "all subscribed s",
                 "handshake p50 ms", "p99 ms"],
                [[r["system"], r["n"], r["admission"]["clients"], r["admission"]["connected"],
                  r["admission"]["all_handshaken_s"], r["admission"]["all_subscribed_s"],
                  r["admission"]["handshake_p50_ms"], r["admission"]["handshake_p99_ms"]]
                 for r in adm]))
        splits = [r for r in fan if "shares" in r.get("cpu_split", {})]
        if splits:
            def part(r: dict[str, Any], category: str) -> str:
                share = r["cpu_split"]["shares"][category]
                return f"{r['cpu_us_per_delivery'] * share / 100:.2f} ({share} %)"

            parts.append(head("Where the gateway's CPU per delivery goes (perf, --profile)")
                         + table(
                ["category", *(f"N={r['n']} {r['phase']}: µs ({r['cpu_split']['samples']} "
                               "samples)" for r in splits)],
                [[category, *(part(r, category) for r in splits)]
                 for category in cpu_split.CATEGORIES]
                + [["total µs per delivery", *(r["cpu_us_per_delivery"] for r in splits)]]))
    floors = [r for r in runs if r.get("scenario") == "floor"]
    if floors:
        parts.append(head("Floor: CPU of one write of one frame to one loopback client") + table(
            ["frame bytes", "clients", "socket.send µs", "transport.write µs"],
            [[r["frame_bytes"], r["clients"], r["socket_send_us"], r["transport_write_us"]]
             for r in floors]))
        parts.append(head(
            "Floor: one update's writes to 1000 clients at 10 updates/s, no gateway") + table(
            ["writer", "bursts", "frame written after p50 ms", "p99 ms", "p99.9 ms",
             "burst length p90 ms", "CPU µs per write"],
            [[writer, r.get("burst_count"), r.get(f"burst_{writer}_p50_ms"),
              r.get(f"burst_{writer}_p99_ms"), r.get(f"burst_{writer}_p999_ms"),
              r.get(f"burst_{writer}_last_p90_ms"), r.get(f"burst_{writer}_us_per_write")]
             for r in floors for writer in ("python", "c", "c_2threads")
             if f"burst_{writer}_p50_ms" in r]))
        parts.append(head("Floor: the same pure-CPU work (a Python loop, no system call), "
                          "repeated") + table(
            ["runs", "p50 ms", "p99 ms", "max ms", "% over twice the median"],
            [[r.get("hiccup_count"), r.get("hiccup_p50_ms"), r.get("hiccup_p99_ms"),
              r.get("hiccup_max_ms"), r.get("hiccup_over_2x_median_pct")] for r in floors]))
    byte_rows = [r for r in runs if r.get("scenario") == "bandwidth_bytes"]
    if byte_rows:
        modes = list(bandwidth_scenario.MODES)
        parts.append(head("Bandwidth: bytes per update, CoAP notification vs WebSocket message "
                          "with its frame header (ratio)") + table(
            ["payload", "CoAP B", *modes],
            [[r["payload"], r["coap_bytes"],
              *(f"{r[f'{m}_bytes']} ({r[f'{m}_ratio']}x)" for m in modes)]
             for r in byte_rows]))
    cpu_rows = [r for r in runs if r.get("scenario") == "bandwidth_cpu"]
    if cpu_rows:
        parts.append(head("Bandwidth: gateway CPU per delivered frame, one mode at a time")
                     + table(
            ["payload", "mode", "clients", "updates/s", "frames", "CPU us/frame", "srv CPU%"],
            [[r["payload"], r["mode"], r["clients"], r["rate"],
              f"{r['frames']}/{r['expected_frames']}", r["cpu_us_per_frame"],
              r["server_cpu_pct"]] for r in cpu_rows]))
    for r in (r for r in runs if r.get("scenario") == "bandwidth_memory"):
        parts.append(head("Bandwidth: gateway RSS per connection") + table(
            ["clients per group", "plain B", "with deflate B", "deflate's extra B"],
            [[r["clients"], r["plain_bytes_per_connection"], r["deflate_bytes_per_connection"],
              r["deflate_extra_bytes_per_connection"]]]))
    slow_runs = [r for r in runs if r.get("scenario") == "slow_readers"]
    if slow_runs:
        parts.append(head(f"Slow readers: full-speed clients ({SLOW_UPDATE_RATE:g} updates/s)")
                     + table(
            ["bound", "phase", "clients", "window s", "deliv/s", "p50 ms", "p99 ms", "srv CPU%",
             "closed"],
            [[r["bound"], r["phase"], r["fast_clients"], r["window_s"], r["deliveries_per_s"],
              r["p50_ms"], r["p99_ms"], r["server_cpu_pct"], r["closed_clients"]]
             for r in slow_runs]))
        rows = []
        for r in slow_runs:
            for rate, windows, closed in _slow_rows(r.get("slow_clients", [])):
                group = [c for c in r["slow_clients"] if c["rate"] == rate]
                steps = [c["mean_seq_step"] for c in group if c["mean_seq_step"] is not None]
                rows.append([r["bound"], rate, len(group),
                             round(statistics.mean(steps), 1) if steps else None,
                             " ".join(f"{p50:.2f}/{p99:.2f}" for p50, p99 in windows),
                             closed or "-"])
        parts.append(head("Slow readers: age of the values they read, worst client's p50/p99 s "
                          "per window") + table(
            ["bound", "reads/s", "clients", "mean seq step", "p50/p99 s per window", "closed"],
            rows))
    cond_rows = conditions.cond_rows(runs)
    if cond_rows:
        cond_run = [r for r in runs if r.get("scenario") == "cond"][-1]
        parts.append(head(
            f"Conditional notifications: one {conditions.SENSOR_RATE:g} Hz resource, "
            f"{cond_run['clients_per_group']} clients per group, gateway CPU "
            f"{cond_run['gateway_cpu_s_per_s'] * 100:.1f} % of a core for all of them")
            + table(conditions.COND_HEADERS, cond_rows))
    ing = [r for r in runs if r.get("scenario") == "ingest_best"]
    if ing:
        parts.append(head("Ingest (1000 observed resources)") + table(
            ["system", "max sustained notif/s", "CPU ms / 1000", "server CPU%"],
            [[r["system"], r["max_sustained_per_s"], r["cpu_ms_per_1000"],
              r["server_cpu_pct"]] for r in ing]))
    cmd = [r for r in runs if r.get("scenario") == "commands"]
    if cmd:
        parts.append(head("Commands (request round trips)") + table(
            ["system", "method", "shape", "round trips/s", "p50 ms", "p99 ms", "srv CPU%"],
            [[r["system"], r["method"], r["shape"], r["round_trips_per_s"], r["p50_ms"],
              r["p99_ms"], r["server_cpu_pct"]] for r in cmd]))
    mem = [r for r in runs if r.get("scenario", "").startswith("memory")]
    if mem:
        parts.append(head("Memory (RSS growth)") + table(
            ["system", "what", "count", "RSS MiB", "KiB each", "KiB each with the first 10"],
            [[r["system"], "idle connection" if "connections" in r["scenario"] else
              "observed resource", r.get("target", r.get("resources")), r["rss_mib"],
              r.get("kib_per_connection", r.get("kib_per_resource")),
              r.get("kib_per_connection_with_first", r.get("kib_per_resource_with_first"))]
             for r in mem]))
    directory = [r for r in runs if r.get("scenario") == "rd"]
    if directory:
        parts.append(head("Resource directory (4 links per registration)") + table(
            ["system", "registrations", "registrations/s", "updates/s", "bytes/registration",
             "srv CPU ms/registration"],
            [[r["system"], r["registered"], r["registrations_per_s"], r["updates_per_s"],
              r["bytes_per_registration"], r.get("cpu_ms_per_registration")]
             for r in directory]))
    from . import operations  # it imports this module

    parts += operations.report_parts(runs, table, head)
    ratios = result["summary"]["ratios"]
    if ratios:
        rows = []
        for name, value in ratios.items():
            if isinstance(value, dict):
                rows += [[name, k, v] for k, v in value.items() if v is not None]
            else:
                rows.append([name, "", value])
        parts.append(head("Gateway / baseline ratios") + table(["what", "figure", "ratio"], rows))
    parts.append(head("Targets") + table(
        ["target", "bound", "measured", "holds"],
        [[t["target"], t["bound"], t["value"], t["holds"]] for t in result["summary"]["targets"]]))
    if result["errors"]:
        parts.append(head("Errors") + "\n".join(result["errors"]))
    return "\n\n".join(parts)


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["summary"]["fanout_means"]
    fan = [r for r in runs if r["phase"] == "saturated"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.4))
    styles = {"gateway": ("tab:blue", "o", "gateway"),
              "bare_ws": ("tab:gray", "s", "bare websockets broadcast")}
    for system, (color, marker, label) in styles.items():
        rows = sorted((r for r in fan if r["system"] == system), key=lambda r: r["n"])
        if not rows:
            continue
        ns = [r["n"] for r in rows]
        ax1.plot(ns, [r["deliveries_per_s"] for r in rows], marker=marker, color=color,
                 label=label)
        ax2.plot(ns, [r["p99_ms"] or float("nan") for r in rows], marker=marker,
                 color=color, label=f"{label}, saturating")
        for phase, point, what in (("overload2x", "^", "2x capacity"),
                                   ("10hz", "v", "10 updates/s")):
            extra = [r for r in runs if r["system"] == system and r["phase"] == phase]
            if extra:
                ax2.scatter([r["n"] for r in extra], [r["p99_ms"] or float("nan")
                                                      for r in extra],
                            marker=point, color=color, label=f"{label}, {what}", zorder=3)
    ax2.axhline(50, color="tab:red", linestyle="--", linewidth=0.8, label="targets: 50 ms, 10 ms")
    ax2.axhline(10, color="tab:red", linestyle="--", linewidth=0.8)
    all_ns = sorted({r["n"] for r in runs})
    for ax in (ax1, ax2):
        ax.set_xscale("log")
        ax.set_xticks(all_ns, [str(n) for n in all_ns])
        ax.set_xlabel("subscribed clients (N)")
        ax.grid(True, which="both", alpha=0.3)
    if ax1.get_legend_handles_labels()[0]:  # a run of other scenarios draws no fan-out
        ax1.legend(fontsize=8)
    ax2.legend(fontsize=7)
    ax1.set_ylabel("deliveries/s (all clients)")
    ax1.set_title("Fan-out throughput, sensor saturating")
    ax2.set_yscale("log")
    ax2.set_ylabel("p99 sensor→client latency (ms)")
    ax2.set_title("p99 sensor→client latency")
    meta = result["meta"]
    fig.suptitle(f"coap-ws-gateway fan-out ({meta['mode']} run, {meta['date']}, "
                 f"{meta['cpus']} CPUs)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# -- main --------------------------------------------------------------------------------------


async def run_all(bench: Run, log_dir: Path) -> None:
    s = bench.settings
    plan: list[tuple[str, Callable[[Fleet], Awaitable[None]]]] = []
    if "fanout" in s.scenarios:
        plan.append(("syscall floor", partial(floor, bench)))
        for n in s.fanout_ns:
            phases = ["saturated"]
            if n == 1000:
                phases = ["10hz", "saturated", "overload2x", "flood10x"]
                if s.admission_clients:
                    phases.append("admission")
            plan.append((f"fan-out N={n}", partial(fanout, bench, n=n, phases=phases)))
    if "ingest" in s.scenarios:
        plan.append(("ingest", partial(ingest, bench)))
    if "commands" in s.scenarios:
        for system in ("gateway", "bare_coap"):
            plan.append((f"commands {system}", partial(commands, bench, system=system)))
    if "memory" in s.scenarios:
        for system in ("gateway", "bare_ws"):
            plan.append((f"memory connections {system}",
                         partial(memory_connections, bench, system=system)))
        for system in ("gateway", "bare_coap"):
            plan.append((f"memory resources {system}",
                         partial(memory_resources, bench, system=system)))
    if "slow" in s.scenarios:
        plan.append(("slow readers", partial(slow_readers, bench)))
    if "rd" in s.scenarios:
        for system in ("gateway", "aiocoap_rd"):
            plan.append((f"resource directory {system}",
                         partial(resource_directory, bench, system=system)))
    from . import operations  # it imports this module

    # Not in a quick run (under a minute) unless asked for: `--quick --only history`.
    if "history" in s.scenarios or ("memory" in s.scenarios and s.mode == "full"):
        plan.append(("history memory", partial(operations.memory_history, bench)))
    if "metrics" in s.scenarios:
        plan.append(("metrics cost", partial(operations.metrics_cost, bench)))
    if "cond" in s.scenarios:
        plan.append(("conditional notifications", partial(conditions.conditions, bench)))
    if "bandwidth" in s.scenarios:
        plan.append(("bandwidth", partial(bandwidth, bench)))
    if "cluster" in s.scenarios:
        from .cluster import cluster

        plan.append(("cluster", partial(cluster, bench)))
    for name, step in plan:
        log(name)
        async with Fleet(log_dir / name.replace(" ", "_").replace("=", "")) as fleet:
            try:
                await step(fleet)
            except BenchError as exc:
                bench.errors.append(f"{name}: {exc}")
                log(f"  FAILED: {exc}")


async def main_async(args: argparse.Namespace) -> int:
    settings = Settings.for_mode(args)
    out = Path(args.out) if args.out else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    log_dir = Path(tempfile.mkdtemp(prefix="coap-ws-bench-"))
    bench = Run(settings)
    started = time.monotonic()
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    log(f"{settings.mode} run, budget {settings.budget:g} s, logs in {log_dir}")
    incomplete = False
    try:
        async with asyncio.timeout(settings.budget):
            await run_all(bench, log_dir)
    except TimeoutError:
        incomplete = True
        bench.errors.append(f"time budget of {settings.budget:g} s exceeded; results partial")
    result: dict[str, Any] = {
        "meta": {
            "mode": settings.mode,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "commit": _git_commit(),
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "loadavg_at_start": load_at_start,
            "seconds": round(time.monotonic() - started, 1),
            "incomplete": incomplete,
            "settings": {k: v for k, v in vars(settings).items()},
        },
        "runs": bench.runs,
        "errors": bench.errors,
    }
    result["summary"] = summarize(bench)
    path = out / "latest.json"
    path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print()
    print(report(result))
    print(f"\nwrote {path}")
    (out / "latest.md").write_text(report(result, markdown=True) + "\n")
    if settings.chart:
        chart_path = out / "latest.png"
        try:
            chart(result, chart_path)
            print(f"wrote {chart_path}")
        except ImportError:
            print("matplotlib is missing (pip install -e '.[bench]'): no chart", file=sys.stderr)
            return 1
    if not bench.errors:
        shutil.rmtree(log_dir, ignore_errors=True)
    else:
        print(f"child logs kept in {log_dir}", file=sys.stderr)
    return 1 if bench.errors else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller and shorter: < 1 min")
    parser.add_argument("--large", action="store_true", help="also fan-out at N = 5000")
    parser.add_argument("--smoke", action="store_true",
                        help="one tiny fan-out (N = 2) for the test suite")
    parser.add_argument("--only", action="append",
                        choices=["fanout", "ingest", "commands", "memory", "slow", "rd",
                                 "metrics", "history", "cond",
                                 "bandwidth", "cluster"],
                        help="run only this scenario (repeatable)")
    parser.add_argument("--out", help="directory for latest.json and latest.png "
                        "(default bench/results)")
    parser.add_argument("--budget", type=float, help="seconds the whole run may take")
    parser.add_argument("--profile", action="store_true",
                        help="py-spy the gateway during the largest saturated fan-out")
    parser.add_argument("--no-chart", action="store_true")
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        return asyncio.run(main_async(args))
    return 130


if __name__ == "__main__":
    sys.exit(main())
