"""Loads the compiled extension pykern._C once and says what it was built with."""

from __future__ import annotations

try:
    from pykern import _C
except ImportError as err:  # pragma: no cover - only on a broken install
    raise ImportError(
        "pykern._C, the compiled extension, could not be imported. Build it with "
        "`pip install --no-build-isolation -e .` from the repository root "
        f"(original error: {err})"
    ) from err

BUILD_CUDA_HINT = (
    "this pykern build has no CUDA kernels; rebuild with nvcc and a CUDA build of torch present: "
    "CUDA_HOME=/usr/local/cuda PYKERN_BUILD_CUDA=1 pip install --no-build-isolation -e ."
)


def has_cuda() -> bool:
    """True when the CUDA kernels were compiled into pykern._C."""
    return bool(_C.built_with_cuda())


def cuda_archs() -> list[str]:
    """The CUDA architectures compiled in, e.g. ['8.0', '9.0+PTX']; empty without CUDA."""
    return [a for a in _C.cuda_archs().split(",") if a]
