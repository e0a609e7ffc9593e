"""Dead-letter recovery: re-publish chosen dead letters to their source topics, once each.

The logic of ``python -m pipelines.recover_dead_letters`` (whose docstring
tells an operator how to use it), in plain Kafka and Postgres clients, without
Beam, so the command starts in a moment:

    request = RecoveryRequest(since_ms=..., until_ms=..., codes=("UNKNOWN_SCHEMA_ID",))
    tally = recover(request)          # BadRequest: exit 2; RecoveryFailed: exit 1

- ``request.py``: the request, the dead letters found, the counts (Tally);
- ``read.py``: reading the dead-letter topic to its end and choosing from it;
- ``ledger.py``: the Postgres ledger ``dead_letter_recoveries`` (claim, confirm);
- ``publish.py``: producing the raw bytes again, chunk by chunk, and ``recover``.
"""
from transforms.recovery.publish import recover
from transforms.recovery.request import BadRequest, RecoveryFailed, RecoveryRequest, Stored, Tally

__all__ = ["BadRequest", "RecoveryFailed", "RecoveryRequest", "Stored", "Tally", "recover"]
