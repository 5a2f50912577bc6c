"""The operator's side of `make bench` (issue 14 §5): what metrics cost the fan-out, and what
the resume history costs per resource.

* ``metrics`` scenario: the gateway's metrics are always "on": its counters are plain
  integers bumped once per event (never per subscriber) and read only when /metrics is
  scraped, so there is no "metrics off" build to compare with. What can cost something is
  the scrape. So one gateway, N = 1000 clients of one resource, the sensor offering more
  than can be delivered (as the saturated fan-out), measured in alternating windows with no
  scraper, with a scraper reading /metrics once a second (a usual Prometheus interval is
  15 s: this is 15 times that), and ten times a second. The ratios scraped / unscraped of
  deliveries per second and of the gateway's CPU per delivery are the metrics' cost.
* ``memory`` scenario, ``memory_history``: R observed resources each updated more than
  ``[history] size`` (32) times, so that every resource's history is full; the history's
  own accounting (``coap_ws_gateway_history_bytes``) and the RSS growth while it filled,
  per resource, with the size of a notify frame for reference.

Imported lazily by `bench.run` (which this module imports).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
import urllib.request
from typing import Any

from websockets.asyncio.client import connect

from translator.core.history import ENTRY_OVERHEAD, RESOURCE_OVERHEAD

from .procs import BenchError, Fleet
from .run import (
    SATURATING_DELIVERIES,
    SUBSCRIBE_BATCH,
    Run,
    _quiet,
    _setup_fanout,
    gateway_config,
    gateway_metric,
    log,
    measure_window,
    offered_updates,
    settled_rss,
    start_loadgens,
    start_sensor,
)

METRICS_N = 1000
SCRAPE_PHASES = {"no scraper": None, "scraped 1/s": 1.0, "scraped 10/s": 0.1}
"""Windows of the metrics scenario, by name: seconds between two scrapes (None: none)."""
COMPUTED = "metrics scraped 1/s: the scrapes' CPU / the fan-out's"
HISTORY_RSS = "history: RSS bytes per resource, full history - none"
HISTORY_ACCOUNTED = "history: bytes per resource, as history_bytes counts them"
SCRAPES = 100
"""Scrapes in a row that measure one scrape's CPU cost."""
HISTORY_SIZE = 32
"""The default `[history] size`, which the bench gateway runs with."""
MAX_HISTORY_ROUNDS = 4
HISTORY_RATE = 5000.0
"""Updates per second the sensor offers while the histories fill (well within ingest)."""


def metrics_page(ws_url: str) -> str:
    return ws_url.removesuffix("/ws").replace("ws", "http", 1) + "/metrics"


def _scrape_once(page: str) -> int:
    with urllib.request.urlopen(page, timeout=10) as answer:
        return len(answer.read())


def scraper(page: str, interval: float, window: float) -> Any:
    """A `during` for measure_window: GET /metrics every `interval` seconds for `window`."""

    async def scrape() -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        end = loop.time() + window
        took: list[float] = []
        size = 0
        while loop.time() < end:
            started = loop.time()
            size = await asyncio.to_thread(_scrape_once, page)
            took.append(loop.time() - started)
            await asyncio.sleep(max(0.0, min(started + interval, end) - loop.time()))
        return {"scrapes": len(took), "scrape_ms_p50": round(1000 * statistics.median(took), 2),
                "scrape_bytes": size}

    return scrape


