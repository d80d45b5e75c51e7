"""pykern's benchmark report: `python -m pykern.bench` (see cli.py, and bench/README.md in the
repository).

harness.py times and records; layout.py, pooling.py, norm.py, conv.py, attention.py list the
cases and providers of one family, e2e.py the end-to-end ResNet-50; run.py runs them and writes
report.json; report.py renders report.md, charts.py the PNG charts, compare.py two reports side
by side. The repository's bench/ keeps the pytest-benchmark file, gpu_check.sh and the committed
results.
"""
