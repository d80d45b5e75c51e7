"""`python -m pykern.bench`: see pykern/bench/cli.py."""

from pykern.bench.cli import main

raise SystemExit(main())
