"""``python -m scripts.benchmark``: see scripts/benchmark/__init__.py and --help."""
import sys

from scripts.benchmark.cli import main

if __name__ == "__main__":
    sys.exit(main())
