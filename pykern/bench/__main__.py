"""`python -m pykern.bench`: see pykern/bench/cli.py."""

from pykern.bench.cli import main

if __name__ == "__main__":  # prewarm's spawned workers import this module too
    raise SystemExit(main())
