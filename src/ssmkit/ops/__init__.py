"""Pure tensor functions: the recurrences and convolutions every ssmkit layer is built from.

Each op has a plain loop oracle in :mod:`ssmkit.ops.reference`.
"""

# _numba_cache first: it keys numba's kernel cache by the jitted sources before any kernel is defined
from . import _numba_cache, reference  # noqa: F401
from .decode_linear import decode_linear
from .fft_conv import fft_conv
from .int4_linear import dequantize_int4, int4_linear, quantize_int4
from .int8_linear import dequantize_int8, int8_linear, quantize_int8
from .linear_scan import fused_kernels, linear_scan
from .mamba2_step import Mamba2StackPlan, Mamba2StepWeights, mamba2_stack_step, mamba2_step
from .mamba3 import Mamba3ScanState, mamba3, mamba3_step
from .mamba_step import MambaStackPlan, MambaStepWeights, mamba_stack_step, mamba_step
from .selective_scan import selective_scan
from .ssd import ssd

__all__ = ["fused_kernels", "linear_scan", "selective_scan", "ssd", "fft_conv", "int8_linear", "quantize_int8",
           "dequantize_int8", "reference", "mamba_step", "mamba_stack_step", "MambaStepWeights", "MambaStackPlan",
           "decode_linear", "mamba3", "mamba3_step", "Mamba3ScanState", "int4_linear", "quantize_int4",
           "dequantize_int4", "mamba2_step", "mamba2_stack_step", "Mamba2StepWeights", "Mamba2StackPlan"]
