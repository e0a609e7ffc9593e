"""Replay over HTTP: ``POST /events/replay`` starts ``python -m pipelines.replay`` for a
time range as a process of its own; ``GET /events/replay/{id}`` follows it.

    router = make_replay_router(ReplaySettings(
        brokers="127.0.0.1:9092", postgres_dsn="postgresql://...", topics="learning.events.v1,...",
        dlq_topic="learning.events.dlq", token=os.environ.get("REPLAY_API_TOKEN"),
        work_dir="/var/lib/analytics/replays", repo="/srv/analytics"))
    app.include_router(router)      # its lifespan terminates a running replay at shutdown

Both endpoints need ``Authorization: Bearer <token>``, the token being
REPLAY_API_TOKEN; without one configured they answer 403 (off), a missing or
wrong token gets 401 (compared in constant time). A request is checked by the
very code the command line uses (transforms/replay_request.py), before
anything starts: a bad range is 400 with replay's own message, an output
folder that exists is 409 unless ``"overwrite": true``, and a second replay
while one runs is 409. The request's correlation id goes to the replay process
(env CORRELATION_ID), whose every log line then carries it.

On shutdown a running replay is terminated (SIGTERM to its process group,
SIGKILL after SHUTDOWN_GRACE_S): a replay publishes its dataset only when
complete and upserts its aggregates, so a stopped one leaves nothing that
looks complete and can simply be asked for again.
"""
from __future__ import annotations

import asyncio
import logging
import os
import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Callable, Optional, Union

from confluent_kafka import KafkaException
from fastapi import APIRouter, Depends, HTTPException, Request, Response, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

from service.correlation import HEADER, choose, current
from service.replay_runs import Busy, ReplayRuns
from transforms.kafka_range import BadRangeRequest
from transforms.kafka_read import KafkaReadConfig
from transforms.replay_request import OutputExists, check_outputs, resolve_request

LOG = logging.getLogger("service.replay")

PROGRESS_EVERY_S = 2.0    # the replay's progress lines, hence how fresh GET's progress is
SHUTDOWN_GRACE_S = 10.0   # SIGTERM, then this long before SIGKILL
OFF = ("replay over HTTP is off: set REPLAY_API_TOKEN in the service's environment to a secret "
       "and restart it; callers then send 'Authorization: Bearer <that secret>'")


@dataclass
class ReplaySettings:
    """Where replays read and write (the service's own options), and who may start them."""
    brokers: str
    postgres_dsn: str
    topics: str            # comma-separated: the default when a request names none
    dlq_topic: str
    token: Optional[str]   # REPLAY_API_TOKEN; None or empty turns the endpoints off
    work_dir: str          # each replay's stdout, stderr and request under <work_dir>/<id>/
    repo: str              # the replay's working directory; relative outputs are under it


class ReplayBody(BaseModel):
    """The JSON body of POST /events/replay."""
    model_config = ConfigDict(extra="forbid")
    start: str = Field(description="range start, ISO-8601 with a zone (event time)")
    end: str = Field(description="range end, exclusive")
    topics: Optional[Union[list[str], str]] = Field(None, description="list or comma-separated; "
                                                    "default: the service's topics")
    output: Optional[str] = Field(None, description="folder for the Parquet dataset (relative: under the repo)")
    aggregates: bool = Field(False, description="recompute the windows into window_metrics_replay")
    overwrite: bool = Field(False, description="replace an existing output")


def _authorizer(token: Optional[str]) -> Callable[..., None]:
    """A dependency: 403 when no token is configured, 401 for a missing or wrong one."""
    bearer = HTTPBearer(auto_error=False)
    expected = token.encode() if token else None

    def authorize(credentials: Optional[HTTPAuthorizationCredentials] = Security(bearer)) -> None:
        if expected is None:
            raise HTTPException(403, OFF)
        given = credentials.credentials.encode() if credentials else b""
        # compare_digest: the time taken says nothing about how much of the token matched.
        if not (credentials and secrets.compare_digest(given, expected)):
            raise HTTPException(401, "send the replay token as 'Authorization: Bearer <REPLAY_API_TOKEN>'",
                                headers={"WWW-Authenticate": "Bearer"})
    return authorize


