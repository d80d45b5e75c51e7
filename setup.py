"""Builds pykern._C: the C++ CPU references always, the CUDA kernels when asked or found.

PYKERN_BUILD_CUDA=auto (default) builds CUDA sources when nvcc and a CUDA build of torch are
both present; =1 requires them; =0 never builds them. No GPU is ever queried here: a CUDA
build on a machine without a GPU is normal (CI, build hosts).
"""

import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0+PTX"  # A100, H100, plus PTX for newer parts


def find_nvcc() -> str | None:
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    candidates = [os.path.join(cuda_home, "bin", "nvcc")] if cuda_home else []
    candidates += [shutil.which("nvcc") or "", "/usr/local/cuda/bin/nvcc"]
    return next((c for c in candidates if c and os.path.exists(c)), None)


def want_cuda() -> bool:
    flag = os.environ.get("PYKERN_BUILD_CUDA", "auto").strip().lower()
    nvcc = find_nvcc()
    have = nvcc is not None and torch.version.cuda is not None
    if flag in ("0", "off", "false", "no"):
        return False
    if flag in ("1", "on", "true", "yes"):
        if not have:
            raise RuntimeError(
                "PYKERN_BUILD_CUDA=1 but "
                + ("nvcc was not found (set CUDA_HOME)" if nvcc is None else "torch is a CPU build")
            )
        return True
    if flag != "auto":
        raise ValueError(f"PYKERN_BUILD_CUDA must be auto, 0 or 1, not {flag!r}")
    return have


def sources(pattern: str) -> list[str]:
    # Relative paths: setuptools refuses absolute source paths in a wheel build.
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    cxx_flags = ["-O3", "-fopenmp"]
    common = dict(
        name="pykern._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    cpu_sources = sources("csrc/pykern.cpp") + sources("csrc/cpu/*.cpp")
    if not want_cuda():
        return CppExtension(sources=cpu_sources, extra_compile_args={"cxx": cxx_flags}, **common)
    archs = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    # Recorded for pykern.info(); commas, not ';', so the flag survives the shell.
    cxx_flags.append("-DPYKERN_CUDA_ARCHS=" + ",".join(archs.replace(";", " ").split()))
    nvcc = find_nvcc()
    os.environ.setdefault("CUDA_HOME", os.path.dirname(os.path.dirname(nvcc)))
    return CUDAExtension(
        sources=cpu_sources + sources("csrc/cuda/*.cu"),
        define_macros=[("PYKERN_WITH_CUDA", "1")],
        extra_compile_args={
            "cxx": cxx_flags,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr"],
        },
        **common,
    )


setup(
    packages=["pykern", "pykern.ops", "pykern.nn", "pykern.bench", "pykern.triton_kernels"],
    package_dir={"pykern": "pykern", "pykern.triton_kernels": "triton_kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
