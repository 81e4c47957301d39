"""Deployment formats: GGUF for llama.cpp (Mamba, Mamba-2) and ONNX prefill/step graphs for onnxruntime.

The GGUF reader (:func:`ssmkit.interop.from_gguf`) lives in :mod:`ssmkit.interop.gguf`.
"""

from .gguf import QUANTS, check_exportable, to_gguf

__all__ = ["QUANTS", "check_exportable", "to_gguf"]