def correlation_id(request: Request) -> str:
    """The request's correlation id: the middleware's (service.correlation), or on an
    app without it the acceptable X-Correlation-ID sent, else a new uuid4."""
    return current() or choose(request.headers.get(HEADER))


def _topics(body: ReplayBody, default: str) -> list[str]:
    given = body.topics if body.topics is not None else default
    items = given.split(",") if isinstance(given, str) else given
    return [t.strip() for t in items if t.strip()]


def _arguments(settings: ReplaySettings, body: ReplayBody, topics: list[str], output: Optional[str]) -> list[str]:
    """The replay's command line (the Postgres DSN goes by environment: no password in `ps`)."""
    args = [f"--brokers={settings.brokers}", f"--topics={','.join(topics)}", f"--dlq_topic={settings.dlq_topic}",
            f"--start={body.start}", f"--end={body.end}", f"--progress_every={PROGRESS_EVERY_S}"]
    if output:
        args.append(f"--output={output}")
    return args + ["--aggregates"] * body.aggregates + ["--overwrite"] * body.overwrite


def _check(settings: ReplaySettings, body: ReplayBody, topics: list[str]) -> tuple[Optional[str], int]:
    """(absolute output, records in the range), or the HTTP error replay's own check gives."""
    output = os.path.join(settings.repo, body.output) if body.output else None
    try:
        output = check_outputs(output, body.aggregates, False, body.overwrite)
        config = KafkaReadConfig(brokers=settings.brokers, commit_offsets=False)
        resolved, _ = resolve_request(config, topics, body.start, body.end, None)
    except OutputExists as e:
        raise HTTPException(409, str(e)) from None
    except BadRangeRequest as e:
        raise HTTPException(400, str(e)) from None
    except KafkaException as e:
        raise HTTPException(503, f"cannot reach Kafka at {settings.brokers}: {e}") from None
    return output, resolved.total_records


def make_replay_router(settings: ReplaySettings) -> APIRouter:
    """POST /events/replay and GET /events/replay/{replay_id}, with a lifespan that
    terminates a running replay when the app shuts down."""
    runs = ReplayRuns(settings.work_dir, settings.repo)

    @asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(runs.shutdown, SHUTDOWN_GRACE_S)

    router = APIRouter(lifespan=lifespan, dependencies=[Depends(_authorizer(settings.token))], tags=["replay"])

    @router.post("/events/replay", status_code=202)
    def start_replay(body: ReplayBody, request: Request, response: Response) -> dict:
        """Checks the request as replay would, then starts it: 202 with its id and status URL."""
        cid = correlation_id(request)
        response.headers[HEADER] = cid
        topics = _topics(body, settings.topics)
        output, total = _check(settings, body, topics)
        try:
            run = runs.start(_arguments(settings, body, topics, output), body.model_dump(), output, cid, total,
                             env={"POSTGRES_DSN": settings.postgres_dsn})
        except Busy as e:
            raise HTTPException(409, f"replay {e} is running; ask again when it has finished "
                                     f"(GET /events/replay/{e})") from None
        url = request.url_for("replay_status", replay_id=run.replay_id).path
        return {"replay_id": run.replay_id, "status_url": url, "state": run.state, "correlation_id": cid,
                "records_in_range": total}

    @router.get("/events/replay/{replay_id}", name="replay_status")
    def replay_status(replay_id: str) -> dict:
        """The replay's state, progress and, once it ended, summary and exit code; 404 if unknown."""
        run = runs.get(replay_id)
        if run is None:
            raise HTTPException(404, f"no replay {replay_id} (this service keeps its replays until it restarts)")
        return run.snapshot()

    router.replay_runs = runs  # for an app that wants to wait for or list them
    return router
