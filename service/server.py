"""Runs the service's HTTP server (uvicorn) on a daemon thread of the job's launcher.

    service = Service.start(analytics_options, "127.0.0.1", 8080, shown_options)   # listening, or ServerError
    service.ctx.attach(result)      # once the pipeline runs
    service.stop()                  # last: bounded, at most STOP_S

On a thread, uvicorn installs no signal handlers: SIGTERM and Ctrl-C stay the
launcher's, which drains the job first and stops the server last.
"""
from __future__ import annotations

import threading
import time

import uvicorn

from service.app import ServiceContext, create_app

START_S = 15.0
# The app's lifespan ends a running replay at shutdown (SIGTERM, SIGKILL 10 s later:
# service/replay_api.py); the stop waits that long, plus margin, and no longer.
STOP_S = 20.0


class ServerError(RuntimeError):
    """The server could not start (the port is taken, the host is not ours)."""


class Server:
    def __init__(self, app, host: str, port: int):
        # log_config None: uvicorn's loggers go through the job's own log format.
        config = uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                lifespan="on", timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="http-service", daemon=True)
        self.host, self.port = host, port
        self._failure: list = []

    def _run(self) -> None:
        try:
            self._server.run()
        except BaseException as e:  # uvicorn exits the thread (SystemExit) when it cannot bind
            self._failure.append(e)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + START_S
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self._server.should_exit = True
                raise ServerError(f"cannot serve HTTP on {self.host}:{self.port} (port taken, or not an "
                                  "address of this machine?)")
            time.sleep(0.02)
        if self.port == 0:  # an ephemeral port (tests): the one the kernel gave
            self.port = self._server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(STOP_S)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"


class Service:
    """The HTTP service of a running job: its context (what it reports) and its server."""

    def __init__(self, ctx: ServiceContext, server: Server):
        self.ctx, self.server = ctx, server

    @classmethod
    def start(cls, opts, host: str, port: int, shown_options: dict) -> "Service":
        """In: the job's AnalyticsOptions, where to listen, the options to show (redacted).
        Out: the service, listening. Raises ServerError when it cannot listen."""
        ctx = ServiceContext.for_job(opts, shown_options)
        server = Server(create_app(ctx), host, port)
        try:
            server.start()
        except ServerError:
            ctx.close()
            raise
        ctx.start()
        return cls(ctx, server)

    def stop(self) -> None:
        """Last of all: the server closes, then the clients it held."""
        self.server.stop()
        self.ctx.close()
