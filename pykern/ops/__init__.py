"""Imports every family so that torch.ops.pykern.* exist after `import pykern`."""

from pykern.ops import conv, layout, norm, pooling  # noqa: F401