async def metrics_cost(bench: Run, fleet: Fleet) -> None:
    """Alternating windows (no scraper, 1/s, 10/s, then again) on one gateway."""
    s = bench.settings
    n = METRICS_N
    window = max(s.window, 2.0)
    pairs = 3 if s.mode == "quick" else 5
    system = await _setup_fanout(fleet, "gateway", n, admission=False)
    page = metrics_page(system.url)
    # First, what one scrape costs the gateway with N clients connected and nothing else to
    # do: its CPU time over SCRAPES scrapes in a row.
    cpu_before = system.server.cpu()
    started = time.monotonic()
    for _ in range(SCRAPES):
        size = await asyncio.to_thread(_scrape_once, page)
    cpu = system.server.cpu() - cpu_before
    scrape = {"scenario": "metrics_scrape", "system": "gateway", "n": n, "scrapes": SCRAPES,
              "scrape_bytes": size, "gateway_cpu_ms_per_scrape": round(1000 * cpu / SCRAPES, 3),
              "wall_ms_per_scrape": round(1000 * (time.monotonic() - started) / SCRAPES, 3)}
    bench.runs.append(scrape)
    log(f"  metrics N={n}: a scrape ({size} bytes) costs the gateway "
        f"{scrape['gateway_cpu_ms_per_scrape']} ms of CPU")
    rate = SATURATING_DELIVERIES / n
    for round_number in range(1, pairs + 1):
        # The order alternates from round to round, so that a drift of the machine's load
        # over the run does not favour one phase.
        order = list(SCRAPE_PHASES.items())
        for phase, interval in order if round_number % 2 else order[::-1]:
            await system.source.call({"cmd": "rate", "rate": rate})
            await asyncio.sleep(s.warmup)
            during = None if interval is None else scraper(page, interval, window)
            result = await measure_window(probe=system.probe, counters=system.counters,
                                          source=system.source, window=window, during=during)
            await system.source.call({"cmd": "rate", "rate": 0})
            result["quiet_s"] = round(await _quiet(system, s.quiet_limit), 2)
            result.update(scenario="metrics_cost", system="gateway", n=n, phase=phase,
                          round=round_number, offered_rate=round(rate, 2))
            bench.runs.append(result)
            log(f"  metrics N={n} {phase} #{round_number}: "
                f"{result['deliveries_per_s']:.0f} deliveries/s, "
                f"{result['cpu_us_per_delivery']} µs/delivery, other CPU "
                f"{result['other_cpu_pct']} %, scrapes {result.get('scrapes', 0)} "
                f"({result.get('scrape_ms_p50')} ms)")
    await fleet.stop(*system.counters)
    await fleet.stop(*[c for c in (system.server, system.sensor) if c is not None])


async def memory_history(bench: Run, fleet: Fleet) -> None:
    """The same updates through a gateway with the default history and one with none."""
    rounds = await _history_run(bench, fleet, HISTORY_SIZE, MAX_HISTORY_ROUNDS)
    await _history_run(bench, fleet, 0, rounds)


