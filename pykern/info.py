"""pykern.info(): what this install is and what it can run."""

from __future__ import annotations

import importlib.metadata

import torch

from pykern import _ext


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:  # pykern run from a source tree, say
        return "not installed"


def info_dict() -> dict[str, object]:
    """The facts info() prints, as a dict."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "pykern": _version("pykern"),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "backends_compiled": ["cpu"] + (["cuda"] if _ext.has_cuda() else []),
        "cuda_archs": _ext.cuda_archs(),
        "triton": _version("triton"),
        "gpu": gpu,
    }


def info(file=None) -> dict[str, object]:
    """Prints version, torch, compiled backends (CPU, CUDA archs), triton and the visible GPU."""
    facts = info_dict()
    archs = ", ".join(facts["cuda_archs"]) or "-"
    lines = [
        f"pykern   {facts['pykern']}",
        f"torch    {facts['torch']} (CUDA {facts['torch_cuda'] or 'none: CPU build'})",
        f"compiled {', '.join(facts['backends_compiled'])} (CUDA archs: {archs})",
        f"triton   {facts['triton']}",
        f"GPU      {facts['gpu'] or 'none visible'}",
    ]
    print("\n".join(lines), file=file)
    return facts
