"""Alias, for one release, of ``python -m pipelines.recover_dead_letters`` (where the command now lives)."""
from pipelines.recover_dead_letters import main

if __name__ == "__main__":
    raise SystemExit(main())
