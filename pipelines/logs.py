"""How the commands log: one format for every entry point."""
from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure(level: int = logging.WARNING) -> None:
    """Log lines to stderr, warnings and above by default."""
    logging.basicConfig(level=level, format=FORMAT)
