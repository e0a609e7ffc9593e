"""What folding costs: transforms.aggregate.fold_events now against another git revision's, same events.

    python -m scripts.benchmark.fold_cost                 # against HEAD
    python -m scripts.benchmark.fold_cost --against main

Generates a stream (scripts.produce), folds it in 500-event batches into the
four window sizes with both versions, interleaved in one process, and prints
the best of several runs of each and their ratio. A figure, not a test.
"""
from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import timeit
from typing import Optional

import transforms.aggregate as current
from schemas.settings import WINDOW_SIZES_S
from scripts.produce import TrafficConfig, generate
from transforms.records import Event


def revision_module(rev: str):
    source = subprocess.run(["git", "show", f"{rev}:transforms/aggregate.py"], check=True,
                            capture_output=True, text=True).stdout
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"aggregate_at_{rev}", f.name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.benchmark.fold_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--against", default="HEAD", help="git revision to compare with (default HEAD)")
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--concepts", type=int, default=40)
    args = ap.parse_args(argv)
    records = [r for r in generate(TrafficConfig(events=args.events, users=args.users, concepts=args.concepts,
                                                 span_seconds=3600, seed=3)) if r.error_code is None]
    events = [Event(r.event_type, r.fields["occurred_at"], r.fields, 1, 1, "t", 0, i) for i, r in enumerate(records)]
    batches = [events[i:i + 500] for i in range(0, len(events), 500)]
    sizes = tuple(s * 1000 for s in WINDOW_SIZES_S)
    best, versions = {}, ((args.against, revision_module(args.against)), ("worktree", current))
    for _ in range(3):
        for name, module in versions:
            t = min(timeit.repeat(lambda: [module.fold_events(b, sizes) for b in batches], number=1, repeat=5))
            best[name] = min(best.get(name, t), t)
    for name, t in best.items():
        print(f"{name:>10}: {t * 1000:7.1f} ms for {len(events):,} events = {len(events) / t:,.0f} events/s")
    print(f"ratio worktree/{args.against}: {best['worktree'] / best[args.against]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
