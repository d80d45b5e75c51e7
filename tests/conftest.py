"""Test setup shared by every family.

TRITON_INTERPRET=1 is set here, before anything imports triton, so the Triton kernels run on
CPU tensors in Triton's interpreter; a GPU run sets TRITON_INTERPRET=0 to run them compiled.
No device is queried at import: GPU availability is checked inside the fixtures.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import pykern  # noqa: E402
from pykern import backends  # noqa: E402
from pykern._ext import _C  # noqa: E402
from tests.helpers import Target  # noqa: E402

TARGETS = {
    "cpu": Target("cpu", "auto"),
    "triton-interp": Target("cpu", "triton"),
    "cuda": Target("cuda", "cuda"),
    "triton-gpu": Target("cuda", "triton"),
}


def _skip_reason(name: str) -> str | None:
    target = TARGETS[name]
    if target.backend == "triton":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
    if target.device == "cpu":
        if target.backend == "triton" and not backends.triton_interpreted():
            return "Triton on CPU tensors needs TRITON_INTERPRET=1"
        return None
    if not torch.cuda.is_available():
        return "no CUDA GPU visible"
    if target.backend == "cuda" and not pykern.has_cuda():
        return "pykern was built without CUDA kernels"
    if target.backend == "triton" and backends.triton_interpreted():
        return "TRITON_INTERPRET=1: Triton runs interpreted, not on the GPU"
    return None


@pytest.fixture(params=list(TARGETS), ids=list(TARGETS))
def target(request):
    """Where an op runs: a device and a backend (cpu, triton-interp, cuda, triton-gpu)."""
    reason = _skip_reason(request.param)
    if reason is not None:
        pytest.skip(reason)
    target = TARGETS[request.param]
    # set_backend too: a compiled backward on a GPU runs in autograd's device thread, which
    # sees set_backend but no use_backend block (eager gradients follow their forward anyway)
    previous = backends._global_backend
    pykern.set_backend(target.backend)
    try:
        with pykern.use_backend(target.backend):
            yield target
    finally:
        backends._global_backend = previous


@pytest.fixture(autouse=True)
def poisoned_outputs():
    """Every kernel output starts as 0xFF bytes (NaN), so an unwritten element fails."""
    _C.set_poison_outputs(True)
    yield
    _C.set_poison_outputs(False)


def pytest_collection_modifyitems(items):
    # Tests parametrized over GPU targets carry the gpu marker, so `-m gpu` selects them.
    for item in items:
        callspec = getattr(item, "callspec", None)
        name = callspec.params.get("target") if callspec else None
        if name in TARGETS and TARGETS[name].device == "cuda":
            item.add_marker(pytest.mark.gpu)
