"""Structured logs, pure pieces: the format option, the JSON formatter with correlation ids,
and the rate-limited dead-letter summary (with a clock the test moves)."""
from __future__ import annotations

import io
import json
import logging
import threading

import pytest

from pipelines import logs
from service import correlation
from service.correlation import CorrelationFilter
from transforms.dead_letter_log import DeadLetterLog, RateLimitedCounts
from transforms.records import DeadLetter


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    """configure() writes LOG_FORMAT/LOG_LEVEL for child processes: give them back afterwards."""
    for name in ("LOG_FORMAT", "LOG_LEVEL", correlation.ENV):
        monkeypatch.setenv(name, "")  # records the value before, which comes back afterwards
        monkeypatch.delenv(name)


def json_line(record_args: dict, **extra) -> dict:
    """One record through the JSON formatter and the correlation filter, parsed back."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.formatter("json"))
    handler.addFilter(CorrelationFilter())
    logger = logging.getLogger("pipelines.test_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning(record_args["msg"], *record_args.get("args", ()), extra=extra or None)
    finally:
        logger.removeHandler(handler)
        logger.propagate = True
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_defaults_are_text_at_warning_and_json_at_info():
    assert logs.parse([]) == ("text", logging.WARNING)
    assert logs.parse(["--log_format", "json"]) == ("json", logging.INFO)
    assert logs.parse(["--log_format=json", "--log_level=debug", "--other", "x"]) == ("json", logging.DEBUG)
    assert logs.parse(["--log_level", "INFO"]) == ("text", logging.INFO)


def test_the_environment_gives_the_default_and_a_bad_value_is_refused(monkeypatch, capsys):
    monkeypatch.setenv("LOG_FORMAT", "json")
    assert logs.parse([]) == ("json", logging.INFO)
    assert logs.parse(["--log_format", "text"])[0] == "text"
    monkeypatch.setenv("LOG_FORMAT", "yaml")
    with pytest.raises(SystemExit) as e:
        logs.parse([])
    assert e.value.code == 2 and "error: LOG_FORMAT='yaml'" in capsys.readouterr().err


def test_a_json_line_has_the_fields_and_the_extras():
    line = json_line({"msg": "job stopped: exit code %d", "args": (0,)}, event="job_stop", exit_code=0)
    assert line["message"] == "job stopped: exit code 0"
    assert line["level"] == "WARNING" and line["logger"] == "pipelines.test_logs"
    assert line["event"] == "job_stop" and line["exit_code"] == 0
    assert line["correlation_id"] == "-"
    assert line["time"].startswith("20") and line["time"].endswith("+00:00")
    assert "asctime" not in line and "levelname" not in line


def test_json_lines_carry_the_process_or_the_request_correlation_id(monkeypatch):
    monkeypatch.setenv(correlation.ENV, "replay-req-7")  # a replay started over HTTP
    assert json_line({"msg": "x"})["correlation_id"] == "replay-req-7"
    token = correlation._current.set("request-9")  # while serving a request
    try:
        assert json_line({"msg": "x"})["correlation_id"] == "request-9"
    finally:
        correlation._current.reset(token)


def test_configure_sets_the_project_loggers_and_keeps_libraries_at_warning():
    root = logging.getLogger()
    handlers, levels = list(root.handlers), {n: logging.getLogger(n).level for n in ("", *logs.OWN_LOGGERS)}
    logs.configure(logging.DEBUG, "json")
    try:
        assert logging.getLogger("transforms.dead_letters").isEnabledFor(logging.DEBUG)
        assert logging.getLogger("service.replay").isEnabledFor(logging.DEBUG)
        assert not logging.getLogger("apache_beam.runners").isEnabledFor(logging.INFO)
        [handler] = logging.getLogger().handlers
        assert isinstance(handler.formatter, type(logs.formatter("json")))
        assert any(isinstance(f, CorrelationFilter) for f in handler.filters)
    finally:  # pytest's own handlers back: one on a captured stream would outlive it
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in handlers:
            root.addHandler(h)
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_counts_are_handed_out_at_most_once_per_interval():
    clock = Clock()
    counts = RateLimitedCounts(every_s=10, clock=clock)
    assert counts.add({"A": 2}) is None
    clock.now += 9.9
    assert counts.add({"A": 1, "B": 1}) is None
    clock.now += 0.1
    assert counts.add({"B": 4}) == {"A": 3, "B": 5}
    assert counts.add({"C": 1}) is None  # the interval starts again
    assert counts.take() == {"C": 1}
    assert counts.take() is None


def test_counts_from_many_threads_are_all_handed_out():
    counts = RateLimitedCounts(every_s=0.001)
    seen = []

    def add():
        for _ in range(2000):
            got = counts.add({"X": 1})
            if got:
                seen.append(got["X"])

    threads = [threading.Thread(target=add) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    rest = counts.take()
    assert sum(seen) + (rest["X"] if rest else 0) == 16000


def letter(code: str, cid=None) -> DeadLetter:
    return DeadLetter("learning.events.v1", 3, 42, code, "bad", b"x", cid, None, 0)


def test_dead_letters_log_each_at_debug_and_a_summary_at_info(caplog):
    clock = Clock()
    log = DeadLetterLog(RateLimitedCounts(every_s=10, clock=clock))
    caplog.set_level(logging.DEBUG, logger="transforms.dead_letters")
    log.each(letter("OUT_OF_RANGE", "corr-1"))
    log.add({"OUT_OF_RANGE": 1, "BAD_FRAMING": 2})
    [debug] = caplog.records
    assert debug.levelno == logging.DEBUG and debug.code == "OUT_OF_RANGE"
    assert (debug.source_topic, debug.source_partition, debug.source_offset) == ("learning.events.v1", 3, 42)
    assert debug.correlation_id == "corr-1"  # the record's own id, not the process's
    clock.now += 10
    log.add({"BAD_FRAMING": 1})
    summary = caplog.records[-1]
    assert summary.levelno == logging.INFO and summary.counts == {"OUT_OF_RANGE": 1, "BAD_FRAMING": 3}
    assert summary.total == 4 and "dead letters published: 4" in summary.getMessage()
    log.flush()  # nothing new since: no line
    assert len(caplog.records) == 2


def test_no_debug_line_is_built_when_debug_is_off(caplog):
    caplog.set_level(logging.INFO, logger="transforms.dead_letters")
    DeadLetterLog().each(letter("BAD_ENUM"))
    assert caplog.records == []
