"""Inference: autoregressive generation (prefill with the parallel forward, then O(1) recurrent steps).

    from ssmkit.infer import generate, stream_generate
    new_tokens = generate(model, input_ids, 32)                         # greedy (default), (batch, 32)
    fast = quantize_weights(model)                                      # int8 weights for decoding
    new_tokens = generate(model, input_ids, 32, draft_model=small, num_draft=4)   # speculative, same output
"""

from .generate import generate, stream_generate
from .multitoken import Snapshots, forward_snapshots
from .quantize import Int4Linear, Int8Linear, quantize_weights
from .sampling import filter_logits, sample_from_logits, select_tokens
from .speculative import SpecStats, self_draft, speculative_generate
from .state_quant import quantize_state, step_int8_state
from .w8a8 import quantize_w8a8

__all__ = ["Int4Linear", "Int8Linear", "Snapshots", "SpecStats", "filter_logits", "forward_snapshots", "generate",
           "quantize_state", "quantize_w8a8", "quantize_weights", "sample_from_logits", "select_tokens", "self_draft",
           "speculative_generate", "step_int8_state", "stream_generate"]
