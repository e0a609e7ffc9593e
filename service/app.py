"""The FastAPI application of the analytics service.

    ctx = ServiceContext.for_job(opts, options_dict)   # before the job runs
    app = create_app(ctx)                              # /health, /metrics, /events/status, /events/replay,
                                                       # / (dashboard), /dashboard/data, /learners, /concepts
    ctx.attach(result)                                 # once p.run() returned

Sync endpoints on purpose: each does bounded blocking I/O (the job service,
Kafka, Redis, Postgres), which FastAPI runs on its thread pool.
"""
from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from typing import Optional

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.correlation import CorrelationMiddleware
from service.dashboard import ServingReader
from service.dashboard_api import make_dashboard_router, static_files
from service.health import Health, kafka_check, postgres_check, redis_check
from service.job_metrics import JobMetrics
from service.lag import ConsumerLag
from service.prometheus import JobCollector, registry_for
from service.replay_api import ReplaySettings, make_replay_router
from service.status import RateSampler, status

LOG = logging.getLogger("service.app")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class ServiceContext:
    """Everything the endpoints read; built from the job's options before the job runs."""
    job: JobMetrics
    lag: ConsumerLag
    health: Health
    sampler: RateSampler
    options: dict                         # the job's options, secrets redacted
    replay: Optional[ReplaySettings] = None
    serving: Optional[ServingReader] = None   # the dashboard's Redis reads; None when Redis is not a sink
    started_at: float = field(default_factory=time.time)

    @classmethod
    def for_job(cls, opts, shown_options: dict) -> "ServiceContext":
        """In: the job's AnalyticsOptions and its options to show (already redacted). Connects lazily."""
        job = JobMetrics()
        checks = {"kafka": kafka_check(opts.brokers), "postgres": postgres_check(opts.postgres_dsn)}
        if "redis" in opts.sink_set():
            checks["redis"] = redis_check(opts.redis_url)
        replay = ReplaySettings(brokers=opts.brokers, postgres_dsn=opts.postgres_dsn, topics=opts.topics,
                                dlq_topic=opts.dlq_topic, token=os.environ.get("REPLAY_API_TOKEN") or None,
                                work_dir=tempfile.mkdtemp(prefix="learning-analytics-replays-"), repo=REPO)
        serving = ServingReader(opts.redis_url) if "redis" in opts.sink_set() else None
        return cls(job=job, lag=ConsumerLag(opts.brokers, opts.group_id, opts.topic_list()),
                   health=Health(checks, job), sampler=RateSampler(job), options=shown_options, replay=replay,
                   serving=serving)

    def attach(self, result) -> None:
        """The running job's PipelineResult: metrics and state come from it from now on."""
        self.job.attach(result)

    def start(self) -> None:
        self.sampler.start()

    def close(self) -> None:
        self.sampler.stop()
        self.health.close()
        self.lag.close()
        if self.serving is not None:
            self.serving.close()


def create_app(ctx: ServiceContext) -> FastAPI:
    """In: the service context. Out: the app, with the correlation-id middleware and every endpoint."""
    app = FastAPI(title="learning-analytics service", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(CorrelationMiddleware)
    registry = registry_for(JobCollector(ctx.job.snapshot, ctx.lag.read))

    @app.get("/health")
    def health() -> JSONResponse:
        code, body = ctx.health.report()
        if code != 200:
            LOG.info("health %d: %s", code, body.get("error") or body.get("status"))
        return JSONResponse(body, status_code=code)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    def job_status() -> dict:
        return status(ctx.job, ctx.lag, ctx.sampler, ctx.started_at, ctx.options)

    @app.get("/events/status")
    def events_status() -> dict:
        return job_status()

    # The dashboard: its numbers for the job are job_status() itself, the rest is read from Redis.
    app.include_router(make_dashboard_router(ctx.serving, job_status))
    app.mount("/static", static_files(), name="static")

    if ctx.replay is not None:
        app.include_router(make_replay_router(ctx.replay))
    return app