async def _history_run(bench: Run, fleet: Fleet, size: int, rounds: int) -> int:
    """Fill every resource's history, in at most `rounds` rounds of updates (with `size` 0:
    exactly `rounds`, and no history), then read what it costs per resource. Returns the
    rounds it took."""
    s = bench.settings
    resources = 200 if s.mode == "quick" else 1000
    sensor = await start_sensor(fleet, resources=resources)
    config = gateway_config(sensor.ready["ready"], fleet.log_dir)
    config = config.with_name(f"gateway-history{size}.toml")
    config.write_text(gateway_config(sensor.ready["ready"], fleet.log_dir).read_text()
                      + f"\n[history]\nsize = {size}\n")
    server = await fleet.python(f"gateway-history{size}", "translator", "serve", "--config",
                                str(config), ready_pattern=r"listening on (ws://\S+)")
    url = server.ready["ready"]
    loadgen = (await start_loadgens(fleet, 1))[0]
    uris = [f"{sensor.ready['ready']}/r/{i}" for i in range(resources)]
    reply = await loadgen.call(
        {"cmd": "connect", "url": url, "n": 10, "uris": uris, "assign": "split",
         "wait_notify": True, "timeout": 120, "batch": SUBSCRIBE_BATCH}, 300)
    if reply["connected"] != 10:
        raise BenchError(f"history: subscribing to {resources} resources failed: {reply}")
    frame = await _one_notify(url, uris[0])
    before_rss = await settled_rss(server, s.settle)
    before = await gateway_metric(url, "coap_ws_gateway_history_bytes") or 0.0
    # The sensor updates its resources in turn: (size + 1) rounds would fill every history
    # (the newest frame is the resource's cached notify, outside it), but the gateway drops
    # a notification that a newer one of its resource overtakes while it is behind, so
    # rounds go on until the history holds size - 1 frames of every resource (the gateway
    # without history gets as many rounds as the one with).
    full = RESOURCE_OVERHEAD + (HISTORY_SIZE - 1) * (sys.getsizeof("x" * frame) + ENTRY_OVERHEAD)
    after = 0.0
    done = 0
    for done in range(1, rounds + 1):  # noqa: B007 (how many it took is reported)
        offered = await offered_updates(sensor)
        need = (HISTORY_SIZE + 2) * resources
        await sensor.call({"cmd": "rate", "rate": HISTORY_RATE})
        deadline = time.monotonic() + 10 * need / HISTORY_RATE + 30
        while await offered_updates(sensor) - offered < need:
            if time.monotonic() > deadline:
                raise BenchError("history: the sensor did not offer the updates in time")
            await asyncio.sleep(0.5)
        await sensor.call({"cmd": "rate", "rate": 0})
        await asyncio.sleep(s.settle)
        read = await gateway_metric(url, "coap_ws_gateway_history_bytes")
        if read is None:
            raise BenchError("history: no coap_ws_gateway_history_bytes in /metrics")
        after = read
        if size and after / resources >= 0.98 * full:  # frame sizes vary by a few digits
            break
    rss = await settled_rss(server, max(s.settle, 1.0))
    frame = await _one_notify(url, uris[0])  # as the frames kept are now
    result = {
        "scenario": "history_memory", "system": "gateway", "resources": resources,
        "history_size": size, "frame_bytes": frame, "rounds": done,
        "history_bytes_before": int(before), "history_bytes": int(after),
        "history_bytes_per_resource": round((after - before) / resources),
        "frames_per_resource": round(
            max(0.0, after / resources - RESOURCE_OVERHEAD)
            / (sys.getsizeof("x" * frame) + ENTRY_OVERHEAD), 1),
        "rss_growth_bytes_per_resource": round((rss - before_rss) / resources),
        "rss_mib": round(rss / 2**20, 1),
    }
    bench.runs.append(result)
    log(f"  history size {size}: {resources} resources, {result['frames_per_resource']} "
        f"frames of {frame} bytes each kept: {result['history_bytes_per_resource']} B per "
        f"resource accounted, RSS grew {result['rss_growth_bytes_per_resource']} B per resource")
    await fleet.stop(loadgen, server, sensor)
    return done


