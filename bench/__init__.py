"""pykern benchmarks: `python -m bench.run`, then `python -m bench.report`.

harness.py times and records; <family>.py (layout.py, ...) lists the cases and providers of one
family; run.py runs them and writes results.json; report.py turns that into markdown;
test_bench.py runs the same cases through pytest-benchmark; gpu_check.sh is the script for a
lent GPU machine. See bench/README.md.
"""
