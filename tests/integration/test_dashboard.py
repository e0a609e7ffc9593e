"""The live dashboard against the real stack: its Redis reads, and the page in a real headless chromium.

``test_the_serving_reads_*`` writes keys the way the job's writers name them
(transforms/sinks/redis_sink.py metric_key, schemas/serving.py) into the test's
Redis database and reads them through the service's endpoints.

``test_the_dashboard_*`` runs ``python -m pipelines.streaming`` with its HTTP
service, produces events at a steady rate while Debian's chromium (through
selenium and chromedriver, scripts/install_browser.sh) shows ``/``, and checks
the page against ``/events/status`` honestly: a status read before, the page's
render of data fetched after that read, a status read after; every counter the
page shows lies between the two, and equals the snapshot the page says it
rendered. A screenshot is saved and its path printed.
"""
from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest
import redis
from fastapi import FastAPI
from fastapi.testclient import TestClient

from schemas.serving import HARDEST_CONCEPTS_KEY, RECENT_ALERTS_KEY, profile_key
from scripts.dashboard_screenshot import headless_chromium, polls, save_page, wait_for_polls
from scripts.produce import TrafficConfig, generate, produce
from service.dashboard import MINUTES, ServingReader
from service.dashboard_api import make_dashboard_router
from tests.integration.conftest import BROKERS
from tests.integration.instances import free_port
from tests.integration.test_restarts import start_job
from tests.integration.test_service import health, wait_for
from transforms.sinks.redis_sink import metric_key

pytestmark = pytest.mark.integration


def test_the_serving_reads_take_the_hour_before_the_newest_minute_and_decode_profiles(stack):
    r = redis.Redis.from_url(stack.redis_url, decode_responses=True)  # the stack's own db, flushed for it
    newest = 1_800_000_000_000 // 60_000 * 60_000
    for back, (events, answers, correct) in {0: (30, 10, 4), 2: (120, 40, 30), 59: (6, 0, 0), 60: (999, 9, 9)}.items():
        metrics = {"events": events, "answers": answers, "correct": correct, "active_users": 3}
        if answers:
            metrics["accuracy"] = correct / answers
        r.hset(metric_key("analytics", 60, newest - back * 60_000, "overall", "all"), mapping=metrics)
    r.set("analytics:1m:latest", newest)
    r.hset(metric_key("analytics", 300, newest - 240_000, "overall", "all"),
           mapping={"active_users": 17, "window_end": newest + 60_000})
    r.set("analytics:5m:latest", newest - 240_000)
    r.zadd(HARDEST_CONCEPTS_KEY, {"concept-002": 0.61, "concept-001": 0.25, "concept-003": 0.9})
    alert = {"alert_id": "a1", "kind": "dead_letter_rate", "severity": "WARNING", "status": "RAISED"}
    r.lpush(RECENT_ALERTS_KEY, json.dumps(alert))
    r.hset(profile_key("user-00007"), mapping={"answers": "12", "accuracy": "0.75", "user_id": "user-00007",
                                                "mastery": json.dumps({"concept-001": 0.4})})
    app = FastAPI()
    app.include_router(make_dashboard_router(ServingReader(stack.redis_url), lambda: {"events": {"valid": 1}}))
    c = TestClient(app)

    data = c.get("/dashboard/data").json()
    minutes = data["minutes"]
    assert len(minutes) == MINUTES and minutes[-1]["start_ms"] == newest == data["newest_minute_ms"]
    assert minutes[0]["start_ms"] == newest - 59 * 60_000  # the 60th minute back is outside the hour
    by_start = {m["start_ms"]: m for m in minutes if m["events"] is not None}
    assert set(by_start) == {newest, newest - 120_000, newest - 59 * 60_000}
    assert by_start[newest]["events_per_second"] == 0.5 and by_start[newest]["accuracy"] == 0.4
    assert by_start[newest - 120_000]["accuracy"] == 0.75
    assert by_start[newest - 59 * 60_000]["accuracy"] is None
    assert data["active_users"] == {"value": 17, "window_start_ms": newest - 240_000, "window_end_ms": newest + 60_000}
    assert [c["concept"] for c in data["hardest_concepts"]] == ["concept-001", "concept-002", "concept-003"]
    assert data["alerts"] == [alert] and data["status"] == {"events": {"valid": 1}}

    assert c.get("/concepts/hardest?n=2").json() == {
        "n": 2, "concepts": [{"concept": "concept-001", "accuracy": 0.25}, {"concept": "concept-002", "accuracy": 0.61}]}
    profile = c.get("/learners/user-00007").json()
    assert profile == {"user_id": "user-00007", "profile": {
        "accuracy": 0.75, "answers": 12, "mastery": {"concept-001": 0.4}, "user_id": "user-00007"}}
    assert c.get("/learners/user-99999").status_code == 404


# What the page shows, read in one script (JS is single-threaded: no render can interleave).
READ_PAGE = """
const num = (t) => Number(String(t).replace(/,/g, ''));
const bars = (id) => Array.from(document.querySelectorAll('#' + id + ' g.bar')).map((g) => ({
  key: g.dataset.key, value: Number(g.dataset.value), text: g.querySelector('text.value').textContent,
  committed: g.dataset.committed, end: g.dataset.end}));
return {
  polls: Number(document.body.dataset.polls || 0),
  snapshot: JSON.parse(document.getElementById('dashboard').dataset.snapshot || 'null'),
  valid: num(document.getElementById('valid-events').textContent),
  dead_total: num(document.getElementById('dead-letters-total').textContent),
  lag_total: num(document.getElementById('lag-total').textContent),
  dead_letters: bars('dead-letters'),
  lag: bars('lag'),
  eps_bars: Array.from(document.querySelectorAll('#chart-eps rect.bar')).map((b) => Number(b.dataset.value)),
  accuracy_points: Array.from(document.querySelectorAll('#chart-accuracy circle.point')).map((p) => Number(p.dataset.value)),
};
"""


