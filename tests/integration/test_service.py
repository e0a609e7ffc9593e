"""The analytics service against the real stack: /metrics, /events/status and /health of a running job.

Each test starts ``python -m pipelines.streaming`` with the HTTP service on a
free port and talks to it with a real HTTP client (httpx); /metrics is read
with prometheus_client's own parser. Expected values come from what the test
produced (and, for dead letters, from the records on the dead-letter topic).
"""
from __future__ import annotations

import json
import signal
import time
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from scripts.produce import TrafficConfig, generate, produce
from tests.integration.conftest import BROKERS
from tests.integration.instances import free_port, private
from tests.integration.readback import topic_records
from tests.integration.test_restarts import start_job

pytestmark = pytest.mark.integration
N_EVENTS = 3000


def wait_for(job, probe, what: str, timeout: float = 120, every: float = 0.25):
    """Calls ``probe()`` until it returns something truthy; fails when the job ends or time runs out."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        assert job.poll() is None, f"the job ended while waiting for {what}: {job.stderr.read()[-3000:]}"
        try:
            last = probe()
        except httpx.TransportError as e:  # not listening yet
            last = e
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"{what}: not within {timeout}s (last: {last!r})")


def health(base: str) -> httpx.Response:
    return httpx.get(f"{base}/health", timeout=10)


def scrape(base: str) -> dict:
    """{(sample name, frozenset(labels)): value} of one /metrics scrape, by prometheus_client's parser."""
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def by_label(samples: dict, name: str, label: str) -> dict:
    return {dict(labels)[label]: v for (n, labels), v in samples.items() if n == name}


def stop_and_watch_drain(job, base: str) -> list:
    """SIGTERM, then /health as often as it answers: the answers seen until the port closed."""
    job.send_signal(signal.SIGTERM)
    seen, deadline = [], time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{base}/health", timeout=5)
            seen.append((r.status_code, r.json()))
        except httpx.TransportError:
            if job.poll() is not None:
                break
        time.sleep(0.05)
    return seen


def test_metrics_and_status_count_what_was_produced_then_sigterm_drains(fresh_stack):
    stack = fresh_stack
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    job = start_job(stack, http_port=port, early_firing=1)
    try:
        wait_for(job, lambda: health(base).status_code == 200, "/health 200 once the job runs")
        cfg = TrafficConfig(events=N_EVENTS, users=60, concepts=10, content_items=20, span_seconds=600,
                            malformed_fraction=0.05, json_fraction=0.2, seed=91)
        produced = [r._replace(topic=stack.topic_for(r.topic)) for r in generate(cfg)]
        produce(iter(produced), BROKERS)
        valid = Counter(r.event_type for r in produced if r.error_code is None)
        invalid = Counter(r.error_code for r in produced if r.error_code)
        assert sum(invalid.values()) > 50  # the test means something only with bad records in it

        def drained():
            s = httpx.get(f"{base}/events/status", timeout=10).json()
            published = sum(s["events"]["dead_letters_published"].values())
            done = s["lag_total"] == 0 and s["events"]["valid"] == sum(valid.values()) and \
                published == sum(invalid.values()) and len(s["last_pane"]) == 4
            return s if done else None
        status = wait_for(job, drained, "lag 0 and every record counted on /events/status", timeout=150)

        samples = scrape(base)
        assert by_label(samples, "learning_events_processed_total", "event_type") == valid
        assert by_label(samples, "schema_validation_errors_total", "error_code") == invalid
        on_topic = Counter(rec["error_code"] for _, rec in topic_records(BROKERS, stack.topics["dlq"]))
        assert on_topic == invalid
        assert by_label(samples, "dlq_messages_total", "error_code") == on_topic
        # Every record read went through the fused steps once: the histogram counts them all.
        assert samples[("event_processing_duration_count", frozenset())] == N_EVENTS
        assert samples[("event_processing_duration_bucket", frozenset({("le", "+Inf")}))] == N_EVENTS
        assert samples[("event_processing_duration_sum", frozenset())] > 0
        lags = {(dict(labels)["topic"], dict(labels)["partition"]): v
                for (name, labels), v in samples.items() if name == "consumer_lag"}
        assert len(lags) == 12 and set(lags.values()) == {0}
        sizes = by_label(samples, "aggregation_window_size", "window")
        assert set(sizes) == {"1m", "5m", "1h", "1d"} and min(sizes.values()) > 0
        writes = by_label(samples, "sink_write_duration_count", "sink")
        assert {"redis", "postgres", "kafka_aggregates", "kafka_dead_letters"} <= set(writes)

        assert {p["lag"] for p in status["partitions"]} == {0} and len(status["partitions"]) == 12
        assert status["events"]["by_type"] == dict(valid)
        assert status["events"]["dead_letters"] == dict(invalid)
        assert status["watermark"]["ms"] is not None
        assert set(status["last_pane"]) == {"1m", "5m", "1h", "1d"}
        assert status["job"]["state"] == "RUNNING"
        text = json.dumps(status)
        assert "analytics:analytics@" not in text and "analytics:***@" in text  # the DSN, redacted

        r = httpx.get(f"{base}/health", headers={"X-Correlation-ID": "test-corr-42"}, timeout=10)
        assert r.status_code == 200 and r.headers["X-Correlation-ID"] == "test-corr-42"
        body = r.json()
        assert {"kafka", "redis", "postgres", "job", "sinks"} <= set(body["parts"])
        assert body["parts"]["job"]["detail"] == "RUNNING"

        seen = stop_and_watch_drain(job, base)
        assert (503, {"status": "draining"}) in seen, seen
        assert job.wait(60) == 0, job.stderr.read()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
            job.wait(30)


def test_health_names_redis_while_it_is_down(fresh_stack):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with private("redis") as redis_server:
        job = start_job(fresh_stack, http_port=port, redis_url=f"redis://127.0.0.1:{redis_server.port}/0")
        try:
            wait_for(job, lambda: health(base).status_code == 200, "/health 200 once the job runs")
            redis_server.stop()
            down = wait_for(job, lambda: (lambda r: r.status_code == 503 and r.json())(health(base)),
                            "/health 503 with Redis down", timeout=20)
            assert down["failing"] == ["redis"], down
            assert down["parts"]["redis"]["status"] == "down" and down["parts"]["redis"]["error"]
            assert down["parts"]["kafka"]["status"] == "ok"
            redis_server.start()
            wait_for(job, lambda: health(base).status_code == 200, "/health 200 with Redis back", timeout=30)
            job.send_signal(signal.SIGTERM)
            assert job.wait(60) == 0, job.stderr.read()[-3000:]
        finally:
            if job.poll() is None:
                job.kill()
                job.wait(30)
