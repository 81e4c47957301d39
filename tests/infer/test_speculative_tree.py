"""Tree verification in one pass (tree scan for Mamba/Mamba2, ancestor mask for attention): every node's logits
and the state at any node equal stepping along that node's path (float64), for ragged prompt lengths."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ssmkit.infer.generate import _prefill
from ssmkit.infer.prompts import parse_prompts
from ssmkit.infer.tree import TokenTree, forward_tree, tree_supported
from tests.infer.test_multitoken import _assert_row_state, _steps
from tests.infer.util import VOCAB, ids, tiny_model

TOL = {"rtol": 1e-10, "atol": 1e-10}
PATTERNS = ["mamba*2", "mamba2", "attn", "mamba2,attn,mamba", "multipliers"]
#: GraniteMoeHybrid / FalconH1-style muP constants must apply in the tree pass too
MULTIPLIERS = {"embedding_multiplier": 1.5, "residual_multiplier": 0.7, "logits_scaling": 3.0}
ROTARY = {"attn": {"n_heads": 2, "rotary": True}}


@pytest.mark.parametrize("pattern", PATTERNS + ["rotary"])
@settings(max_examples=3, deadline=None)
@given(branches=st.integers(1, 3), depth=st.integers(1, 3), seed=st.integers(0, 10**6))
def test_tree_pass_equals_stepping_each_path(pattern, branches, depth, seed):
    if pattern == "rotary":
        model = tiny_model("mamba,attn", mixer_options=ROTARY)
    elif pattern == "multipliers":
        model = tiny_model("mamba2,attn", **MULTIPLIERS)
    else:
        model = tiny_model(pattern)
    batch = 2
    x = ids(batch, 5, seed=seed)
    _, state = _prefill(model, parse_prompts(x, vocab_size=VOCAB, device=x.device, prompt_lengths=[5, 2]))
    tree = TokenTree.full(branches, depth)
    nodes = ids(batch, tree.size, seed=seed + 1)
    logits, snaps = forward_tree(model, nodes, tree, state)
    g = torch.Generator().manual_seed(seed)
    for i in range(tree.size):
        path = tree.path(i)
        want, states = _steps(model, state, nodes[:, path])
        torch.testing.assert_close(logits[:, i], want[:, -1], **TOL, msg=f"node {i}")
    pick = torch.randint(0, tree.size, (batch,), generator=g)
    got = snaps.select(pick)
    for b in range(batch):
        _, states = _steps(model, state, nodes[:, tree.path(int(pick[b]))])
        _assert_row_state(got, b, states[-1], b, f"row {b} node {int(pick[b])}")
    cont, _ = _steps(model, got, ids(batch, 2, seed=seed + 2))
    for b in range(batch):
        _, states = _steps(model, state, nodes[:, tree.path(int(pick[b]))])
        want, _ = _steps(model, states[-1].map(lambda t, b=b: t[b:b + 1]), ids(batch, 2, seed=seed + 2)[b:b + 1])
        torch.testing.assert_close(cont[b:b + 1], want, **TOL, msg=f"continued row {b}")


def test_tree_support_and_errors():
    assert tree_supported(tiny_model("mamba2,attn")) and not tree_supported(tiny_model("mamba,s4d"))
    model = tiny_model("mamba,s4d")
    state = model(ids(1, 3), return_final_state=True).state
    with pytest.raises(ValueError, match=r"layer 1 \(s4d\) has no tree form"):
        forward_tree(model, ids(1, 3), TokenTree.full(2, 1), state)
    assert TokenTree.full(2, 2).parents == (-1, 0, 0, 1, 1, 2, 2)
