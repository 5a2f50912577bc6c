"""bench/operations.py's arithmetic and tables (the scenarios themselves run real processes
under `make bench`): the scraped / unscraped ratios pair windows of the same round, and the
computed share uses one scrape's CPU against the unscraped fan-out's."""

from __future__ import annotations

from typing import Any

from bench import operations
from bench.run import text_table


def window(phase: str, round_: int, deliveries: float, us: float, cpu: float) -> dict[str, Any]:
    return {"scenario": "metrics_cost", "phase": phase, "round": round_,
            "deliveries_per_s": deliveries, "cpu_us_per_delivery": us, "server_cpu_pct": cpu,
            "other_cpu_pct": 0.0}


RUNS = [
    {"scenario": "metrics_scrape", "n": 1000, "scrapes": 100, "scrape_bytes": 3500,
     "gateway_cpu_ms_per_scrape": 0.8, "wall_ms_per_scrape": 1.2},
    window("no scraper", 1, 40_000, 10.0, 40.0),
    window("scraped 1/s", 1, 39_000, 10.2, 40.0),
    window("scraped 10/s", 1, 38_000, 10.5, 40.0),
    window("no scraper", 2, 60_000, 8.0, 60.0),
    window("scraped 1/s", 2, 60_000, 8.0, 60.0),
    {"scenario": "history_memory", "resources": 1000, "history_size": 32, "frame_bytes": 120,
     "history_bytes_per_resource": 7000, "rss_growth_bytes_per_resource": 9000},
]


def test_ratios_pair_the_windows_of_a_round_and_the_computed_share() -> None:
    summary = operations.summary(RUNS)
    one = summary["metrics scraped 1/s / no scraper"]
    assert one["deliveries_per_s per round"] == [0.975, 1.0]
    assert one["cpu_us_per_delivery per round"] == [1.02, 1.0]
    assert one["cpu_us_per_delivery"] == round((10.2 + 8.0) / (10.0 + 8.0), 3)
    assert summary["metrics scraped 10/s / no scraper"]["deliveries_per_s per round"] == [0.95]
    # 0.8 ms of CPU a second against the unscraped fan-out's 50 % of a core.
    assert summary[operations.COMPUTED] == round(0.0008 / 0.5, 4)
    held = {t["target"]: t["holds"] for t in operations.targets(summary)}
    assert list(held.values()) == [True, True]


def test_tables_name_every_window_and_the_history_figures() -> None:
    text = "\n".join(operations.report_parts(RUNS, text_table, lambda title: title + "\n"))
    assert "0.8" in text and text.count("scraped 1/s") == 2
    assert "7,000" in text or "7000" in text
