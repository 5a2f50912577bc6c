"""The log limiter (translator/logs.py): first lines in full, then one summary per interval."""

from __future__ import annotations

import asyncio
import logging

import pytest

from translator.logs import LimitedLog, RepeatLimiter, Summary


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_first_occurrences_are_written_the_rest_counted_into_one_summary() -> None:
    limiter = RepeatLimiter(first=3, interval=60.0)
    written = [limiter.hit("coap.unmatched", 10.0 + i * 0.001) for i in range(6000)]
    assert written[:3] == [True] * 3 and not any(written[3:])
    assert limiter.summaries(69.9) == []  # the interval has not ended
    assert limiter.next_due() == 70.0
    assert limiter.summaries(70.0) == [Summary("coap.unmatched", 5997, 60.0, 6000)]
    assert limiter.summaries(200.0) == []  # said once
    assert limiter.next_due() is None
    # The next interval starts afresh, with its own first lines in full.
    assert limiter.hit("coap.unmatched", 300.0)
    assert limiter.count("coap.unmatched") == 6001


def test_kinds_are_limited_apart() -> None:
    limiter = RepeatLimiter(first=1, interval=10.0)
    assert limiter.hit("a", 0.0) and limiter.hit("b", 0.0)
    assert not limiter.hit("a", 1.0)
    assert limiter.summaries(10.0) == [Summary("a", 1, 10.0, 2)]  # b had nothing counted


def test_an_interval_with_nothing_counted_ends_without_a_summary() -> None:
    limiter = RepeatLimiter(first=3, interval=10.0)
    for t in (0.0, 1.0, 2.0):
        assert limiter.hit("a", t)
    assert limiter.next_due() is None
    assert limiter.hit("a", 10.0)  # a new interval: written
    assert limiter.summaries(100.0) == []


def test_occurrences_after_an_uncollected_summary_count_into_it() -> None:
    limiter = RepeatLimiter(first=1, interval=10.0)
    limiter.hit("a", 0.0)
    limiter.hit("a", 1.0)
    assert not limiter.hit("a", 15.0)  # the summary of [0, 10) is still due
    assert limiter.summaries(15.0) == [Summary("a", 2, 15.0, 3)]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError):
        RepeatLimiter(first=-1)
    with pytest.raises(ValueError):
        RepeatLimiter(interval=0)


def test_limited_log_writes_lines_and_summaries(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    log = LimitedLog(logging.getLogger("test.limited"), RepeatLimiter(2, 60.0), clock=clock)
    with caplog.at_level(logging.INFO, logger="test.limited"):
        for number in range(8):
            log.write("k", logging.INFO, "datagram %d dropped", number)
        clock.now += 60
        log.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "datagram 0 dropped", "datagram 1 dropped",
        "k: ...and 6 more in the last 60 s (8 in all)",
    ]
    assert caplog.records[-1].levelno == logging.WARNING
    assert log.count("k") == 8


async def test_limited_log_summarizes_from_a_timer_when_nothing_more_happens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = LimitedLog(logging.getLogger("test.timer"), RepeatLimiter(1, 0.05))
    summarized = asyncio.Event()

    class Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "more" in record.getMessage():
                summarized.set()

    handler = Handler()
    logging.getLogger("test.timer").addHandler(handler)
    try:
        with caplog.at_level(logging.INFO, logger="test.timer"):
            for _ in range(3):
                log.write("k", logging.INFO, "line")
            async with asyncio.timeout(5):
                await summarized.wait()
    finally:
        logging.getLogger("test.timer").removeHandler(handler)
        log.close()
    assert next(r.getMessage() for r in caplog.records) == "line"
    assert "k: ...and 2 more" in caplog.records[-1].getMessage()


def test_json_log_lines_carry_the_fields_of_a_record() -> None:
    import json as json_module
    import logging as logging_module

    from translator.logs import JsonFormatter

    record = logging_module.LogRecord("translator.x", logging_module.INFO, __file__, 1,
                                      "%r connected", ("<Connection #7>",), None)
    record.conn, record.remote = 7, "127.0.0.1:5000"
    line = json_module.loads(JsonFormatter().format(record))
    assert line["message"] == "'<Connection #7>' connected" and line["level"] == "info"
    assert line["conn"] == 7 and line["remote"] == "127.0.0.1:5000"
    assert line["logger"] == "translator.x" and "args" not in line
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        failed = logging_module.LogRecord("t", logging_module.ERROR, __file__, 1, "failed", (),
                                          sys.exc_info())
    assert "ValueError: boom" in json_module.loads(JsonFormatter().format(failed))["exception"]
