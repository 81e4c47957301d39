"""Pure tensor functions: the recurrences and convolutions every ssmkit layer is built from.

Each op has a plain loop oracle in :mod:`ssmkit.ops.reference`.
"""

from . import reference
from .linear_scan import fused_kernels, linear_scan
from .selective_scan import selective_scan

__all__ = ["fused_kernels", "linear_scan", "selective_scan", "reference"]
