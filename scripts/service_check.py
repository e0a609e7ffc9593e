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


# After every record is decided, how long to wait for a pane of every window size. A
# long window's early pane may come only with its on-time pane (README "Known limits":
# Prism schedules no processing-time firing for an element whose trigger was due), so
# the check goes on without it, and says so.
PANE_GRACE_S = 8.0


def undecided(status: dict, valid: int, invalid: int) -> list[str]:
    """In: a /events/status answer and the counts produced. Out: what keeps it from being
    drained (lag 0, every record decided); empty when drained."""
    events = status.get("events") or {}
    published = sum((events.get("dead_letters_published") or {}).values())
    gaps = [f"lag {status.get('lag_total')}" if status.get("lag_total") != 0 else "",
            f"{events.get('valid')} of {valid} valid events" if events.get("valid") != valid else "",
            f"{published} of {invalid} dead letters published" if published != invalid else "",
            f"job metrics: {status['job']['metrics_error']}" if (status.get("job") or {}).get("metrics_error") else ""]
    return [g for g in gaps if g]


def unwritten(status: dict) -> list[str]:
    """The window sizes with no pane written yet."""
    return [w for w in WINDOWS if w not in (status.get("last_pane") or {})]


def wait_drained(url: str, valid: int, invalid: int, wait_s: float) -> tuple[Optional[dict], str]:
    """The first drained /events/status answer (with a pane of every size, or once
    PANE_GRACE_S passed without), or None and why not: ``wait_s`` ran out, or the
    service went away (the job ended) after it had answered."""
    deadline, seen, decided_at = time.monotonic() + wait_s, None, None
    while time.monotonic() < deadline:
        try:
            status = httpx.get(f"{url}/events/status", timeout=5).json()
        except httpx.TransportError:
            if seen is not None:
                return None, f"the service stopped answering (the job ended); last seen: {seen}"
            status = None  # not listening yet
        except (httpx.HTTPError, ValueError) as e:
            status, seen = None, f"{type(e).__name__}: {e}"
        if status is not None:
            gaps = undecided(status, valid, invalid)
            decided_at = decided_at or (time.monotonic() if not gaps else None)
            if not gaps and (not unwritten(status) or time.monotonic() - decided_at >= PANE_GRACE_S):
                return status, ""
            seen = "; ".join(gaps) or f"no pane yet for {','.join(unwritten(status))}"
        time.sleep(0.5)
    return None, f"{wait_s:.0f}s passed; last seen: {seen or 'no answer'}"


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
    written = [w for w in WINDOWS if w in sizes]
    out.append(("aggregation_window_size", "rows > 0 per size written", shown_sizes,
                WINDOWS[0] in written and all(sizes[w] > 0 for w in written)))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.service_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--url", default="http://127.0.0.1:8080", help="where the analytics service listens")
    ap.add_argument("--expect-valid", type=int, required=True, help="valid events produced")
    ap.add_argument("--expect-invalid", type=int, required=True, help="malformed records produced")
    ap.add_argument("--wait", type=float, default=300.0, help="seconds to wait for the job to drain")
    a = ap.parse_args(argv)
    status, why = wait_drained(a.url, a.expect_valid, a.expect_invalid, a.wait)
    if status is None:
        print(f"error: {a.url}/events/status did not show lag 0 with {a.expect_valid:,} valid events and "
              f"{a.expect_invalid:,} dead letters: {why}", file=sys.stderr)
        return 1
    print(f"/events/status ({a.url}):")
    print_status(status)
    if unwritten(status):
        print(f"  (no pane yet for {','.join(unwritten(status))} after {PANE_GRACE_S:.0f}s: a long window's "
              "early pane may wait for its on-time pane; see README Known limits)")
    print(f"\n/metrics, parsed by prometheus_client:\n  {'metric':34s} {'expected':>26s} {'scraped':>26s}")
    rows = checks(scrape(a.url), a.expect_valid, a.expect_invalid)
    for name, want, got, ok in rows:
        print(f"  {name:34s} {want:>26s} {got:>26s}  {'OK' if ok else 'MISMATCH'}")
    return 0 if all(ok for *_, ok in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
