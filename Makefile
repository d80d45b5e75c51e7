# The two commands of README.md, and aliases around them. Each target sets up what it needs:
# a virtual environment in $(VENV) with torch pinned to $(TORCH_VERSION) (its CUDA 13.0 build,
# matching nvcc 13.0), then pykern built in place (CUDA kernels too when nvcc is found).
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.14.1
OUT ?= out
PYTEST_ARGS ?=
BENCH_ARGS ?=
export CUDA_HOME ?= /usr/local/cuda
export PYKERN_BUILD_CUDA ?= auto

PY := $(VENV)/bin/python
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*/*.h)

.PHONY: venv build demo test bench bench-pytest report charts compare gpu-check cmake lint clean

venv: $(VENV)/.installed
$(VENV)/.installed:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q torch==$(TORCH_VERSION) pybind11 ninja numpy packaging setuptools \
		wheel pytest pytest-benchmark matplotlib
	touch $@

build: $(VENV)/.built
$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -m pykern info
	touch $@

# Main job: every op against torch on the best device present, then the benchmark report
# (report.md, report.json and PNG charts in $(OUT)/bench; under ten minutes on a 2-core CPU).
demo: build
	$(PY) -m pykern demo
	$(PY) -m pykern.bench --out $(OUT)/bench $(BENCH_ARGS)
	@echo "report: $(OUT)/bench/report.md"

# The test suite (Triton kernels run in Triton's interpreter on CPU; GPU tests skip without one).
# pytest's exit code 5 (no tests collected) is reported as what it is, and fails.
test: build
	@$(PY) -m pytest tests -ra $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests (exit 5): nothing was tested"; fi; \
	exit $$rc

# The report alone; BENCH_ARGS="--quick --ops conv,attention" and so on (python -m pykern.bench -h).
bench: build
	$(PY) -m pykern.bench --out $(OUT)/bench $(BENCH_ARGS)

# The same cases through pytest-benchmark, one group per op and shape.
bench-pytest: build
	$(PY) -m pytest bench/ --benchmark-only --benchmark-group-by=group $(PYTEST_ARGS)

# report.md again from report.json; the charts from report.json (where matplotlib is).
report:
	$(PY) -m pykern.bench report $(OUT)/bench

charts:
	$(PY) -m pykern.bench charts $(OUT)/bench

# make compare OLD=bench/results/<a>/report.json NEW=$(OUT)/bench/report.json
compare:
	$(PY) -m pykern.bench compare $(OLD) $(NEW)

gpu-check:
	bash bench/gpu_check.sh $(OUT)/gpu_check

cmake: venv
	cmake -S . -B build-cmake -DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')" \
		-DPython3_EXECUTABLE=$(abspath $(PY)) $(CMAKE_ARGS)
	cmake --build build-cmake -j

lint:
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf build build-cmake dist *.egg-info pykern/_C*.so $(VENV)/.built