def status(base: str) -> dict:
    return httpx.get(f"{base}/events/status", timeout=10).json()


def honest_read(driver, base: str) -> tuple[dict, dict, dict]:
    """(status before, what the page shows, status after), where the page's data was fetched after
    ``before``: renders are sequential, so the second render after ``before`` fetched after it."""
    before = status(base)
    wait_for_polls(driver, polls(driver) + 2, timeout=30)
    page = driver.execute_script(READ_PAGE)
    after = status(base)
    return before, page, after


def committed(p: dict) -> int:
    return -1 if p["committed"] in (None, "") else int(p["committed"])


def assert_page_is_a_status_snapshot(before: dict, page: dict, after: dict) -> None:
    snap = page["snapshot"]
    # What the page shows is the snapshot it rendered...
    assert page["valid"] == snap["events"]["valid"]
    assert {b["key"]: b["value"] for b in page["dead_letters"]} == snap["events"]["dead_letters"]
    assert all(int(b["text"].replace(",", "")) == b["value"] for b in page["dead_letters"] + page["lag"])
    assert page["dead_total"] == sum(snap["events"]["dead_letters"].values())
    assert page["lag_total"] == snap["lag_total"] and snap["lag_error"] is None
    assert {b["key"]: (b["value"], int(b["committed"] or -1), int(b["end"])) for b in page["lag"]} == {
        f"{p['topic']}/{p['partition']}": (p["lag"], committed(p), p["end"]) for p in snap["partitions"]}
    # ...and that snapshot is an /events/status answer taken between the two reads around it.
    assert before["events"]["valid"] <= snap["events"]["valid"] <= after["events"]["valid"]
    for code in set(before["events"]["dead_letters"]) | set(after["events"]["dead_letters"]):
        b, p, a = (s["events"]["dead_letters"].get(code, 0) for s in (before, snap, after))
        assert b <= p <= a, (code, b, p, a)
    keyed = [{(x["topic"], x["partition"]): x for x in s["partitions"]} for s in (before, snap, after)]
    assert set(keyed[0]) == set(keyed[1]) == set(keyed[2]) and len(keyed[1]) == 12
    for tp in keyed[1]:
        b, p, a = (k[tp] for k in keyed)
        assert committed(b) <= committed(p) <= committed(a) and b["end"] <= p["end"] <= a["end"], (tp, b, p, a)
        assert p["lag"] == max(0, p["end"] - max(committed(p), 0))


def test_the_dashboard_in_headless_chromium_shows_status_snapshots_that_move(fresh_stack, tmp_path):
    stack = fresh_stack
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    job = start_job(stack, http_port=port, early_firing=1)
    stop_producing = threading.Event()
    producer = None
    driver = None
    try:
        wait_for(job, lambda: health(base).status_code == 200, "/health 200 once the job runs")
        # Up to 75 s of traffic at 120/s (stopped when the test ends), 5 % bad records,
        # event times over the last 5 minutes.
        cfg = TrafficConfig(events=9000, users=80, concepts=12, content_items=30, span_seconds=300,
                            malformed_fraction=0.05, json_fraction=0.2, seed=1010)
        records = [r._replace(topic=stack.topic_for(r.topic)) for r in generate(cfg)]
        flowing = (r for r in records if not stop_producing.is_set())
        producer = threading.Thread(target=produce, args=(flowing, BROKERS), kwargs={"rate": 120.0},
                                    name="test-producer", daemon=True)
        producer.start()

        driver = headless_chromium()
        driver.get(base + "/")

        def showing_data():
            page = driver.execute_script(READ_PAGE)
            ready = (page["valid"] or 0) > 0 and (page["dead_total"] or 0) > 0 and page["eps_bars"] \
            and page["accuracy_points"]  # a number not shown yet ("–") reads as None
            return page if ready else None
        wait_for(job, showing_data, "the page showing events, dead letters and chart points", timeout=60, every=0.5)

        first = honest_read(driver, base)
        assert_page_is_a_status_snapshot(*first)
        time.sleep(4)
        second = honest_read(driver, base)
        assert_page_is_a_status_snapshot(*second)
        assert producer.is_alive(), "the producer finished before the second read: the numbers could not move"

        one, two = first[1], second[1]
        assert two["polls"] > one["polls"]
        assert two["valid"] > one["valid"], "valid events did not change between two reads seconds apart"
        assert two["snapshot"]["events"]["valid"] > one["snapshot"]["events"]["valid"]
        for page in (one, two):  # the charts have data points
            assert any(v > 0 for v in page["eps_bars"]), page["eps_bars"]
            assert page["accuracy_points"] and all(0 <= v <= 1 for v in page["accuracy_points"])
            assert len(page["lag"]) == 12 and page["dead_letters"]
        shot = save_page(driver, str(tmp_path / "dashboard.png"))
        print(f"dashboard screenshot: {shot}")
        with open(shot, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    finally:
        stop_producing.set()
        if driver is not None:
            driver.quit()
        if producer is not None:
            producer.join(60)
        if job.poll() is None:
            job.send_signal(signal.SIGTERM)
            try:
                job.wait(60)
            except Exception:
                job.kill()
                job.wait(30)