async def _one_notify(url: str, uri: str) -> int:
    """The UTF-8 size of a notify frame of `uri`, as a client receives it."""
    async with asyncio.timeout(30), connect(url, compression=None) as ws:
        await ws.send(json.dumps({"type": "subscribe", "id": 1, "uri": uri}))
        while True:
            message = await ws.recv()
            text = message if isinstance(message, str) else message.decode()
            if json.loads(text).get("type") == "notify":
                return len(text.encode())


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Scraped / unscraped ratios, per round (the spread says how noisy) and of the means."""
    out: dict[str, Any] = {}
    cost = [r for r in runs if r.get("scenario") == "metrics_cost"]
    base = {r["round"]: r for r in cost if r["phase"] == "no scraper"}
    for phase in list(SCRAPE_PHASES)[1:]:
        pairs = [(r, base[r["round"]]) for r in cost
                 if r["phase"] == phase and r["round"] in base]
        if not pairs:
            continue
        entry: dict[str, Any] = {}
        for figure in ("deliveries_per_s", "cpu_us_per_delivery"):
            per_round = [round(a[figure] / b[figure], 3) for a, b in pairs
                         if a.get(figure) and b.get(figure)]
            if per_round:
                mean_a = statistics.mean(a[figure] for a, _ in pairs)
                mean_b = statistics.mean(b[figure] for _, b in pairs)
                entry[figure] = round(mean_a / mean_b, 3)
                entry[f"{figure} per round"] = per_round
        out[f"metrics {phase} / no scraper"] = entry
    hist = {r["history_size"]: r for r in runs if r.get("scenario") == "history_memory"}
    if HISTORY_SIZE in hist and 0 in hist:
        out[HISTORY_RSS] = (hist[HISTORY_SIZE]["rss_growth_bytes_per_resource"]
                            - hist[0]["rss_growth_bytes_per_resource"])
        out[HISTORY_ACCOUNTED] = hist[HISTORY_SIZE]["history_bytes_per_resource"]
    # The same cost computed rather than read from noisy windows: a scrape's CPU once a
    # second, as a share of the CPU the unscraped fan-out used.
    scrape = next((r for r in runs if r.get("scenario") == "metrics_scrape"), None)
    unscraped = [r["server_cpu_pct"] for r in cost if r["phase"] == "no scraper"]
    if scrape and unscraped:
        core_share = scrape["gateway_cpu_ms_per_scrape"] / 1000  # of a core, at 1 scrape/s
        out[COMPUTED] = round(core_share / (statistics.mean(unscraped) / 100), 4)
    return out


def targets(ratios: dict[str, Any]) -> list[dict[str, Any]]:
    """Within 3 %: the gateway's CPU per delivered frame (what the fan-out costs, whatever
    else the machine runs) with /metrics scraped every second, against not scraped; and the
    same computed from one scrape's CPU (which a loaded machine blurs far less)."""
    r = ratios.get("metrics scraped 1/s / no scraper", {}).get("cpu_us_per_delivery")
    c = ratios.get(COMPUTED)
    return [
        {"target": "fan-out N=1000 CPU per delivery, /metrics scraped 1/s vs not",
         "bound": "<= 1.03 x", "value": r, "holds": None if r is None else r <= 1.03},
        {"target": "fan-out N=1000: CPU of scrapes at 1/s, share of the fan-out's",
         "bound": "<= 0.03", "value": c, "holds": None if c is None else c <= 0.03},
    ]


def report_parts(runs: list[dict[str, Any]], table: Any, head: Any) -> list[str]:
    parts = []
    for r in runs:
        if r.get("scenario") == "metrics_scrape":
            parts.append(head("Metrics: one scrape") + table(
                ["clients", "scrapes", "bytes", "gateway CPU ms per scrape", "wall ms"],
                [[r["n"], r["scrapes"], r["scrape_bytes"], r["gateway_cpu_ms_per_scrape"],
                  r["wall_ms_per_scrape"]]]))
    cost = [r for r in runs if r.get("scenario") == "metrics_cost"]
    if cost:
        parts.append(head(f"Metrics: fan-out N={METRICS_N} saturated, scraped or not") + table(
            ["phase", "#", "deliv/s", "µs/deliv", "srv CPU%", "other%", "scrapes",
             "scrape p50 ms", "scrape bytes"],
            [[r["phase"], r["round"], r["deliveries_per_s"], r["cpu_us_per_delivery"],
              r["server_cpu_pct"], r["other_cpu_pct"], r.get("scrapes", 0),
              r.get("scrape_ms_p50"), r.get("scrape_bytes")] for r in cost]))
    hist = [r for r in runs if r.get("scenario") == "history_memory"]
    if hist:
        parts.append(head("History memory (every resource's history full)") + table(
            ["resources", "size", "rounds", "frames kept", "frame bytes", "history B/resource",
             "RSS growth B/resource"],
            [[r["resources"], r["history_size"], r.get("rounds"), r.get("frames_per_resource"),
              r["frame_bytes"],
              r["history_bytes_per_resource"], r["rss_growth_bytes_per_resource"]]
             for r in hist]))
    return parts
