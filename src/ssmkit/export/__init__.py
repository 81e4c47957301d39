"""Deployment formats: GGUF for llama.cpp (Mamba, Mamba-2) and ONNX prefill/step graphs for onnxruntime.

    to_gguf(model, "model.gguf", quant="q8_0", tokenizer="byte")     # see ssmkit.export.gguf
    export_onnx(model, "model-onnx"); OnnxLM("model-onnx")            # see ssmkit.export.onnx

The GGUF reader (:func:`ssmkit.interop.from_gguf`) lives in :mod:`ssmkit.interop.gguf`. The optional packages
(gguf, onnx, onnxruntime, onnxscript: ``pip install 'ssmkit[export]'``) are imported only when used.
"""

from .gguf import QUANTS, check_exportable, to_gguf
from .onnx import OnnxLM, export_onnx

__all__ = ["QUANTS", "OnnxLM", "check_exportable", "export_onnx", "to_gguf"]
