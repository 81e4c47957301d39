"""Inference: autoregressive generation (prefill with the parallel forward, then O(1) recurrent steps).

    from ssmkit.infer import generate, stream_generate
    new_tokens = generate(model, input_ids, 32)                         # greedy (default), (batch, 32)
    fast = quantize_weights(model)                                      # int8 weights for decoding
"""

from .generate import generate, stream_generate
from .quantize import Int8Linear, quantize_weights
from .sampling import filter_logits, sample_from_logits, select_tokens

__all__ = ["Int8Linear", "filter_logits", "generate", "quantize_weights", "sample_from_logits", "select_tokens",
           "stream_generate"]
