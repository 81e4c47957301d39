"""Autoregressive generation with constant memory per sequence for recurrent models.

The prompt is prefilled with the parallel forward (``return_final_state=True``); then every new token costs one
recurrent ``step`` per layer (attention layers append to their KV cache). Nothing grows with the generated
length except attention caches: no logits, states or token history are kept by the decode loop.

    tokens = generate(model, input_ids, 64)                                   # greedy (the default), (batch, 64)
    for tok in stream_generate(model, input_ids, 64, temperature=0.7, top_p=0.9, seed=[1, 2]):
        ...                                                                    # tok: (batch,) per step

Ragged batches: give ``prompt_lengths`` (left-aligned prompts) or an ``attention_mask`` (one contiguous run of
ones per row, left or right padding). Rows are prefilled in groups of equal prompt length, each exactly over its
own tokens, so a row's result does not depend on the rest of the batch (with ``seed`` a list of per-row seeds
when sampling).

Decoding is greedy by default (``temperature=0``), as transformers' ``generate`` is, so
``generate(from_transformers(hf), ids, n)`` gives ``hf.generate(ids, max_new_tokens=n)``'s new tokens (up to
near-ties in float32); ``temperature > 0`` samples.

Output: ``generate`` returns the new tokens only, (batch, max_new_tokens) int64. A row stops at its first
``eos_token_id`` (which is included); its later positions hold ``pad_token_id``. Finished rows are dropped from
the computation, and the loop ends once every row has finished.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..models.heads import CausalLM
from ..models.outputs import ModelState
from .fused_hybrid import decode_step
from .prompts import Prompts, parse_prompts
from .sampling import RowRandom, check_sampling_options, select_tokens
from .states import merge_states


def _check_model(model: object) -> CausalLM:
    if not isinstance(model, CausalLM):
        raise TypeError(f"model must be an ssmkit CausalLM or PrefixLM, got {type(model).__name__}")
    if model.training:
        active = [name or "model" for name, m in model.named_modules()
                  if isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0]
        if active:
            raise ValueError(f"model is in training mode with active dropout ({', '.join(active[:3])}"
                             f"{', ...' if len(active) > 3 else ''}); call model.eval() before generating")
    return model


def _check_token_ids(name: str, value: object, vocab_size: int, *, many: bool) -> list[int] | None:
    if value is None:
        return None
    vals = list(value) if many and isinstance(value, (list, tuple)) else [value]
    if not vals or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < vocab_size for v in vals):
        what = "an int or a list of ints" if many else "an int"
        raise ValueError(f"{name} must be None or {what} in [0, vocab_size={vocab_size}), got {value!r}")
    return vals


def _check_cache_limits(model: CausalLM, prompts: Prompts, max_new_tokens: int) -> None:
    """Attention layers with ``max_cache`` (and no sliding window) hold every token they are fed: the longest
    prompt plus max_new_tokens - 1 generated tokens (the last one is never fed back)."""
    from ..layers.attention import Attention

    longest = prompts.max_length
    for i, block in enumerate(model.backbone.blocks):
        layer = block.mixer
        if not isinstance(layer, Attention) or layer.max_cache is None or layer.window is not None:
            continue
        if longest > layer.max_cache:
            row = int((prompts.lengths == longest).nonzero()[0])
            raise ValueError(f"input_ids: row {row}'s prompt has {longest} tokens, more than layer {i} "
                             f"({block.mixer_name}) holds: max_cache={layer.max_cache}")
        need = longest + max(max_new_tokens - 1, 0)
        if need > layer.max_cache:
            raise ValueError(f"max_new_tokens={max_new_tokens} is too large: the longest prompt ({longest}) "
                             f"plus max_new_tokens - 1 = {need} tokens exceed layer {i} ({block.mixer_name})'s "
                             f"max_cache={layer.max_cache}; use at most "
                             f"{layer.max_cache - longest + 1} new tokens")


@torch.no_grad()
def _prefill(model: CausalLM, prompts: Prompts) -> tuple[Tensor, ModelState]:
    """Each group of equal-length prompts through the parallel forward: (last logits (batch, vocab), state)."""
    rows, logits, states = [], [], []
    for r, n in prompts.groups():
        ids, prefix = prompts.gather(r, n)
        hidden, state = model.backbone(ids, prefix_mask=prefix, return_final_state=True, input_name="input_ids")
        logits.append(model.lm_head(hidden[:, -1]))
        states.append(state)
        rows.append(r)
    out = torch.empty((prompts.batch, logits[0].shape[-1]), dtype=logits[0].dtype, device=logits[0].device)
    for r, lg in zip(rows, logits, strict=True):
        out[r] = lg
    return out, merge_states(states, rows, prompts.batch)


@torch.no_grad()
def _step(model: CausalLM, tokens: Tensor, state: ModelState) -> tuple[Tensor, ModelState]:
    return decode_step(model, tokens, state)  # a hybrid stack in one launch when it fits (infer.fused_hybrid)


@dataclass
class _Plan:
    """Validated generation arguments."""

    model: CausalLM
    prompts: Prompts
    max_new_tokens: int
    temperature: float
    top_k: int | None
    top_p: float | None
    eos: list[int] | None
    pad_id: int
    rng: RowRandom | None


def _plan(model: object, input_ids: object, max_new_tokens: object, *, temperature: object, top_k: object,
          top_p: object, eos_token_id: object, pad_token_id: object, seed: object, attention_mask: object,
          prompt_lengths: object, prefix_mask: object) -> _Plan:
    model = _check_model(model)
    vocab = model.config.vocab_size
    prompts = parse_prompts(input_ids, vocab_size=vocab, device=model.backbone.device,
                            attention_mask=attention_mask, prompt_lengths=prompt_lengths, prefix_mask=prefix_mask)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_sampling_options(temperature, top_k, top_p, vocab)
    eos = _check_token_ids("eos_token_id", eos_token_id, vocab, many=True)
    pad = _check_token_ids("pad_token_id", pad_token_id, vocab, many=False)
    pad_id = pad[0] if pad is not None else (eos[0] if eos is not None else 0)
    rng = RowRandom(seed, prompts.batch)  # validates seed even when decoding greedily
    rng = rng if temperature > 0 else None
    _check_cache_limits(model, prompts, max_new_tokens)
    return _Plan(model, prompts, max_new_tokens, float(temperature), top_k, top_p, eos, pad_id, rng)


def stream_generate(
    model: CausalLM,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
    prompt_lengths: Tensor | Sequence[int] | None = None,
    prefix_mask: Tensor | None = None,
) -> Iterator[Tensor]:
    """Generate token by token: yields one (batch,) int64 tensor per step (pad_token_id for finished rows).

    Arguments are validated when this is called, before the first token. Stops after ``max_new_tokens`` steps
    or once every row has produced an EOS. See :func:`generate` for the arguments.
    """
    plan = _plan(model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, attention_mask=attention_mask,
                 prompt_lengths=prompt_lengths, prefix_mask=prefix_mask)
    return _decode(plan)


def _decode(plan: _Plan) -> Iterator[Tensor]:
    """The decode loop (a generator; grad mode is only switched off inside the model calls)."""
    if plan.max_new_tokens == 0:
        return
    model, prompts, rng = plan.model, plan.prompts, plan.rng
    device = prompts.ids.device
    logits, state = _prefill(model, prompts)
    active = torch.arange(prompts.batch, device=device)  # original row of each state row
    eos_ids = None if plan.eos is None else torch.tensor(plan.eos, device=device)
    for t in range(plan.max_new_tokens):
        uniforms = None if rng is None else rng.draw(active)
        tokens = select_tokens(logits, temperature=plan.temperature, top_k=plan.top_k, top_p=plan.top_p,
                               uniforms=uniforms)
        out = torch.full((prompts.batch,), plan.pad_id, dtype=torch.long, device=device)
        out[active] = tokens
        del logits
        yield out
        if t == plan.max_new_tokens - 1:
            return
        if eos_ids is not None:
            keep = ~torch.isin(tokens, eos_ids)
            if not bool(keep.all()):
                if not bool(keep.any()):
                    return
                active, tokens = active[keep], tokens[keep]
                state = state.map(lambda x, k=keep: x[k])
        logits, state = _step(model, tokens, state)


def generate(
    model: CausalLM,
    input_ids: Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    seed: int | Sequence[int] | None = None,
    attention_mask: Tensor | None = None,
    prompt_lengths: Tensor | Sequence[int] | None = None,
    prefix_mask: Tensor | None = None,
    draft_model: CausalLM | None = None,
    num_draft: int | None = None,
    tree: tuple[int, int] | None = None,
) -> Tensor:
    """Continue each prompt by ``max_new_tokens`` tokens: -> new tokens (batch, max_new_tokens) int64.

    Args:
        model: an ssmkit CausalLM (or PrefixLM), in eval mode if it has dropout.
        input_ids: (batch, length) int prompts (only each row's prompt positions are read).
        max_new_tokens: number of tokens to generate per row (>= 0).
        temperature: 0 = greedy (argmax, the default, like transformers' ``generate``); > 0 = sample from
            softmax(logits / temperature) (top_k, top_p and seed apply only then).
        top_k: sample among the k most likely tokens only.
        top_p: sample among the smallest set of most likely tokens with total probability >= top_p.
        eos_token_id: an id or list of ids; a row stops after producing one.
        pad_token_id: fills a row's positions after its EOS (default: the first EOS id, else 0).
        seed: sampling randomness: None (torch's global RNG), an int (one generator for the batch) or one int
            per row (one generator per row: each row samples as it would alone).
        attention_mask: (batch, length) bool or 0/1, True on prompt tokens (one contiguous run per row).
        prompt_lengths: (batch,) lengths of left-aligned prompts (instead of attention_mask).
        prefix_mask: (batch, length) bool, True on prefix tokens, for models with prefix layers (PrefixLM);
            the prompt is prefilled with it and generation continues causally.
        draft_model: a smaller CausalLM with the same vocabulary: speculative decoding (same output as
            without it; see :mod:`ssmkit.infer.speculative`, and its ``self_draft`` for a draft made of the
            model's own first layers).
        num_draft: tokens the draft proposes per round (default 4; needs draft_model).
        tree: (branches, depth): tree drafts instead of a chain (greedy only; needs draft_model).
    """
    if draft_model is not None:
        from .speculative import speculative_generate

        return speculative_generate(
            model, input_ids, max_new_tokens, draft_model=draft_model, num_draft=4 if num_draft is None else num_draft,
            tree=tree, temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, seed=seed, attention_mask=attention_mask, prompt_lengths=prompt_lengths,
            prefix_mask=prefix_mask)[0]
    if num_draft is not None or tree is not None:
        raise ValueError("num_draft and tree need a draft_model (speculative decoding)")
    plan = _plan(model, input_ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                 eos_token_id=eos_token_id, pad_token_id=pad_token_id, seed=seed, attention_mask=attention_mask,
                 prompt_lengths=prompt_lengths, prefix_mask=prefix_mask)
    out = torch.full((plan.prompts.batch, plan.max_new_tokens), plan.pad_id, dtype=torch.long,
                     device=plan.prompts.ids.device)
    for t, tokens in enumerate(_decode(plan)):
        out[:, t] = tokens
    return out
