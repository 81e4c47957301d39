"""The fused draft and verify passes for pure-Mamba models (float64): every node's logits and the state at any node
equal stepping that node's path; the draft's tree equals the unfused draft's; speculative decoding takes the fused
path and still gives plain greedy's tokens."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.infer import generate, speculative_generate
from ssmkit.infer import speculative as spec
from ssmkit.infer.fused_spec import fused_draft, fused_plan, fused_verify
from ssmkit.infer.generate import _prefill
from ssmkit.infer.prompts import parse_prompts
from ssmkit.infer.spec_tree_rounds import _draft_tree
from ssmkit.infer.tree import TokenTree
from tests.infer.test_multitoken import _assert_row_state, _steps
from tests.infer.util import VOCAB, ids, tiny_model

TOL = {"rtol": 1e-10, "atol": 1e-10}


def _state(model, batch: int, seed: int):
    x = ids(batch, 5, seed=seed)
    lengths = [5, 2, 4][:batch]
    return _prefill(model, parse_prompts(x, vocab_size=VOCAB, device=x.device, prompt_lengths=lengths))[1]


SHAPES = [(1, 0), (1, 1), (1, 4), (1, 7), (2, 1), (2, 2), (2, 3), (3, 2)]


@settings(max_examples=4, deadline=None)
@given(shape=st.sampled_from(SHAPES), seed=st.integers(0, 10**6))
def test_verify_equals_stepping_every_path(shape, seed):
    """Chains (branches 1) and trees; rows with prompts of different lengths."""
    branches, depth = shape
    model = tiny_model("mamba*2")
    state = _state(model, 3, seed)
    with torch.no_grad():
        plan = fused_plan(model, state)
    assert plan is not None
    tree = TokenTree.full(branches, depth)
    nodes = ids(3, tree.size, seed=seed + 1)
    logits, snaps = fused_verify(model, plan, nodes, tree, state)
    for i in range(tree.size):
        want, _ = _steps(model, state, nodes[:, tree.path(i)])
        torch.testing.assert_close(logits[:, i], want[:, -1], **TOL, msg=f"node {i}")
    pick = torch.randint(0, tree.size, (4,), generator=torch.Generator().manual_seed(seed))
    rows = torch.tensor([2, 0, 2, 1])  # rows may repeat and reorder
    got = snaps.select(pick, rows)
    for j in range(4):
        b = int(rows[j])
        _, states = _steps(model, state, nodes[:, tree.path(int(pick[j]))])
        _assert_row_state(got, j, states[-1], b, f"row {b} node {int(pick[j])}")
    cont, _ = _steps(model, got, ids(4, 2, seed=seed + 2))  # the selected state steps on like any other
    assert torch.isfinite(cont).all()


@settings(max_examples=4, deadline=None)
@given(branches=st.integers(1, 3), depth=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_draft_tree_equals_the_unfused_draft(branches, depth, seed):
    model = tiny_model("mamba", seed=3)
    state = _state(model, 2, seed)
    root = ids(2, 1, seed=seed + 1)[:, 0]
    with torch.no_grad():
        nodes, snaps = fused_draft(model, fused_plan(model, state), root, branches, depth, state)
        want, _ = _draft_tree(model, (branches, depth), root, state)
    assert torch.equal(nodes, want)
    tree = TokenTree.full(branches, depth)
    leaf = torch.tensor([tree.size - 1, 1])
    got = snaps.select(leaf)
    for b in range(2):
        _, states = _steps(model, state, nodes[:, tree.path(int(leaf[b]))])
        _assert_row_state(got, b, states[-1], b, f"row {b}")


def test_speculative_takes_the_fused_path_and_equals_plain_greedy(monkeypatch):
    model, draft = tiny_model("mamba*2"), tiny_model("mamba", seed=3)
    calls = []
    real = spec.fused_rounds
    monkeypatch.setattr(spec, "fused_rounds", lambda *a: calls.append(a[2]) or real(*a))
    x = ids(3, 6, seed=1)
    want = generate(model, x, 13, prompt_lengths=[6, 2, 4])
    for kw in ({"num_draft": 1}, {"num_draft": 4}, {"tree": (2, 2)}, {"tree": (3, 1)}):
        got, stats = speculative_generate(model, x, 13, draft_model=draft, prompt_lengths=[6, 2, 4], **kw)
        assert torch.equal(got, want), kw
        assert stats.emitted == 3 * 12
    got, stats = speculative_generate(model, x, 13, draft_model=model, num_draft=3, prompt_lengths=[6, 2, 4])
    assert torch.equal(got, want) and stats.acceptance_rate == 1.0
    assert calls[0] == (1, 1) and (1, 4) in calls and (2, 2) in calls
    eos = int(want[1, 3])  # rows stop at different rounds: the fused loop drops finished rows from its buffers
    want = generate(model, x, 13, prompt_lengths=[6, 2, 4], eos_token_id=eos, pad_token_id=0)
    assert (want == 0).any(1).sum() >= 1
    for kw in ({"num_draft": 3}, {"tree": (2, 2)}):
        got, _ = speculative_generate(model, x, 13, draft_model=draft, prompt_lengths=[6, 2, 4], eos_token_id=eos,
                                      pad_token_id=0, **kw)
        assert torch.equal(got, want), kw
    n = len(calls)  # sampling, and models that are not pure Mamba, take the unfused path
    speculative_generate(model, x, 4, draft_model=draft, num_draft=2, temperature=1.0, seed=0)
    speculative_generate(tiny_model("mamba,attn"), x, 4, draft_model=draft, num_draft=2)
    assert len(calls) == n


def test_fused_plan_and_errors():
    model = tiny_model("mamba*2")
    state = _state(model, 1, 0)
    with torch.no_grad():
        assert fused_plan(tiny_model("mamba2"), _state(tiny_model("mamba2"), 1, 0)) is None
        scaled = tiny_model("mamba*2", residual_multiplier=0.7)  # the kernels have no multipliers
        assert fused_plan(scaled, _state(scaled, 1, 0)) is None
        plan = fused_plan(model, state)
    assert fused_plan(model, state) is None  # gradients enabled: not the kernels' business
    with pytest.raises(ValueError, match="branches must lie in"):
        fused_draft(model, plan, torch.tensor([1]), VOCAB + 1, 1, state)
    with pytest.raises(ValueError, match="nodes has 3 nodes but the tree has 7"):
        fused_verify(model, plan, ids(1, 3), TokenTree.full(2, 2), state)
    logits, snaps = fused_verify(model, plan, ids(1, 3), TokenTree.full(1, 2), state)
    with pytest.raises(ValueError, match="node must be int64"):
        snaps.select(torch.tensor([3]))
