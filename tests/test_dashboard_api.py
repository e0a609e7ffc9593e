"""The dashboard's pure pieces and its offline assets, through FastAPI's in-process TestClient.

No services: without Redis (``serving=None``) the endpoints must still answer, with
deliberate empty panels or a 503 that says why. The reads against a real Redis are in
tests/integration/test_dashboard.py.
"""
from __future__ import annotations

import os
import re

from fastapi import FastAPI
from fastapi.testclient import TestClient

from service.dashboard import decode_value, minute_row
from service.dashboard_api import NO_REDIS, STATIC_DIR, make_dashboard_router, static_files

STATUS = {"events": {"valid": 5, "dead_letters": {"BAD_JSON": 1}}, "partitions": [], "lag_total": 0}


def client() -> TestClient:
    app = FastAPI()
    app.include_router(make_dashboard_router(None, lambda: STATUS))
    app.mount("/static", static_files(), name="static")
    return TestClient(app)


def test_a_minute_row_gives_events_per_second_and_keeps_missing_values_missing():
    assert minute_row(60_000, ["120", "40", "30", "0.75"]) == {
        "start_ms": 60_000, "events": 120.0, "events_per_second": 2.0, "answers": 40.0, "correct": 30.0,
        "accuracy": 0.75}
    row = minute_row(0, ["6", None, None, None])
    assert row["accuracy"] is None and row["answers"] is None and row["events_per_second"] == 0.1
    assert minute_row(0, [None] * 4)["events_per_second"] is None


def test_profile_values_are_json_decoded_and_plain_text_is_kept():
    assert decode_value("12") == 12 and decode_value("0.5") == 0.5
    assert decode_value('{"concept-001": 0.8}') == {"concept-001": 0.8}
    assert decode_value("user-00001") == "user-00001"


def test_the_page_and_every_asset_it_names_are_served_by_the_service_itself():
    c = client()
    page = c.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assets = re.findall(r'(?:src|href)="([^"#]+)"', page.text)
    assert {"/static/dashboard.js", "/static/dashboard.css"} <= set(assets)
    for asset in assets:
        assert asset.startswith("/"), f"{asset}: not served by the service (offline)"
        assert c.get(asset).status_code == 200, asset
    for name in os.listdir(STATIC_DIR):  # no asset reaches out to the network
        text = open(os.path.join(STATIC_DIR, name), encoding="utf-8").read()
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), name


def test_without_redis_the_data_has_the_status_and_empty_panels_saying_why():
    body = client().get("/dashboard/data").json()
    assert body["status"] == STATUS
    assert body["minutes"] == [] and body["hardest_concepts"] == [] and body["alerts"] == []
    assert body["active_users"] is None and body["redis"] == {"ok": False, "error": NO_REDIS}


def test_without_redis_learners_and_concepts_answer_503_and_n_is_bounded():
    c = client()
    assert c.get("/learners/user-00001").status_code == 503
    assert c.get("/concepts/hardest").status_code == 503
    assert c.get("/concepts/hardest?n=0").status_code == 422
    assert c.get("/concepts/hardest?n=101").status_code == 422
