"""The boot command of the job's PROCESS environments: starts one Python SDK worker.

    python -m pipelines.worker_boot --id=<worker id> --provision_endpoint=<host:port>

Prism (2.77) runs an environment's ``command`` with only these two arguments
(the id in literal single quotes), not the environment variables that the
Python SDK's worker (apache_beam.runners.worker.sdk_worker_main) reads; Beam's
own boot program, which does this translation, ships only in its container
images. So this asks the runner's provision service for the worker's
provision info (the request carries the ``worker_id`` gRPC metadata), sets
WORKER_ID, PIPELINE_OPTIONS, CONTROL_API_SERVICE_DESCRIPTOR,
LOGGING_API_SERVICE_DESCRIPTOR and RUNNER_CAPABILITIES from it, and runs the
worker in this process. pipelines.workers writes the executable that calls
it; tests/integration/test_restarts.py::test_a_killed_job_with_two_worker_processes_resumes_exactly
runs it.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import grpc
from apache_beam.portability.api import beam_provision_api_pb2, beam_provision_api_pb2_grpc
from google.protobuf import json_format, text_format

# Each worker process numbers its metrics' short ids from 1, and Prism 2.77
# keys them per job: two processes' ids would name each other's counters (the
# job's metrics summed the wrong steps). Starting each process's numbering at
# its pid << SHORT_ID_SHIFT keeps them apart (pids are below 2**22 on Linux).
SHORT_ID_SHIFT = 24


def provision_environment(worker_id: str, endpoint: str, timeout_s: float = 60.0) -> dict[str, str]:
    """The environment variables sdk_worker_main expects, from the runner's provision service."""
    with grpc.insecure_channel(endpoint) as channel:
        stub = beam_provision_api_pb2_grpc.ProvisionServiceStub(channel)
        info = stub.GetProvisionInfo(beam_provision_api_pb2.GetProvisionInfoRequest(),
                                     metadata=[("worker_id", worker_id)], timeout=timeout_s).info
    env = {"WORKER_ID": worker_id,
           "PIPELINE_OPTIONS": json_format.MessageToJson(info.pipeline_options),
           "CONTROL_API_SERVICE_DESCRIPTOR": text_format.MessageToString(info.control_endpoint),
           "RUNNER_CAPABILITIES": " ".join(info.runner_capabilities)}
    if info.HasField("logging_endpoint"):
        env["LOGGING_API_SERVICE_DESCRIPTOR"] = text_format.MessageToString(info.logging_endpoint)
    return env


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipelines.worker_boot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--id", required=True, help="the worker id (Prism quotes it: 'job_env')")
    ap.add_argument("--provision_endpoint", required=True, help="host:port of the runner's provision service")
    a, _ = ap.parse_known_args(argv)
    worker_id = a.id.strip("'\"")
    os.environ.update(provision_environment(worker_id, a.provision_endpoint))
    # The job's option classes, so that the worker parses its options rather than
    # warning about every one it does not know.
    import pipelines.streaming  # noqa: F401
    from apache_beam.runners.worker import sdk_worker, sdk_worker_main
    # Private in Beam 2.77: if it is renamed, setting it would silently do nothing
    # and the processes' counters would mix again, so refuse to start instead.
    if not hasattr(sdk_worker.SHORT_ID_CACHE, "_last_short_id"):
        raise SystemExit("error: this Beam has no SHORT_ID_CACHE._last_short_id; "
                         "pipelines/worker_boot.py must number metric short ids another way")
    sdk_worker.SHORT_ID_CACHE._last_short_id = os.getpid() << SHORT_ID_SHIFT
    sdk_worker_main.main(sys.argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
