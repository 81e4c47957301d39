"""Multi-token steps with state: k new tokens in one pass equal k single steps, for every layer family and a hybrid
(float64); per-row rollback (ragged rows keeping different numbers of the k tokens) equals stepping each row."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.infer.multitoken import forward_snapshots
from ssmkit.layers.attention import AttentionState
from ssmkit.models.outputs import ModelState
from tests.infer.util import VOCAB, ids, tiny_model

FAMILIES = ["mamba", "mamba2", "s4d", "s4", "h3", "longconv", "gated", "rglru", "attn", "mamba2,attn,mamba,gated"]
SLIDING = {"attn": {"n_heads": 2, "mask": "sliding", "window": 3}}
GQA = {"gqa": {"n_heads": 4, "n_kv_heads": 2, "rotary_dim": 2}}  # grouped-query attention with rotary positions
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _prefill(model, batch: int, length: int, seed: int) -> ModelState:
    return model(ids(batch, length, seed=seed), return_final_state=True).state


@torch.no_grad()
def _steps(model, state: ModelState, toks: torch.Tensor) -> tuple[torch.Tensor, list[ModelState]]:
    """k single steps: -> logits (batch, k, vocab), [state after 0, 1, ..., k tokens]."""
    logits, states = [], [state]
    for t in range(toks.shape[1]):
        lg, state = model.step(toks[:, t], state)
        logits.append(lg)
        states.append(state)
    return torch.stack(logits, 1), states


def _assert_row_state(got: ModelState, i: int, want: ModelState, j: int, where: str) -> None:
    """Row i of ``got`` equals row j of ``want`` (for KV caches: the entries the row can see)."""
    for layer, (g, w) in enumerate(zip(got.layers, want.layers, strict=True)):
        if isinstance(g, AttentionState):
            p = int(w.pos[j])
            assert int(g.pos[i]) == p, f"{where} layer {layer} pos"
            vis = min(p, w.k.shape[2])
            assert g.k.shape[2] >= vis, f"{where} layer {layer} cache too short"
            for f in ("k", "v"):
                a, b = getattr(g, f)[i, :, g.k.shape[2] - vis:], getattr(w, f)[j, :, w.k.shape[2] - vis:]
                torch.testing.assert_close(a, b, **TOL, msg=f"{where} layer {layer} {f}")
            continue
        for name, t in g.tensors().items():
            torch.testing.assert_close(t[i], w.tensors()[name][j], **TOL, msg=f"{where} layer {layer} {name}")


@pytest.mark.parametrize("pattern", FAMILIES)
@settings(max_examples=4, deadline=None)
@given(k=st.integers(1, 16), seed=st.integers(0, 10**6))
def test_k_tokens_in_one_forward_equal_k_steps(pattern, k, seed):
    model = tiny_model(pattern)
    state = _prefill(model, 2, 3, seed)
    toks = ids(2, k, seed=seed + 1)
    want_logits, states = _steps(model, state, toks)
    out = model(toks, initial_state=state, return_final_state=True)
    torch.testing.assert_close(out.logits, want_logits, **TOL)
    for b in range(2):
        _assert_row_state(out.state, b, states[-1], b, f"row {b}")
    if "attn" in pattern:  # the KV cache grew by k
        i = pattern.split(",").index("attn")
        assert out.state.layers[i].k.shape[2] == state.layers[i].k.shape[2] + k


@pytest.mark.parametrize("pattern", FAMILIES + ["sliding", "mamba2,gqa"])
@settings(max_examples=4, deadline=None)
@given(k=st.integers(1, 16), seed=st.integers(0, 10**6), data=st.data())
def test_ragged_rollback_equals_stepping_each_row(pattern, k, seed, data):
    if pattern == "sliding":
        model = tiny_model("mamba,attn", mixer_options=SLIDING)
    else:
        model = tiny_model(pattern, mixer_options=GQA if "gqa" in pattern else None)
    batch = 3
    g = torch.Generator().manual_seed(seed)
    # rows with prompts of different lengths (a left-padded merged cache for attention)
    from ssmkit.infer.generate import _prefill as prefill
    from ssmkit.infer.prompts import parse_prompts

    x = ids(batch, 5, seed=seed)
    lengths = torch.randint(1, 6, (batch,), generator=g)
    _, state = prefill(model, parse_prompts(x, vocab_size=VOCAB, device=x.device, prompt_lengths=lengths))
    toks = ids(batch, k, seed=seed + 1)
    want_logits, states = _steps(model, state, toks)
    logits, snaps = forward_snapshots(model, toks, state)
    if "gqa" in pattern:  # cut back like attention's cache, not recomputed
        assert type(snaps.layers[1]).__name__ == "AttentionSnapshots"
    torch.testing.assert_close(logits, want_logits, **TOL)
    n = torch.tensor(data.draw(st.lists(st.integers(0, k), min_size=batch, max_size=batch)))
    got = snaps.select(n)
    for b in range(batch):
        _assert_row_state(got, b, states[int(n[b])], b, f"row {b} (n={int(n[b])})")
    # continuing from the rolled-back state gives what each row's own history gives
    nxt = ids(batch, 2, seed=seed + 2)
    cont, _ = _steps(model, got, nxt)
    for b in range(batch):
        want, _ = _steps(model, states[int(n[b])].map(lambda t, b=b: t[b:b + 1]), nxt[b:b + 1])
        torch.testing.assert_close(cont[b:b + 1], want, **TOL, msg=f"row {b}")
    # rows may be picked, repeated and reordered
    rows = torch.tensor([2, 0, 2])
    picked = snaps.select(n[rows], rows)
    for i, b in enumerate(rows.tolist()):
        _assert_row_state(picked, i, states[int(n[b])], b, f"picked {i}")


def test_select_checks_its_counts():
    model = tiny_model("mamba")
    state = _prefill(model, 2, 3, 0)
    _, snaps = forward_snapshots(model, ids(2, 4, seed=1), state)
    with pytest.raises(ValueError, match=r"n must lie in \[0, 4\]"):
        snaps.select(torch.tensor([1, 5]))
    with pytest.raises(ValueError, match="n must be an int64 tensor of shape"):
        snaps.select(torch.tensor([1.0, 2.0]))


def test_forward_snapshots_keeps_the_muP_multipliers():
    """residual_multiplier and logits_scaling (GraniteMoeHybrid, FalconH1) apply in the multi-token pass too."""
    model = tiny_model("mamba2,attn,mamba", mlp="swiglu", embedding_multiplier=1.5, residual_multiplier=0.7,
                       logits_scaling=3.0)
    state = _prefill(model, 2, 3, 0)
    toks = ids(2, 5, seed=1)
    want_logits, states = _steps(model, state, toks)
    logits, snaps = forward_snapshots(model, toks, state)
    torch.testing.assert_close(logits, want_logits, **TOL)
    got = snaps.select(torch.tensor([5, 2]))
    _assert_row_state(got, 0, states[5], 0, "row 0")
    _assert_row_state(got, 1, states[2], 1, "row 1")
