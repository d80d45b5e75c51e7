"""pykern: hand-written CUDA/C++ and Triton kernels as drop-in torch.nn.functional ops."""

from pykern import functional, nn, ops  # noqa: F401  (ops registers torch.ops.pykern.*)
from pykern._ext import has_cuda
from pykern.backends import get_backend, set_backend, use_backend
from pykern.convert import ConvertSummary, convert
from pykern.fuse import fuse
from pykern.info import info

__version__ = "0.1.0"
__all__ = [
    "functional",
    "nn",
    "get_backend",
    "set_backend",
    "use_backend",
    "has_cuda",
    "info",
    "convert",
    "ConvertSummary",
    "fuse",
]
