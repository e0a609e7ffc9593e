"""Throughput and latency of the streaming job against a plain-Python baseline.

    python -m scripts.benchmark [--events 200000] [--latency-seconds 20] [--rate 2000] [--json PATH]
    python -m scripts.benchmark --skip-sinks-off --skip-replay --skip-latency --drains 10 --load 2

Everything runs on the local stack of scripts/stack.sh, isolated from demos and
tests the way the integration tests are (tests/integration/conftest.py's
``isolated_stack``): its own topics (the real names plus a unique suffix, same
partition counts), its own Postgres schema (through search_path in the DSN) and
its own Redis database (flushed), all removed again at the end, also on failure.

1. Throughput: N generated events (2 h of event time) are produced once, then
   a. a plain loop (confluent_kafka + fastavro, no Beam, nothing from
      transforms/) decodes them and folds them into the 1m/5m/1h/1d windows
      (``baseline``);
   b. ``pipelines.streaming --until_idle 3 --start_from earliest`` runs on them
      with every sink on, then again with ``--sinks none --archive false``
      (``throughput``);
   c. ``pipelines.replay`` writes them to Parquet (``replay``).
2. Latency: the streaming job runs on live traffic at ``--rate`` events/s whose
   event time is the send time; a poller reads the 1-minute overall count in
   Redis every 50 ms, and each event's latency is the time from its send to the
   first poll at which its window's count covers it (``latency``).
3. Memory: ``--memory_hours`` (24) of event time at the throughput runs' events
   per hour are produced and read by the open-ended job (no --until_idle, so
   window state expires); the resident set of its process tree (launcher with
   the SDK worker, Prism) is sampled every second against its watermark: peak,
   final, after each hour of event time, and the growth per hour (``memory``).

``--drains N`` repeats 1b (all sinks) N times on the same produced events, each
with a fresh consumer group and with window_metrics, window_ledger, raw_events
and the Redis DB emptied first, and checks each against the baseline's fold
(every overall window of every size in Postgres and in Redis, ``check``);
``--load K`` runs K busy-loop processes beside the drains (a loaded machine)
and reports the load average during them (``drains``).

Figures and ratios are printed, never asserted: the numbers depend on the
machine and on whatever else runs on it (the load average is reported). The
report is data (``report.Report``) with one printer (``printer``).
"""
