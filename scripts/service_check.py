"""Checks a running job's analytics service against what was produced: /events/status, then /metrics.

    python -m scripts.service_check --url http://127.0.0.1:8080 --expect-valid 19600 --expect-invalid 400

Waits (``--wait`` seconds at most) until /events/status shows every partition
drained (lag 0), the job decided every record (valid events and dead
letters equal to the expected counts) and wrote a pane of every window size, prints a summary of the status, then
scrapes /metrics with prometheus_client's parser and prints one row per seed
metric: expected, scraped, OK or MISMATCH. Exit code 0 when all are OK, 1 if
not (or when the wait ran out).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

import httpx
from prometheus_client.parser import text_string_to_metric_families

WINDOWS = ("1m", "5m", "1h", "1d")


def drained(status: dict, valid: int, invalid: int) -> bool:
    """In: a /events/status answer and the counts produced. Out: lag 0 and every record decided."""
    events = status["events"]
    return (status.get("lag_total") == 0 and events["valid"] == valid
            and sum(events["dead_letters_published"].values()) == invalid
            and set(WINDOWS) <= set(status.get("last_pane") or {}))  # a pane of every size written


def wait_drained(url: str, valid: int, invalid: int, wait_s: float) -> Optional[dict]:
    """The first /events/status answer that is ``drained``, or None when ``wait_s`` ran out."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            status = httpx.get(f"{url}/events/status", timeout=5).json()
            if drained(status, valid, invalid):
                return status
        except (httpx.HTTPError, ValueError, KeyError):
            pass  # not listening yet, or the job is still starting
        time.sleep(0.5)
    return None


def print_status(status: dict) -> None:
    """A few lines of /events/status for a person."""
    events = status["events"]
    print(f"  job {status['job']['state']}, up {status['uptime_s']:.0f}s, {events['valid']:,} valid events "
          f"({len(events['by_type'])} types), {sum(events['dead_letters'].values()):,} dead letters, "
          f"lag {status['lag_total']} over {len(status['partitions'])} partitions")
    print(f"  watermark {status['watermark']['iso']}; last panes: "
          + ", ".join(f"{w} {p['rows']} rows" for w, p in status["last_pane"].items()))


def scrape(url: str) -> dict[str, dict]:
    """{sample name: {labels (sorted tuple): value}} of one /metrics scrape."""
    samples: dict[str, dict] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for s in family.samples:
            samples.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return samples


def checks(samples: dict, valid: int, invalid: int) -> list[tuple[str, str, str, bool]]:
    """(metric, expected, scraped, ok) per seed metric."""
    def total(name: str) -> int:
        return int(sum(samples.get(name, {}).values()))

    sizes = {dict(labels).get("window"): v for labels, v in samples.get("aggregation_window_size", {}).items()}
    shown_sizes = " ".join(f"{w}={int(sizes[w])}" for w in WINDOWS if w in sizes) or "none"
    rows = [("learning_events_processed_total", valid, total("learning_events_processed_total")),
            ("schema_validation_errors_total", invalid, total("schema_validation_errors_total")),
            ("dlq_messages_total", invalid, total("dlq_messages_total")),
            ("event_processing_duration_count", valid + invalid, total("event_processing_duration_count"))]
    out = [(name, f"{want:,}", f"{got:,}", want == got) for name, want, got in rows]
    out.append(("aggregation_window_size", "rows > 0 for " + ",".join(WINDOWS), shown_sizes,
                all(sizes.get(w, 0) > 0 for w in WINDOWS)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.service_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="where the analytics service listens")
    ap.add_argument("--expect-valid", type=int, required=True, help="valid events produced")
    ap.add_argument("--expect-invalid", type=int, required=True, help="malformed records produced")
    ap.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the job to drain")
    a = ap.parse_args(argv)
    status = wait_drained(a.url, a.expect_valid, a.expect_invalid, a.wait)
    if status is None:
        print(f"error: {a.url}/events/status did not show lag 0 with {a.expect_valid:,} valid events and "
              f"{a.expect_invalid:,} dead letters within {a.wait:.0f}s", file=sys.stderr)
        return 1
    print(f"/events/status ({a.url}):")
    print_status(status)
    print(f"\n/metrics, parsed by prometheus_client:\n  {'metric':34s} {'expected':>26s} {'scraped':>26s}")
    rows = checks(scrape(a.url), a.expect_valid, a.expect_invalid)
    for name, want, got, ok in rows:
        print(f"  {name:34s} {want:>26s} {got:>26s}  {'OK' if ok else 'MISMATCH'}")
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
