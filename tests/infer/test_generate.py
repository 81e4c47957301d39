"""generate / stream_generate: prefill + recurrent steps equal recomputing the whole forward; ragged batches equal
each prompt alone; EOS, padding, streaming and argument checks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.infer import generate, stream_generate
from ssmkit.models import CausalLM, ModelConfig, PrefixLM, Regressor
from tests.infer.util import VOCAB, ids, oracle, tiny_model

PATTERNS = ["mamba*2", "mamba2*2", "mamba,attn", "gated,s4d,rglru", "h3,mamba2"]


# ------------------------------------------------------------------------------------------ against the oracle
@pytest.mark.parametrize("pattern", PATTERNS)
def test_greedy_equals_recomputing_the_full_forward(pattern):
    model = tiny_model(pattern)
    x = ids(2, 7, seed=1)
    out = generate(model, x, 10, temperature=0)
    assert out.shape == (2, 10) and out.dtype == torch.long
    for b in range(2):
        assert torch.equal(out[b], oracle(model, x[b], 10)), f"row {b}"


@pytest.mark.parametrize("pattern", ["mamba*2", "mamba2,attn"])
def test_sampling_equals_the_oracle_with_the_same_draws(pattern):
    model = tiny_model(pattern)
    x = ids(2, 5, seed=2)
    out = generate(model, x, 12, temperature=0.9, top_k=8, top_p=0.95, seed=[11, 12])
    for b in range(2):
        want = oracle(model, x[b], 12, temperature=0.9, top_k=8, top_p=0.95, seed=11 + b)
        assert torch.equal(out[b], want), f"row {b}"
    # the draws matter: another seed gives another continuation
    assert not torch.equal(out, generate(model, x, 12, temperature=0.9, top_k=8, top_p=0.95, seed=[1, 2]))


def test_prefix_lm_prefills_with_the_prefix_mask_then_continues_causally():
    model = tiny_model("mamba,gated,attn", head=PrefixLM)
    x = ids(2, 8, seed=3)
    pm = torch.zeros(2, 8, dtype=torch.bool)
    pm[0, :5] = True
    pm[1, :2] = True
    out = generate(model, x, 8, temperature=0, prefix_mask=pm)
    for b in range(2):
        assert torch.equal(out[b], oracle(model, x[b], 8, prefix_mask=pm[b])), f"row {b}"
    # the prefix mask changes the result (the prefix layers really see it)
    assert not torch.equal(out, generate(model, x, 8, temperature=0))


def test_sliding_window_prompt_longer_than_the_window():
    """A sliding-window cache is bounded by design: prompts and generations longer than the window are fine."""
    model = tiny_model("mamba,attn", mixer_options={"attn": {"n_heads": 2, "mask": "sliding", "window": 3}})
    x = ids(1, 9, seed=4)
    assert torch.equal(generate(model, x, 9, temperature=0)[0], oracle(model, x[0], 9))


# ------------------------------------------------------------------------------------------ ragged batches
def _check_ragged(model, lengths, n, sample, left, pm_len=None):
    batch, width = len(lengths), max(lengths)
    x = ids(batch, width, seed=sum(lengths))
    kw = dict(temperature=0.8, top_p=0.9, seed=[100 + b for b in range(batch)]) if sample else {"temperature": 0}
    prefix = None
    if left:  # left padding described by an attention mask
        mask = torch.zeros(batch, width, dtype=torch.long)
        for b, n_b in enumerate(lengths):
            mask[b, width - n_b:] = 1
        ragged = {"attention_mask": mask}
        prompt = [x[b, width - n_b:] for b, n_b in enumerate(lengths)]
    else:
        ragged = {"prompt_lengths": lengths}
        prompt = [x[b, :n_b] for b, n_b in enumerate(lengths)]
    if pm_len is not None:
        prefix = torch.zeros(batch, width, dtype=torch.bool)
        for b, n_b in enumerate(lengths):
            start = width - n_b if left else 0
            prefix[b, start:start + min(pm_len, n_b)] = True
    out = generate(model, x, n, prefix_mask=prefix, **ragged, **kw)
    for b in range(batch):
        alone_kw = dict(kw, seed=[100 + b]) if sample else kw
        start = width - lengths[b] if left else 0
        pm = None if prefix is None else prefix[b, start:start + lengths[b]][None]
        alone = generate(model, prompt[b][None], n, prefix_mask=pm, **alone_kw)
        assert torch.equal(out[b], alone[0]), f"row {b} (length {lengths[b]}): {out[b]} vs alone {alone[0]}"


RAGGED_MODELS = {
    "mamba,attn": lambda: tiny_model("mamba,attn"),
    "mamba2,gated": lambda: tiny_model("mamba2,gated"),
    # KV caches of different lengths (trimmed to the window) merged across rows; rotary positions per row
    "sliding-rotary-attn,mamba2": lambda: tiny_model(
        "attn,mamba2", mixer_options={"attn": {"n_heads": 2, "mask": "sliding", "window": 3, "rotary": True}}),
}


@pytest.mark.parametrize("name", list(RAGGED_MODELS))
@settings(max_examples=6)
@given(lengths=st.lists(st.integers(1, 7), min_size=2, max_size=4), sample=st.booleans(), left=st.booleans())
def test_ragged_batch_equals_each_prompt_alone(name, lengths, sample, left):
    _check_ragged(RAGGED_MODELS[name](), lengths, 5, sample, left)


@settings(max_examples=4)
@given(lengths=st.lists(st.integers(2, 7), min_size=2, max_size=3), left=st.booleans())
def test_ragged_prefix_lm_equals_each_prompt_alone(lengths, left):
    _check_ragged(tiny_model("mamba,gated,attn", head=PrefixLM), lengths, 4, True, left, pm_len=2)


def test_ragged_rows_really_use_their_own_length():
    model = tiny_model("mamba*2")
    x = ids(1, 6, seed=9).expand(2, 6)
    out = generate(model, x, 6, temperature=0, prompt_lengths=[6, 3])
    assert torch.equal(out[1], generate(model, x[:1, :3], 6, temperature=0)[0])
    assert not torch.equal(out[0], out[1])


# ------------------------------------------------------------------------------------------ EOS and streaming
def _truncate(row: torch.Tensor, eos: set[int], pad: int) -> torch.Tensor:
    row = row.clone()
    hits = [t for t, v in enumerate(row.tolist()) if v in eos]
    if hits:
        row[hits[0] + 1:] = pad
    return row


@pytest.mark.parametrize("sample", [False, True])
def test_eos_stops_rows_and_pads_after(sample):
    model = tiny_model("mamba,attn")
    x = ids(3, 4, seed=5)
    kw = dict(temperature=1.0, seed=[1, 2, 3]) if sample else {"temperature": 0}
    free = generate(model, x, 12, **kw)
    eos = int(free[0, 3])  # row 0 emits it by step 3
    extra = int(free[2, 1])  # a second EOS id
    out = generate(model, x, 12, eos_token_id=[eos, extra], pad_token_id=VOCAB - 1, **kw)
    for b in range(3):
        assert torch.equal(out[b], _truncate(free[b], {eos, extra}, VOCAB - 1)), f"row {b}"
    # default padding is the (first) EOS id
    out = generate(model, x, 12, eos_token_id=eos, **kw)
    for b in range(3):
        assert torch.equal(out[b], _truncate(free[b], {eos}, eos))


def test_stream_yields_per_step_and_stops_when_all_rows_finished():
    model = tiny_model("mamba2*2")
    x = ids(2, 5, seed=6)
    full = generate(model, x, 10, temperature=0)
    steps = list(stream_generate(model, x, 10, temperature=0))
    assert len(steps) == 10 and all(s.shape == (2,) for s in steps)
    assert torch.equal(torch.stack(steps, 1), full)
    # an EOS every row emits early: the stream ends at the last row's EOS
    eos = {int(full[0, 2]), int(full[1, 4])}
    last = max(min(t for t in range(10) if int(full[b, t]) in eos) for b in range(2))
    steps = list(stream_generate(model, x, 10, temperature=0, eos_token_id=sorted(eos)))
    assert len(steps) == last + 1
    padded = generate(model, x, 10, temperature=0, eos_token_id=sorted(eos))
    assert torch.equal(torch.stack(steps, 1), padded[:, : last + 1])


def test_stream_does_not_leak_no_grad_and_validates_eagerly():
    model = tiny_model("mamba*2")
    it = stream_generate(model, ids(1, 3), 3, temperature=0)
    assert torch.is_grad_enabled()
    next(it)
    assert torch.is_grad_enabled()
    with pytest.raises(ValueError, match="max_new_tokens"):
        stream_generate(model, ids(1, 3), -1)  # raised at the call, before iterating


def test_zero_new_tokens_greedy_default_and_global_rng_sampling():
    model = tiny_model("mamba*2")
    assert generate(model, ids(2, 3), 0).shape == (2, 0)
    greedy = generate(model, ids(2, 3), 6, temperature=0)
    rng = torch.get_rng_state()
    assert torch.equal(generate(model, ids(2, 3), 6), greedy)  # the default is greedy and draws nothing
    assert torch.equal(torch.stack(list(stream_generate(model, ids(2, 3), 6)), 1), greedy)
    assert torch.equal(torch.get_rng_state(), rng)
    torch.manual_seed(0)
    a = generate(model, ids(2, 3), 6, temperature=1.0)  # sampling from torch's global generator
    torch.manual_seed(0)
    assert torch.equal(a, generate(model, ids(2, 3), 6, temperature=1.0))
    assert torch.equal(generate(model, ids(2, 3), 6, temperature=1.0, seed=5),
                       generate(model, ids(2, 3), 6, temperature=1.0, seed=5))


def test_float32_model_and_the_model_left_unchanged():
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(d_model=16, pattern="mamba", n_layers=2, vocab_size=VOCAB)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = ids(2, 6)
    out = generate(model, x, 5, temperature=0)
    for b in range(2):
        assert torch.equal(out[b], oracle(model, x[b], 5))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


# ------------------------------------------------------------------------------------------ argument checks
def test_max_cache_limits_prompt_and_new_tokens():
    model = tiny_model("mamba,attn", mixer_options={"attn": {"n_heads": 2, "max_cache": 8}})
    with pytest.raises(ValueError, match=r"^input_ids: row 1's prompt has 9 tokens.*max_cache=8"):
        generate(model, ids(2, 9), 1, prompt_lengths=[4, 9])
    with pytest.raises(ValueError, match=r"^max_new_tokens=5 is too large.*max_cache=8; use at most 4"):
        generate(model, ids(1, 5), 5)
    x = ids(1, 5)
    assert torch.equal(generate(model, x, 4, temperature=0)[0], oracle(model, x[0], 4))  # exactly fills it


@pytest.mark.parametrize("kw,err,match", [
    ({"input_ids": torch.tensor([[1, VOCAB]])}, ValueError, r"^input_ids must hold token ids in \[0, vocab_size"),
    ({"input_ids": torch.tensor([[-1, 2]])}, ValueError, r"^input_ids must hold token ids"),
    ({"input_ids": torch.tensor([[1.0, 2.0]])}, TypeError, r"^input_ids must be an integer tensor"),
    ({"input_ids": torch.tensor([1, 2])}, ValueError, r"^input_ids must have shape \(batch>=1, length>=1\)"),
    ({"max_new_tokens": -1}, ValueError, r"^max_new_tokens must be an int >= 0, got -1"),
    ({"max_new_tokens": 2.0}, ValueError, r"^max_new_tokens must be an int"),
    ({"temperature": -0.5}, ValueError, r"^temperature must be"),
    ({"top_k": 0}, ValueError, r"^top_k must be"),
    ({"top_p": 2}, ValueError, r"^top_p must be"),
    ({"eos_token_id": VOCAB}, ValueError, r"^eos_token_id must be None or an int or a list of ints in"),
    ({"eos_token_id": []}, ValueError, r"^eos_token_id"),
    ({"pad_token_id": -2}, ValueError, r"^pad_token_id must be"),
    ({"seed": [1, 2, 3]}, ValueError, r"^seed must be None, an int or a sequence of 2 ints"),
    ({"prompt_lengths": [1, 4]}, ValueError, r"^prompt_lengths must lie in \[1, input_ids.shape\[1\]=3\]"),
    ({"prompt_lengths": [1]}, ValueError, r"^prompt_lengths must have one entry per row"),
    ({"attention_mask": torch.tensor([[1, 0, 1], [1, 1, 1]])}, ValueError, r"^attention_mask row 0 is not one "),
    ({"attention_mask": torch.tensor([[0, 0, 0], [1, 1, 1]])}, ValueError, r"^attention_mask row 0 has no prompt"),
    ({"attention_mask": torch.tensor([[2, 1, 1], [1, 1, 1]])}, ValueError, r"^attention_mask must hold only 0"),
    ({"attention_mask": torch.ones(2, 2)}, ValueError, r"^attention_mask must be a bool or 0/1 integer tensor"),
    ({"attention_mask": torch.ones(2, 3, dtype=torch.bool), "prompt_lengths": [3, 3]}, ValueError,
     r"either attention_mask or prompt_lengths"),
    ({"prefix_mask": torch.ones(2, 3, dtype=torch.bool)}, ValueError, r"prefix_mask was given but this model"),
    ({"prefix_mask": torch.ones(2, 3, dtype=torch.bool), "prompt_lengths": [3, 2]}, ValueError,
     r"^prefix_mask is True at \[1, 2\], which is padding"),
])
def test_bad_arguments_name_themselves(kw, err, match):
    model = tiny_model("mamba*2")
    args = {"input_ids": ids(2, 3), "max_new_tokens": 2, **kw}
    with pytest.raises(err, match=match):
        generate(model, **args)


def test_padding_values_are_not_read():
    model = tiny_model("mamba*2")
    x = ids(2, 4)
    y = x.clone()
    y[1, 2:] = -7  # garbage in the padding of row 1
    assert torch.equal(generate(model, y, 4, temperature=0, prompt_lengths=[4, 2]),
                       generate(model, x, 4, temperature=0, prompt_lengths=[4, 2]))


def test_model_checks():
    with pytest.raises(TypeError, match="^model must be an ssmkit CausalLM or PrefixLM, got Regressor"):
        generate(Regressor(ModelConfig(d_model=8, d_input=2, d_output=2)), ids(1, 2), 1)
    torch.manual_seed(0)
    model = CausalLM(ModelConfig(d_model=8, pattern="gated", vocab_size=VOCAB, dropout=0.1))  # training mode
    with pytest.raises(ValueError, match=r"training mode with active dropout \(backbone.blocks.0.dropout\); call "
                                         r"model.eval\(\)"):
        generate(model, ids(1, 2), 1)
    torch.manual_seed(0)
    lc = CausalLM(ModelConfig(d_model=8, pattern="longconv", vocab_size=VOCAB,
                              mixer_options={"longconv": {"kernel_len": 8, "kernel_dropout": 0.2}}))
    with pytest.raises(ValueError, match=r"active dropout \(backbone.blocks.0.mixer.kernel_dropout\)"):
        generate(lc, ids(1, 2), 1)
    assert generate(lc.eval(), ids(1, 2), 2, temperature=0).shape == (1, 2)
    # training mode without any dropout is fine
    assert generate(CausalLM(ModelConfig(d_model=8, pattern="gated", vocab_size=VOCAB)), ids(1, 2), 2).shape == (1, 2)
