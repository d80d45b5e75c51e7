"""pykern's benchmark folder in the repository: test_bench.py (the cases through
pytest-benchmark), test_cli.py (the report command's own tests), gpu_check.sh (the script for a
lent GPU machine), results/ (committed reports) and README.md. The benchmark code itself is the
package pykern.bench (`python -m pykern.bench`), so that it ships in the wheel.
"""
