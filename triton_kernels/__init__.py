"""Triton kernels, shipped as pykern.triton_kernels. One module per family (layout, ...).

Importing this package imports nothing else: the family modules import triton, and pykern
imports them only when the triton backend runs.
"""

FAMILIES = ("layout", "pooling", "norm", "conv")
