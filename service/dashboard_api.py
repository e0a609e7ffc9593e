"""The dashboard over HTTP: the page, the JSON it polls, and the learner/concept reads.

    GET /                     the dashboard (service/static/dashboard.html; its JS and CSS under /static/)
    GET /dashboard/data       {"status": <an /events/status snapshot>, "minutes": [...], "active_users",
                               "hardest_concepts", "alerts", "redis", "generated_at_ms"}
    GET /learners/{user_id}   the user's behaviour profile (schemas.serving.profile_key), 404 when absent
    GET /concepts/hardest?n=  the n concepts with the lowest accuracy now (schemas.serving.HARDEST_CONCEPTS_KEY)

Every asset is a file of the package (setup.py package_data): the page works
offline. The page's numbers for the job (valid events, dead letters, lag,
events/s) are the ``status`` member, which is exactly what /events/status
answers at that moment; the rest comes from Redis (service/dashboard.py).
"""
from __future__ import annotations

import os
import time
from typing import Callable, Optional

import redis
from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from service.dashboard import HARDEST_MAX, ServingReader, empty_panels

STATIC_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
NO_REDIS = "Redis is not one of the job's sinks (--sinks): nothing serves these panels"


def static_files() -> StaticFiles:
    """/static/: the page's own JS and CSS (mounted by create_app)."""
    return StaticFiles(directory=STATIC_DIR)


def make_dashboard_router(serving: Optional[ServingReader], job_status: Callable[[], dict]) -> APIRouter:
    """In: the serving-layer reader (None when Redis is not a sink) and the /events/status body's
    function. Out: the router of the endpoints above."""
    router = APIRouter(tags=["dashboard"])

    @router.get("/", include_in_schema=False)
    def page() -> FileResponse:
        # no-cache: a new release of the page is picked up by the next load, never a stale script.
        return FileResponse(os.path.join(STATIC_DIR, "dashboard.html"), headers={"Cache-Control": "no-cache"})

    @router.get("/dashboard/data")
    def data() -> dict:
        panels = serving.panels() if serving is not None else empty_panels(NO_REDIS)
        body = dict(panels, status=job_status())
        body["generated_at_ms"] = int(time.time() * 1000)
        return body

    @router.get("/learners/{user_id}")
    def learner(user_id: str) -> dict:
        profile = _read(serving, lambda s: s.learner(user_id))
        if profile is None:
            raise HTTPException(404, f"no profile for user {user_id!r}")
        return {"user_id": user_id, "profile": profile}

    @router.get("/concepts/hardest")
    def hardest(n: int = Query(10, ge=1, le=HARDEST_MAX)) -> dict:
        return {"n": n, "concepts": _read(serving, lambda s: s.hardest(n))}

    return router


def _read(serving: Optional[ServingReader], read):
    """One read of the serving layer; 503 with the reason when Redis is not there."""
    if serving is None:
        raise HTTPException(503, NO_REDIS)
    try:
        return read(serving)
    except redis.RedisError as e:
        raise HTTPException(503, f"Redis did not answer: {type(e).__name__}: {e}") from e
