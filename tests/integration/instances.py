"""Private servers for outage tests and chaos trials: scripts/stack.sh ``instance`` verbs.

A private Redis, Postgres or Kafka broker runs on a free loopback port with
its own data, so a test or a chaos trial can stop and start it (an outage)
without touching the shared stack that other tests use at the same time.
"""
from __future__ import annotations

import os
import random
import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass

from tests.integration.conftest import REPO

STACK_SH = os.path.join(REPO, "scripts", "stack.sh")
OUTAGE_S = 4.0  # the default outage: tests measure outages of seconds


def stack_sh(*args: str, timeout: float = 120) -> str:
    proc = subprocess.run([STACK_SH, *args], capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"stack.sh {' '.join(args)}: {proc.stdout[-2000:]}{proc.stderr[-2000:]}"
    return proc.stdout


def free_port(span: int = 1) -> int:
    """A loopback port, with the ``span - 1`` ports above it, free now and below
    the kernel's ephemeral range: a port the kernel hands to client sockets
    (as bind(0) does) may be taken again by one before the server binds it."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 32000 - span)
        try:
            for p in range(port, port + span):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", p))
        except OSError:
            continue
        return port
    raise RuntimeError("no free loopback port")


@dataclass
class Instance:
    """A private server of scripts/stack.sh: ``stop``/``start`` make an outage."""
    service: str
    port: int

    def start(self) -> None:
        stack_sh("instance", "up", self.service, str(self.port))

    def stop(self) -> None:
        stack_sh("instance", "down", self.service, str(self.port))

    @contextmanager
    def outage(self, seconds: float = OUTAGE_S):
        """Stops the server now and starts it again ``seconds`` later, from a thread."""
        self.stop()
        failed: list = []

        def come_back():
            time.sleep(seconds)
            try:
                self.start()
            except BaseException as e:  # reported below, on the test's thread
                failed.append(e)

        t = threading.Thread(target=come_back, daemon=True)
        t.start()
        try:
            yield
        finally:
            t.join(seconds + 120)
        assert not t.is_alive() and not failed, f"{self.service} did not come back: {failed}"


@contextmanager
def private(service: str, span: int = 1):
    """A private ``service`` on a free port (a Kafka broker takes two: its controller is PORT+1),
    purged when the block ends, even when it fails."""
    port = free_port(span)
    inst = Instance(service, port)
    try:
        inst.start()
        yield inst
    finally:
        subprocess.run([STACK_SH, "instance", "purge", service, str(port)], capture_output=True, timeout=180)
