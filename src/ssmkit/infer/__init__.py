"""Inference: autoregressive generation (prefill with the parallel forward, then O(1) recurrent steps).

    from ssmkit.infer import generate, stream_generate
    new_tokens = generate(model, input_ids, 32, temperature=0)          # greedy, (batch, 32)
"""

from .generate import generate, stream_generate
from .sampling import filter_logits, sample_from_logits, select_tokens

__all__ = ["filter_logits", "generate", "sample_from_logits", "select_tokens", "stream_generate"]
